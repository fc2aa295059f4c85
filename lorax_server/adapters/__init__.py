"""The adapters of one batch, as the model's LoRA hook points consume them.

Index 0 is the base model (no delta). Adapter weights are stored per (layer_id, target name), already
sharded for this rank and oriented for `x @ a @ b`.
"""

from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch

from lorax_server.utils.dist import FakeGroup, all_reduce

BASE_MODEL_ADAPTER_INDEX = 0


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's LoRA on one target: delta = scale * (x @ a) @ b."""

    a: torch.Tensor  # [in_features (this rank's slice if row-parallel), r]
    b: torch.Tensor  # [r, out_features (this rank's slice if column-parallel)]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[1]


LayerKey = Tuple[int, str]  # (layer_id, target name such as "self_attn.q_proj")


@dataclass(frozen=True)
class AdapterBatchData:
    """Which adapter each token uses, and the LoRA weights of the adapters present in the batch.

    token_adapters [T] int64: adapter index of each token of the packed batch (0 = base model).
    adapters: adapter index -> {(layer_id, target): LoraWeights}.
    """

    token_adapters: torch.Tensor
    adapters: Dict[int, Dict[LayerKey, LoraWeights]]
    process_group: object = field(default_factory=lambda: FakeGroup(0, 1))

    def select(self, token_index: torch.Tensor) -> "AdapterBatchData":
        """The same adapters for a subset of the tokens (e.g. the rows that reach the LM head)."""
        return AdapterBatchData(self.token_adapters[token_index], self.adapters, self.process_group)

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, layer_id: int, name: str, row_parallel: bool) -> None:
        """Adds each token's LoRA delta for (layer_id, name) into y [T, out] in place."""
        for index, layers in self.adapters.items():
            lora = layers.get((layer_id, name))
            if index == BASE_MODEL_ADAPTER_INDEX or lora is None:
                continue
            rows = (self.token_adapters == index).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            shrunk = x[rows] @ lora.a  # [n, r]
            if row_parallel:
                all_reduce(shrunk, self.process_group)
            y.index_add_(0, rows, (shrunk @ lora.b) * lora.scale)
