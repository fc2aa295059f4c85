"""AdapterBatchData: which adapter each token of a batch uses, and the deltas the hook points add.

The pure-PyTorch path loops over the adapters present in the batch (never over tokens): each adapter's
rows are gathered, shrunk through A, expanded through B and added back. GPU kernels (SGMV/BGMV, expert
LoRA inside the grouped GEMMs) take the same inputs: per-token adapter indices and per-adapter weights.
"""

import functools
import itertools
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from lorax_server.adapters.stacked import LoraStacks
from lorax_server.adapters.weights import BASE_MODEL_ADAPTER_INDEX, AdapterWeights
from lorax_server.kernels.alignment import align_by_expert

# Rows of expert LoRA from which the two-stage MoE path (`moe_experts`) groups them by adapter and expert
# (SGMV) instead of running per-row kernels (BGMV). The fused MoE kernels (up to TRITON_MOE_MAX_TOKENS = 1024
# tokens) apply expert LoRA themselves (kernels/fused_moe.py: A per row, B inside the GEMM tiles), so with the
# Triton backend the two-stage path starts above 2048 rows and always groups; with other backends smaller
# batches keep BGMV. Not tuned.
SGMV_MIN_ROWS = 1024


@dataclass(frozen=True)
class AdapterBatchData:
    """token_adapters [T] int64: the adapter index of each token (0 = base model).
    adapters: index -> weights, for the adapters present in the batch.
    stacks / token_slots: on a GPU, every loaded adapter stacked per target and each token's slot in
    the stacks (-1 = none); the deltas then come from the Triton kernels, with no host synchronisation."""

    token_adapters: torch.Tensor
    adapters: Dict[int, AdapterWeights]
    stacks: Optional[LoraStacks] = None
    token_slots: Optional[torch.Tensor] = None

    @classmethod
    def for_tokens(cls, token_adapters: torch.Tensor, adapters: Dict[int, AdapterWeights],
                   stacks: Optional[LoraStacks]) -> "AdapterBatchData":
        slots = None
        if stacks is not None:
            slots = stacks.slot_of[token_adapters.clamp(0, len(stacks.slot_of) - 1)]
            slots = torch.where(token_adapters < len(stacks.slot_of), slots, -1)
        return cls(token_adapters, adapters, stacks, slots)

    def select(self, token_index: torch.Tensor) -> "AdapterBatchData":
        """The same adapters for a subset of the tokens (e.g. the rows that reach the LM head)."""
        slots = self.token_slots[token_index] if self.token_slots is not None else None
        return AdapterBatchData(self.token_adapters[token_index], self.adapters, self.stacks, slots)

    def rows_of(self, adapter_index: int) -> torch.Tensor:
        return (self.token_adapters == adapter_index).nonzero().squeeze(1)

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, layer_id: int, name: str) -> None:
        """y [T, out] += each token's delta (x @ a) @ b for (layer_id, name), in place."""
        self.add_fused_lora(y, x, layer_id, (name,), (y.shape[1],))

    def add_fused_lora(self, y: torch.Tensor, x: torch.Tensor, layer_id: int, names: Sequence[str],
                       sizes: Sequence[int]) -> None:
        """The LoRA of several targets computed in one matmul (q/k/v): y's columns are the targets' outputs
        side by side, `sizes[i]` columns for `names[i]`. In place."""
        starts = dict(zip(names, itertools.accumulate(sizes, initial=0)))
        if self.stacks is not None:
            stacked = self.stacks.linear.get((layer_id, tuple(names)))
            if stacked is not None:
                v = self.stacks.shrink(x, stacked.a, self.token_slots, sections=len(stacked.names))
                self.stacks.expand(y, v, stacked.b, self.token_slots, stacked.section_ends, stacked.y_shifts(starts))
            return
        for name, size in zip(names, sizes):
            self.add_lora_loop(y[:, starts[name]:starts[name] + size], x, layer_id, name)

    def add_lora_loop(self, y: torch.Tensor, x: torch.Tensor, layer_id: int, name: str) -> None:
        """The pure-PyTorch path (and the kernels' oracle): one gather, shrink, expand and add per adapter."""
        for index, adapter in self.adapters.items():
            lora = adapter.linear.get((layer_id, name))
            if index == BASE_MODEL_ADAPTER_INDEX or lora is None:
                continue
            rows = self.rows_of(index)
            if rows.numel():
                y.index_add_(0, rows, ((x[rows] @ lora.a) @ lora.b).to(y.dtype))

    def expert_lora_layers(self) -> frozenset:
        """The layers where an adapter of this batch has expert LoRA: with the stacks and the batch size,
        this fixes every kernel a decode step launches (what a CUDA graph of the step depends on)."""
        return frozenset(layer for i, a in self.adapters.items() if i != BASE_MODEL_ADAPTER_INDEX
                         for layer, _ in a.experts)

    def has_expert_lora(self, layer_id: int) -> bool:
        """Whether an adapter of this batch has expert LoRA in this layer (host-side, no synchronisation)."""
        return any(i != BASE_MODEL_ADAPTER_INDEX and any(k[0] == layer_id for k in a.experts)
                   for i, a in self.adapters.items())

    def expert_lora(self, layer_id: int, row_tokens: torch.Tensor, row_experts: torch.Tensor):
        """The expert-LoRA deltas of one MoE layer for rows (token, expert) in whatever order the caller
        computes them (expert-sorted for grouped GEMMs, t * K + k for the fused kernels), or None."""
        present = {i: a.experts for i, a in self.adapters.items()
                   if i != BASE_MODEL_ADAPTER_INDEX and any(k[0] == layer_id for k in a.experts)}
        if not present:
            return None
        if self.stacks is not None:
            row_slots = self.token_slots[row_tokens]
            expert_slots = torch.where(row_slots >= 0, self.stacks.expert_slot[row_slots.clamp(min=0).long()], -1)
            rows = torch.where(expert_slots >= 0, expert_slots * self.stacks.num_experts + row_experts, -1)
            return StackedExpertLora(rows.to(torch.int32), layer_id, self.stacks)
        return ExpertLoraBatch(self.token_adapters[row_tokens], row_experts, layer_id, present)


