"""`Seqlen`: the lengths of each sequence in a batch, as LoRAX passes them to the model."""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Seqlen:
    """Per-sequence lengths of one forward pass; B = sequences in the batch.

    input_lengths [B]: new tokens this step (1 per sequence in decode).
    cache_lengths [B]: tokens already in the KV cache before this step.
    cu_seqlen_q [B+1]: offsets of each sequence's new tokens in the packed batch (derived when absent).
    max_q / max_k: the longest query run and the longest key run (cache + new).
    max_cached: the most tokens any sequence has in the cache already, when the caller knows it on the host.
    min_q: the shortest query run, when the caller knows it on the host (decodes beside a chunk take their own
        attention launch).
    """

    input_lengths: torch.Tensor
    cache_lengths: torch.Tensor
    cu_seqlen_q: Optional[torch.Tensor] = None
    max_q: Optional[int] = None
    max_k: Optional[int] = None
    max_cached: Optional[int] = None
    min_q: Optional[int] = None

    def __post_init__(self):
        if self.cu_seqlen_q is None:
            cu = torch.zeros(len(self.input_lengths) + 1, dtype=torch.int32, device=self.input_lengths.device)
            cu[1:] = self.input_lengths.cumsum(0)
            object.__setattr__(self, "cu_seqlen_q", cu)
        if self.max_q is None:
            object.__setattr__(self, "max_q", int(self.input_lengths.max()) if len(self.input_lengths) else 0)
        if self.max_k is None:
            object.__setattr__(self, "max_k", int(self.total_lengths.max()) if len(self.input_lengths) else 0)

    @property
    def total_lengths(self) -> torch.Tensor:
        """[B] keys each sequence attends to after this step: cache + new."""
        return self.cache_lengths + self.input_lengths
