"""The model runner: one forward pass over the engine's sequences, and the choice of their next tokens.

The engine (`models/flash_causal_lm.py`) keeps requests, batches and blocks. The runner turns the
sequences of one step into a typed `ForwardBatch`, adds the adapters' batch data, replays a CUDA graph
for a decode step where one fits (else calls the model), and samples the whole batch.

Packing never waits for the GPU: every length a kernel needs on the host (the longest query and key
runs) comes from the host's own lists, and the tensors travel in two copies (one int64, one int32). So
the host queues the whole step, forward and sampling, and meets the GPU once, when the sampler returns.
"""

import itertools
import logging
import math
import os
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Sequence

import torch

from lorax_server.adapters.store import AdapterStore
from lorax_server.engine.cache import PagedKVCache, PagedSequence
from lorax_server.engine.graphs import DecodeGraphs
from lorax_server.engine.sampler import NON_FINITE, BatchSampler, Choice
from lorax_server.utils.attention.common import Seqlen

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForwardBatch:
    """One forward pass, packed: the new tokens of B sequences back to back (T tokens in all)."""

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64
    slots: torch.Tensor  # [T] int64: the cache slot each token's K/V goes to
    token_adapters: torch.Tensor  # [T] int64: the adapter index of each token (0 = base)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with block 0
    seqlen: Seqlen  # new and cached lengths; max_q / max_k known on the host
    cu_seqlen_prefill: Optional[torch.Tensor]  # [B+1] int32 in a prefill, None in a decode step
    lm_head_indices: Optional[torch.Tensor]  # [B] int64: the token whose logits each sequence wants; None: all
    adapter_indices: FrozenSet[int]  # the adapters present, known on the host

    @property
    def size(self) -> int:
        """B, the sequences in the batch."""
        return self.block_tables.shape[0]

    def model_inputs(self, kv_cache, adapter_data=None) -> dict:
        """The keywords of the model's forward (LoRAX's names)."""
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, cu_seqlen_prefill=self.cu_seqlen_prefill,
                    kv_cache=kv_cache, block_tables=self.block_tables, slots=self.slots, seqlen=self.seqlen,
                    max_s=self.seqlen.max_k, lm_head_indices=self.lm_head_indices, adapter_data=adapter_data)


