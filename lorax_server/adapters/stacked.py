"""Every loaded adapter's LoRA weights stacked per target group, for the Triton LoRA kernels (GPU only).

A group is the targets one layer computes in one matmul (q/k/v, as `LORA_TARGET_GROUPS` names them) or
a single target. Its stack holds one section per target that some loaded adapter has; slot s holds one
adapter, its rank zero-padded to the stack's R (a power of two), and an adapter without a target of the
group contributes zeros there. Expert LoRA stacks hold only the adapters with expert LoRA, each at its
expert slot (`expert_slot`): [expert slots * E, ...], row expert_slot * E + e is that adapter's expert e. (A
slot for every adapter would cost 419 MB per adapter at Mixtral-8x7B's shapes, rank 16, nearly all zeros when
few adapters adapt the experts: 26.6 GiB for 64 adapters of which 8 did.) Rebuilt whenever an adapter is
loaded or offloaded.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from lorax_server.adapters.targets import LORA_TARGET_GROUPS
from lorax_server.adapters.weights import AdapterWeights, LayerKey

MIN_STACK_RANK = 8

GroupKey = Tuple[int, Tuple[str, ...]]  # (layer_id, the group's target names)


@dataclass(frozen=True)
class StackedLora:
    a: torch.Tensor  # [rows, sections * R, in]
    b: torch.Tensor  # [rows, out of all sections, R]
    names: Tuple[str, ...]  # the target of each section
    section_ends: Tuple[int, ...]  # where each section's rows of b end

    def y_shifts(self, starts: Dict[str, int]) -> Tuple[int, ...]:
        """How far each section's outputs move to land on `starts[name]`, its first column in the output."""
        return tuple(starts[name] - begin for name, begin in zip(self.names, (0,) + self.section_ends[:-1]))


@dataclass(frozen=True)
class LoraStacks:
    slot_of: torch.Tensor  # [max adapter index + 1] int32: slot of each adapter index, -1 for none
    expert_slot: torch.Tensor  # [slots] int32: each slot's place in the expert stacks, -1 without expert LoRA
    linear: Dict[GroupKey, StackedLora]
    experts: Dict[LayerKey, StackedLora]
    num_experts: int
    shrink: Callable  # lorax_server.kernels.lora.lora_shrink
    expand: Callable  # lorax_server.kernels.lora.lora_expand
    sgmv: Callable  # lorax_server.kernels.lora.sgmv_lora


def padded_rank(rank: int) -> int:
    return max(MIN_STACK_RANK, 1 << (rank - 1).bit_length())


def stack(sections: Dict[str, Dict[int, tuple]], rows_per_slot: int, slots: int) -> StackedLora:
    """sections: target name -> slot -> (a [rows_per_slot, r, in], b [rows_per_slot, out, r])."""
    names = tuple(sections)
    first = {name: next(iter(pieces.values())) for name, pieces in sections.items()}
    rank = padded_rank(max(a.shape[1] for pieces in sections.values() for a, _ in pieces.values()))
    outs = [first[name][1].shape[1] for name in names]
    ends = tuple(int(e) for e in torch.tensor(outs).cumsum(0))
    a0, b0 = first[names[0]]
    a = a0.new_zeros(slots * rows_per_slot, len(names) * rank, a0.shape[2])
    b = b0.new_zeros(slots * rows_per_slot, ends[-1], rank)
    for i, name in enumerate(names):
        for slot, (pa, pb) in sections[name].items():
            rows = slice(slot * rows_per_slot, (slot + 1) * rows_per_slot)
            a[rows, i * rank: i * rank + pa.shape[1]] = pa
            b[rows, ends[i] - outs[i]: ends[i], : pb.shape[2]] = pb
    return StackedLora(a, b, names, ends)


def group_of(name: str, groups: Sequence[Tuple[str, ...]]) -> Tuple[str, ...]:
    return next((group for group in groups if name in group), (name,))


def build_stacks(loaded: Dict[int, AdapterWeights], num_experts: int, device,
                 groups: Sequence[Tuple[str, ...]] = LORA_TARGET_GROUPS, kernels: Optional[tuple] = None) -> LoraStacks:
    """`kernels`: (shrink, expand, sgmv), the Triton LoRA kernels unless given (the tests give torch ones)."""
    if kernels is None:
        from lorax_server.kernels.lora import lora_expand, lora_shrink, sgmv_lora

        kernels = (lora_shrink, lora_expand, sgmv_lora)
    order = sorted(loaded)
    with_experts = [index for index in order if loaded[index].experts]
    slot_of = torch.full((max(order, default=0) + 1,), -1, dtype=torch.int32)
    expert_slot = torch.full((len(order),), -1, dtype=torch.int32)
    linear: Dict[GroupKey, Dict[str, Dict[int, tuple]]] = {}
    experts: Dict[LayerKey, Dict[str, Dict[int, tuple]]] = {}
    for slot, index in enumerate(order):
        slot_of[index] = slot
        for (layer, name), w in loaded[index].linear.items():  # a [in, r], b [r, out] -> [1, r, in], [1, out, r]
            group = linear.setdefault((layer, group_of(name, groups)), {})
            group.setdefault(name, {})[slot] = (w.a.t().unsqueeze(0), w.b.t().unsqueeze(0))
        if index in with_experts:
            expert_slot[slot] = with_experts.index(index)
        for key, w in loaded[index].experts.items():
            experts.setdefault(key, {}).setdefault(key[1], {})[int(expert_slot[slot])] = (w.a, w.b)
    in_group_order = {key: {name: sections[name] for name in key[1] if name in sections}
                      for key, sections in linear.items()}
    return LoraStacks(
        slot_of.to(device), expert_slot.to(device),
        {key: stack(sections, 1, len(order)) for key, sections in in_group_order.items()},
        {key: stack(sections, num_experts, len(with_experts)) for key, sections in experts.items()},
        num_experts, *kernels,
    )
