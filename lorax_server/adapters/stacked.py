"""Every loaded adapter's LoRA weights stacked per target, for the Triton LoRA kernels (GPU only).

Slot s holds one adapter; its rank is zero-padded to the stack's R (a power of two), and an adapter
without a given target contributes zeros there. Expert LoRA stacks are [slots * E, ...]: row
slot * E + e is that adapter's expert e. Rebuilt whenever an adapter is loaded or offloaded.
"""

from dataclasses import dataclass
from typing import Callable, Dict

import torch

from lorax_server.adapters.weights import AdapterWeights, LayerKey

MIN_STACK_RANK = 8


@dataclass(frozen=True)
class StackedLora:
    a: torch.Tensor  # [rows, R, in]
    b: torch.Tensor  # [rows, out, R]


@dataclass(frozen=True)
class LoraStacks:
    slot_of: torch.Tensor  # [max adapter index + 1] int32: slot of each adapter index, -1 for none
    linear: Dict[LayerKey, StackedLora]
    experts: Dict[LayerKey, StackedLora]
    num_experts: int
    shrink: Callable  # lorax_server.kernels.lora.lora_shrink
    expand: Callable  # lorax_server.kernels.lora.lora_expand


def padded_rank(rank: int) -> int:
    return max(MIN_STACK_RANK, 1 << (rank - 1).bit_length())


def stack(pieces: Dict[int, tuple], rows_per_slot: int, slots: int) -> StackedLora:
    """pieces: slot -> (a [rows_per_slot, r, in], b [rows_per_slot, out, r])."""
    a0, b0 = next(iter(pieces.values()))
    rank = padded_rank(max(a.shape[1] for a, _ in pieces.values()))
    a = a0.new_zeros(slots * rows_per_slot, rank, a0.shape[2])
    b = b0.new_zeros(slots * rows_per_slot, b0.shape[1], rank)
    for slot, (pa, pb) in pieces.items():
        rows = slice(slot * rows_per_slot, (slot + 1) * rows_per_slot)
        a[rows, : pa.shape[1]] = pa
        b[rows, :, : pb.shape[2]] = pb
    return StackedLora(a, b)


def build_stacks(loaded: Dict[int, AdapterWeights], num_experts: int, device) -> LoraStacks:
    from lorax_server.kernels.lora import lora_expand, lora_shrink

    order = sorted(loaded)
    slot_of = torch.full((max(order, default=0) + 1,), -1, dtype=torch.int32)
    linear: Dict[LayerKey, Dict[int, tuple]] = {}
    experts: Dict[LayerKey, Dict[int, tuple]] = {}
    for slot, index in enumerate(order):
        slot_of[index] = slot
        for key, w in loaded[index].linear.items():  # a [in, r], b [r, out] -> [1, r, in], [1, out, r]
            linear.setdefault(key, {})[slot] = (w.a.t().unsqueeze(0), w.b.t().unsqueeze(0))
        for key, w in loaded[index].experts.items():
            experts.setdefault(key, {})[slot] = (w.a, w.b)
    return LoraStacks(
        slot_of.to(device),
        {key: stack(pieces, 1, len(order)) for key, pieces in linear.items()},
        {key: stack(pieces, num_experts, len(order)) for key, pieces in experts.items()},
        num_experts, lora_shrink, lora_expand,
    )