@dataclass(frozen=True)
class ExpertLoraBatch:
    """Expert LoRA over expert-sorted rows: row i belongs to adapter `row_adapters[i]`, expert `row_experts[i]`."""

    row_adapters: torch.Tensor  # [T*K]
    row_experts: torch.Tensor  # [T*K]
    layer_id: int
    adapters: Dict[int, Dict]

    def add(self, y: torch.Tensor, x: torch.Tensor, name: str, row_scale: Optional[torch.Tensor] = None) -> None:
        """y [N, out] += row_scale * b[e] @ (a[e] @ x) for each row's adapter and expert ("w13" or "w2")."""
        for index, experts in self.adapters.items():
            lora = experts.get((self.layer_id, name))
            if lora is None:
                continue
            rows = (self.row_adapters == index).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            e = self.row_experts[rows]
            shrunk = torch.bmm(lora.a[e], x[rows].unsqueeze(2))  # [n, r, 1]
            if row_scale is not None:
                shrunk = shrunk * row_scale[rows].view(-1, 1, 1).to(shrunk.dtype)
            y.index_add_(0, rows, torch.bmm(lora.b[e], shrunk).squeeze(2).to(y.dtype))


@dataclass(frozen=True)
class StackedExpertLora:
    """Expert LoRA through the Triton kernels: row i uses stack row `rows[i]` (expert slot * E + expert, or -1).

    In the two-stage path (`add`), below `SGMV_MIN_ROWS` rows (or with a row scale or an index) each row reads
    its own A and B (BGMV); otherwise the rows are grouped by stack row once per layer and each group's
    weights are read once per tile of rows (SGMV). The fused MoE kernels read `rows` and the stacks
    themselves; `deltas` is the same per-row maths as one tensor (the CPU tests' check of the stacks)."""

    rows: torch.Tensor  # [T*K] int32
    layer_id: int
    stacks: LoraStacks

    def add(self, y: torch.Tensor, x: torch.Tensor, name: str, row_scale: Optional[torch.Tensor] = None,
            x_index: Optional[torch.Tensor] = None) -> None:
        """y [N, out] += row_scale * b @ (a @ x[x_index]) per row (x[i] when x_index is None), in place."""
        stacked = self.stacks.experts.get((self.layer_id, name))
        if stacked is None:
            return
        if row_scale is None and x_index is None and len(self.rows) >= SGMV_MIN_ROWS:
            sorted_rows, block_group = self.groups
            self.stacks.sgmv(y, x, stacked.a, stacked.b, sorted_rows, block_group)
            return
        v = self.stacks.shrink(x, stacked.a, self.rows, x_index=x_index)
        self.stacks.expand(y, v, stacked.b, self.rows, row_scale=row_scale)

    @functools.cached_property
    def groups(self):
        """(sorted_rows, block_group): the rows grouped by stack row, shared by the layer's w13 and w2."""
        from lorax_server.kernels.lora import SGMV_BLOCK_M

        stack_rows = next(iter(self.stacks.experts.values())).a.shape[0]  # expert slots * E, in every expert stack
        rows = torch.where(self.rows >= 0, self.rows.long(), stack_rows)  # no LoRA: in no group
        aligned = align_by_expert(rows, stack_rows, SGMV_BLOCK_M)
        return aligned.sorted_rows, aligned.block_expert

    def deltas(self, x: torch.Tensor, name: str, x_row_div: int = 1) -> Optional[torch.Tensor]:
        """[N, out] fp32: row i's delta b @ (a @ x[i // x_row_div]), or None when no adapter has `name` here."""
        stacked = self.stacks.experts.get((self.layer_id, name))
        if stacked is None:
            return None
        out = torch.empty(len(self.rows), stacked.b.shape[1], dtype=torch.float32, device=x.device)
        v = self.stacks.shrink(x, stacked.a, self.rows, x_row_div=x_row_div)
        self.stacks.expand(out, v, stacked.b, self.rows, accumulate=False)
        return out
