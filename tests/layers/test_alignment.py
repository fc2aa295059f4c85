"""`align_by_expert` (the tile layout of the fused MoE and SGMV kernels) against a Python loop."""

import pytest
import torch

from lorax_server.kernels.alignment import align_by_expert


def aligned_by_loop(flat, num_experts, block_m):
    """The layout spelt out: each expert's assignments in their original order, padded to whole tiles."""
    sorted_rows, block_expert = [], []
    for e in range(num_experts):
        mine = [i for i, x in enumerate(flat) if x == e]
        tiles = -(-len(mine) // block_m)
        sorted_rows += mine + [len(flat)] * (tiles * block_m - len(mine))
        block_expert += [e] * tiles
    return sorted_rows, block_expert


@pytest.mark.parametrize("T, K, E, block_m", [(1, 2, 8, 16), (37, 2, 8, 32), (300, 1, 64, 32), (513, 2, 8, 64)])
@pytest.mark.parametrize("elsewhere", [False, True])
def test_alignment_equals_the_loop(T, K, E, block_m, elsewhere):
    """Skewed routing (empty experts); with `elsewhere`, expert id E marks assignments to leave out."""
    g = torch.Generator().manual_seed(T)
    experts = torch.randint(0, E + int(elsewhere), (T, K), generator=g)
    experts[: T // 2, 0] %= 2
    got = align_by_expert(experts, E, block_m)
    flat = experts.flatten().tolist()
    sorted_rows, block_expert = aligned_by_loop(flat, E, block_m)
    used = len(sorted_rows)
    assert got.padded_rows % block_m == 0 and got.padded_rows >= used
    assert got.sorted_rows[:used].tolist() == sorted_rows
    assert (got.sorted_rows[used:] == len(flat)).all()
    assert got.block_expert[: len(block_expert)].tolist() == block_expert
    assert (got.block_expert[len(block_expert):] == -1).all()
    here = [i for i, e in enumerate(flat) if e < E]
    assert got.sorted_rows[got.position[here]].tolist() == here  # position inverts sorted_rows
