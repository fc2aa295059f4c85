"""The Triton LoRA kernels against a per-row torch oracle: sections (fused q/k/v, with a target missing),
padded ranks, rows without LoRA, row scales, overwrite mode and gathered input rows.

Runs on CUDA; on a CPU with TRITON_INTERPRET=1 (Triton's interpreter, numpy < 2.3) it runs there too.
"""

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED:
    from tests.gpu.conftest import skip_without_gpu

    skip_without_gpu()

from lorax_server.kernels.alignment import align_by_expert  # noqa: E402
from lorax_server.kernels.lora import SGMV_BLOCK_M, lora_expand, lora_shrink, sgmv_lora  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cpu" if INTERPRETED else "cuda"


def oracle(x_rows, a, b, slots, sections, ends, shifts, width, row_scale=None):
    """The delta each row gets, one row at a time, in fp32: [N, width]."""
    rank = a.shape[1] // sections
    out = torch.zeros(len(slots), width)
    begins = (0,) + tuple(ends[:-1])
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        for s in range(sections):
            v = a[slot, s * rank:(s + 1) * rank].float() @ x_rows[i].float()
            delta = b[slot, begins[s]:ends[s]].float() @ v
            scale = row_scale[i].item() if row_scale is not None else 1.0
            out[i, begins[s] + shifts[s]: ends[s] + shifts[s]] += scale * delta.cpu()
    return out


def problem(N=7, slots_count=3, sections=3, rank=16, in_features=200, outs=(64, 32, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, in_features, generator=g).to(DEV, torch.bfloat16)
    a = (torch.randn(slots_count, sections * rank, in_features, generator=g) / in_features**0.5).to(DEV, torch.bfloat16)
    b = (torch.randn(slots_count, sum(outs[:sections]), rank, generator=g) / rank).to(DEV, torch.bfloat16)
    slots = torch.tensor([(i % (slots_count + 1)) - 1 for i in range(N)], dtype=torch.int32, device=DEV)
    return x, a, b, slots


@pytest.mark.parametrize("N", [1, 7, 33])
def test_fused_sections_land_in_their_columns(N):
    """q (64 columns) and v (48) of a q/k/v output whose k (32 columns, between them) no adapter has."""
    x, a, b, slots = problem(N, sections=2, outs=(64, 48))
    ends, shifts, width = (64, 112), (0, 32), 144
    y = torch.randn(N, width, device=DEV).bfloat16()
    want = y.float().cpu() + oracle(x, a, b, slots, 2, ends, shifts, width)
    lora_expand(y, lora_shrink(x, a, slots, sections=2), b, slots, ends, shifts)
    assert torch.allclose(y.float().cpu(), want, atol=3e-2, rtol=1e-2)


def test_three_sections_and_a_column_slice():
    """All of q/k/v, written into a column slice of a wider tensor (a strided output)."""
    x, a, b, slots = problem(5)
    wide = torch.zeros(5, 200, device=DEV).bfloat16()
    y = wide[:, 10:154]
    lora_expand(y, lora_shrink(x, a, slots, sections=3), b, slots, (64, 96, 144), (0, 0, 0))
    want = oracle(x, a, b, slots, 3, (64, 96, 144), (0, 0, 0), 144)
    assert torch.allclose(y.float().cpu(), want, atol=3e-2, rtol=1e-2)
    assert wide[:, :10].abs().sum() == 0 and wide[:, 154:].abs().sum() == 0


def test_overwrite_mode_scale_and_gathered_rows():
    """Expert-LoRA shapes: fp32 output overwritten (zeros without a slot), rows read through an index or
    every K-th row, a per-row scale."""
    N, K = 9, 3
    x, a, b, slots = problem(N, sections=1, rank=8, in_features=300, outs=(40,))
    out = torch.full((N, 40), float("nan"), device=DEV)
    lora_expand(out, lora_shrink(x[: N // K], a, slots, x_row_div=K), b, slots, accumulate=False)
    assert torch.allclose(out.cpu(), oracle(x[torch.arange(N) // K], a, b, slots, 1, (40,), (0,), 40), atol=1e-3)
    index = torch.randperm(N).to(DEV)
    scale = torch.rand(N, device=DEV)
    y = torch.zeros(N, 40, device=DEV).bfloat16()
    lora_expand(y, lora_shrink(x, a, slots, x_index=index), b, slots, row_scale=scale)
    want = oracle(x[index], a, b, slots, 1, (40,), (0,), 40, row_scale=scale)
    assert torch.allclose(y.float().cpu(), want, atol=3e-2, rtol=1e-2)


# Triton's interpreter has no bf16 matrix product: there only fp32 runs.
@pytest.mark.parametrize("dtype", [torch.float32] + ([] if INTERPRETED else [torch.bfloat16]))
@pytest.mark.parametrize("rank", [8, 16, 32])
def test_sgmv_equals_per_row_kernels(dtype, rank):
    """Rows grouped by stack row (SGMV) against the per-row kernels, with rows of no group, groups of one
    row and groups spanning several tiles."""
    N, G, in_features, out = 300, 12, 200, 136
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(N, in_features, generator=g).to(DEV, dtype)
    a = (torch.randn(G, rank, in_features, generator=g) / in_features**0.5).to(DEV, dtype)
    b = (torch.randn(G, out, rank, generator=g) / rank).to(DEV, dtype)
    rows = torch.randint(-1, G - 1, (N,), generator=g)
    rows[:100] = 3  # one group over several tiles
    rows[100] = G - 1  # a group of one row
    rows = rows.to(DEV, torch.int32)
    y0 = torch.randn(N, out, device=DEV).to(dtype)
    want = y0.clone()
    lora_expand(want, lora_shrink(x, a, rows), b, rows)
    aligned = align_by_expert(torch.where(rows >= 0, rows.long(), G), G, SGMV_BLOCK_M)
    got = y0.clone()
    sgmv_lora(got, x, a, b, aligned.sorted_rows, aligned.block_expert)
    bound = 1e-4 if dtype == torch.float32 and INTERPRETED else 2e-2
    assert ((got.float() - want.float()).norm() / (want.float() - y0.float()).norm()).item() < bound
