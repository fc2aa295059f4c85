"""Assignments grouped by expert, each group padded to whole row tiles: the layout the fused MoE kernels
and the SGMV LoRA kernels walk (one program per tile of rows of one group). Pure PyTorch, no host
synchronisation; `kernels/fused_moe.py` has a one-program Triton version for small batches.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Alignment:
    sorted_rows: torch.Tensor  # [P] assignment id (t * K + k) at each padded position, T*K for padding
    position: torch.Tensor  # [T*K] padded position of each assignment (the inverse of sorted_rows; undefined
    # for an assignment another rank computes)
    block_expert: torch.Tensor  # [P / BLOCK_M] expert of each row block, -1 past the last real block
    padded_rows: int  # P


def padded_size(n: int, num_experts: int, block_m: int) -> int:
    """Rows of the aligned layout of n assignments: at most min(E, n) groups hold any, and each of those pads
    its run by at most block_m - 1 rows (the bound depends on n alone, never on the routing)."""
    return max(block_m, -(-(n + min(num_experts, n) * (block_m - 1)) // block_m) * block_m)


def align_by_expert(experts: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """experts [T, K] -> the assignments grouped by expert, each group padded to a multiple of block_m.

    One stable sort by expert; an assignment's padded place is its group's padded start plus its rank in
    the group. Every op is O(T*K + E) with a fixed shape (no host synchronisation), so it also serves many
    groups: SGMV groups rows by adapter x expert with it. (A one-hot running count, its first form, was
    O(T*K x E): 0.76 ms for 4096 rows in 64 groups on an H200, docs/logs/h200_s2_profile_prefill_lora.log.)
    """
    flat = experts.flatten()
    n = flat.numel()
    padded_rows = padded_size(n, num_experts, block_m)
    order = torch.argsort(flat, stable=True)  # an expert id of E (another rank's assignment) sorts last
    sorted_experts = flat[order]
    here = sorted_experts < num_experts
    group = torch.where(here, sorted_experts, 0)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts = counts.scatter_add_(0, flat.clamp(max=num_experts), torch.ones_like(flat))[:num_experts]
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_end = padded_counts.cumsum(0)
    rank = torch.arange(n, device=flat.device) - (counts.cumsum(0) - counts).gather(0, group)
    # other ranks' assignments go to one extra slot past the end, dropped below
    sorted_position = torch.where(here, (padded_end - padded_counts).gather(0, group) + rank, padded_rows)
    position = torch.empty_like(sorted_position).scatter_(0, order, sorted_position)
    sorted_rows = torch.full((padded_rows + 1,), n, dtype=torch.int64, device=flat.device)
    sorted_rows = sorted_rows.scatter_(0, sorted_position, order)[:padded_rows]
    block_starts = torch.arange(0, padded_rows, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return Alignment(sorted_rows, position, block_expert, padded_rows)