def pack(seqs: Sequence[PagedSequence], new_counts: Sequence[int], cache: PagedKVCache, prefill: bool,
         device, all_logits: bool = False) -> ForwardBatch:
    """The batch that runs `new_counts[i]` uncached tokens of each sequence (reserving any block they still
    need: the engine's requests reserved theirs at admission). `all_logits`: logits for every token, not
    only each sequence's last."""
    block_size = cache.block_size
    ids, positions, slots, adapters = [], [], [], []
    for seq, count in zip(seqs, new_counts):
        seq.reserve(cache, seq.cached + count)
        span = range(seq.cached, seq.cached + count)
        ids += seq.tokens[seq.cached:seq.cached + count]
        positions += span
        slots += [seq.blocks[p // block_size] * block_size + p % block_size for p in span]
        adapters += [seq.adapter_index] * count
    cu = list(itertools.accumulate(new_counts, initial=0))
    last = [end - 1 for end in cu[1:]]
    width = max(len(s.blocks) for s in seqs)
    tables = [b for s in seqs for b in s.blocks + [0] * (width - len(s.blocks))]
    cached = [s.cached for s in seqs]

    longs = to_device(ids + positions + slots + adapters + ([] if all_logits else last), torch.int64, device)
    ints = to_device(list(new_counts) + cached + cu + tables, torch.int32, device)
    T, B = len(ids), len(seqs)
    input_lengths, cache_lengths, cu_seqlens = ints[:B], ints[B:2 * B], ints[2 * B:3 * B + 1]
    seqlen = Seqlen(input_lengths, cache_lengths, cu_seqlens, max_q=max(new_counts),
                    max_k=max(c + n for c, n in zip(cached, new_counts)))
    return ForwardBatch(
        input_ids=longs[:T], position_ids=longs[T:2 * T], slots=longs[2 * T:3 * T], token_adapters=longs[3 * T:4 * T],
        block_tables=ints[3 * B + 1:].view(B, width), seqlen=seqlen, cu_seqlen_prefill=cu_seqlens if prefill else None,
        lm_head_indices=None if all_logits else longs[4 * T:], adapter_indices=frozenset(adapters),
    )


def to_device(values: List[int], dtype: torch.dtype, device) -> torch.Tensor:
    """One host-to-device copy of a list of ints (the host does not wait for it)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def mark_cached(seqs: Sequence[PagedSequence], new_counts: Sequence[int]) -> None:
    for seq, count in zip(seqs, new_counts):
        seq.cached += count


class ModelRunner:
    """Runs the model over packed sequences and chooses next tokens; knows nothing of requests' text or lifetimes."""

    def __init__(self, model, cache: PagedKVCache, adapters: AdapterStore, device: torch.device):
        self.model = model
        self.cache = cache
        self.adapters = adapters
        self.device = device
        self.sampler = BatchSampler(device)
        self.graphs = None
        if device.type == "cuda" and os.getenv("LORAX_CUDA_GRAPHS", "1") != "0":
            self.graphs = DecodeGraphs(model, cache.layers, cache.block_size, model.config.max_position_embeddings)

    def forward(self, seqs: Sequence[PagedSequence], new_counts: Sequence[int], prefill: bool,
                all_logits: bool = False) -> torch.Tensor:
        """Logits of each sequence's last new token [B, V] (every new token's [T, V] with `all_logits`);
        the new tokens' K/V are in the cache afterwards."""
        batch = pack(seqs, new_counts, self.cache, prefill, self.device, all_logits=all_logits)
        adapter_data = self.adapters.batch_data(batch.token_adapters, batch.adapter_indices)
        logits = None
        if not prefill and self.graphs is not None:
            logits = self.graphs.run(batch, adapter_data, self.adapters.stacks)
        if logits is None:
            logits, _ = self.model(**batch.model_inputs(self.cache.layers, adapter_data))
        mark_cached(seqs, new_counts)
        return logits

    def sample(self, requests: Sequence, logits: torch.Tensor) -> List[Choice]:
        """One Choice per request (see `start`), waiting for them."""
        return self.start(requests, logits).collect()

    def start(self, requests: Sequence, logits: torch.Tensor) -> "PendingChoices":
        """Launches the choice of each request's next token from its row of `logits` [B, V]; the choices are
        read (one host synchronisation) when `collect` is called."""
        try:
            return PendingChoices(requests, logits, self.sampler.step(logits, requests))
        except Exception:
            logger.exception("batched sampling failed; each request of the batch samples alone")
        return PendingChoices(requests, logits, None)


@dataclass
class PendingChoices:
    """The choices of one step for `requests`, from the batched sampler; should it have failed (None), each
    request samples alone with its own chooser (the per-request oracle), so a failure stays with its request."""

    requests: Sequence
    logits: torch.Tensor
    batched: Optional[List[Choice]]

    def collect(self) -> List[Choice]:
        if self.batched is not None:
            return self.batched
        return [sample_alone(r, row) for r, row in zip(self.requests, self.logits)]


def sample_alone(r, logits: torch.Tensor) -> Choice:
    """The per-request oracle's choice for one request (the fallback of a failed batched step)."""
    r.counts = None  # this step's token is not counted there: the next batched step recounts the sequence
    try:
        token, logprob, alternatives = r.chooser(logits, r.seq.tokens)
    except Exception as error:
        return Choice(0, math.nan, error=f"{type(error).__name__}: {error}")
    return Choice(token, logprob, alternatives, None if math.isfinite(logprob) else NON_FINITE)
