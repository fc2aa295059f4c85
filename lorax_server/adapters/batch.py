"""AdapterBatchData: which adapter each token of a batch uses, and the deltas the hook points add.

The pure-PyTorch path loops over the adapters present in the batch (never over tokens): each adapter's
rows are gathered, shrunk through A, expanded through B and added back. GPU kernels (SGMV/BGMV, expert
LoRA inside the grouped GEMMs) take the same inputs: per-token adapter indices and per-adapter weights.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from lorax_server.adapters.weights import BASE_MODEL_ADAPTER_INDEX, AdapterWeights


@dataclass(frozen=True)
class AdapterBatchData:
    """token_adapters [T] int64: the adapter index of each token (0 = base model).
    adapters: index -> weights, for the adapters present in the batch."""

    token_adapters: torch.Tensor
    adapters: Dict[int, AdapterWeights]

    def select(self, token_index: torch.Tensor) -> "AdapterBatchData":
        """The same adapters for a subset of the tokens (e.g. the rows that reach the LM head)."""
        return AdapterBatchData(self.token_adapters[token_index], self.adapters)

    def rows_of(self, adapter_index: int, token_adapters: Optional[torch.Tensor] = None) -> torch.Tensor:
        owners = self.token_adapters if token_adapters is None else token_adapters
        return (owners == adapter_index).nonzero().squeeze(1)

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, layer_id: int, name: str) -> None:
        """y [T, out] += each token's delta (x @ a) @ b for (layer_id, name), in place."""
        for index, adapter in self.adapters.items():
            lora = adapter.linear.get((layer_id, name))
            if index == BASE_MODEL_ADAPTER_INDEX or lora is None:
                continue
            rows = self.rows_of(index)
            if rows.numel():
                y.index_add_(0, rows, ((x[rows] @ lora.a) @ lora.b).to(y.dtype))

    def has_expert_lora(self, layer_id: int) -> bool:
        return any(i != BASE_MODEL_ADAPTER_INDEX and any(k[0] == layer_id for k in a.experts)
                   for i, a in self.adapters.items())

    def expert_lora(self, layer_id: int, dispatch) -> Optional["ExpertLoraBatch"]:
        """The expert-LoRA deltas of one MoE layer for this batch's routing, or None when no adapter has any."""
        present = {i: a.experts for i, a in self.adapters.items()
                   if i != BASE_MODEL_ADAPTER_INDEX and any(k[0] == layer_id for k in a.experts)}
        if not present:
            return None
        return ExpertLoraBatch(self.token_adapters[dispatch.token_index], dispatch.expert_ids, layer_id, present)


@dataclass(frozen=True)
class ExpertLoraBatch:
    """Expert LoRA over expert-sorted rows: row i belongs to adapter `row_adapters[i]`, expert `row_experts[i]`."""

    row_adapters: torch.Tensor  # [T*K]
    row_experts: torch.Tensor  # [T*K]
    layer_id: int
    adapters: Dict[int, Dict]

    def add(self, y: torch.Tensor, x: torch.Tensor, name: str) -> None:
        """y [N, out] += b[e] @ (a[e] @ x) for each row's adapter and expert ("w13" or "w2")."""
        for index, experts in self.adapters.items():
            lora = experts.get((self.layer_id, name))
            if lora is None:
                continue
            rows = (self.row_adapters == index).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            e = self.row_experts[rows]
            shrunk = torch.bmm(lora.a[e], x[rows].unsqueeze(2))  # [n, r, 1]
            y.index_add_(0, rows, torch.bmm(lora.b[e], shrunk).squeeze(2).to(y.dtype))
