"""Triton kernels and the CUDA attention ops against the pure-PyTorch references (bf16 bounds: 1e-2)."""

import pytest
import torch
import torch.nn.functional as F

from tests.gpu.conftest import relative_error, skip_without_gpu

skip_without_gpu()

from lorax_server.kernels.fused_moe import MOE_TILE_CONFIGS, align_by_expert, align_by_expert_triton, fused_moe
from lorax_server.kernels.paged_attention import paged_decode_attention, write_kv
from lorax_server.kernels.rmsnorm import add_rms_norm
from lorax_server.layers.attention import cuda as cuda_attention
from lorax_server.layers.attention import reference
from lorax_server.layers.moe import Routing, dispatch, linear_per_expert, moe_experts, route
from lorax_server.layers.moe.experts import linear_grouped_mm
from lorax_server.layers.rmsnorm import rms_norm_reference
from lorax_server.utils.attention.common import Seqlen

pytestmark = pytest.mark.gpu
DEV = "cuda"


def moe_problem(T, E=8, H=512, Fn=768, K=2, skew=False, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(T, H, device=DEV, generator=g).bfloat16()
    w13 = (torch.randn(E, 2 * Fn, H, device=DEV, generator=g) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, Fn, device=DEV, generator=g) / Fn**0.5).bfloat16()
    logits = torch.randn(T, E, device=DEV, generator=g)
    if skew:
        logits[:, :2] += 8.0  # experts 2.. get (almost) no token
    return x, w13, w2, route(logits, K)


@pytest.mark.parametrize("T", [1, 3, 16, 64, 333, 2048])
@pytest.mark.parametrize("skew", [False, True])
def test_fused_moe_matches_reference(T, skew):
    x, w13, w2, routing = moe_problem(T, skew=skew, seed=T)
    want = moe_experts(x.float(), w13.float(), w2.float(), dispatch(routing, 8), F.silu, linear_per_expert)
    out = fused_moe(x, w13, w2, routing.weights, routing.experts)
    assert relative_error(out, want) < 1e-2
    grouped = moe_experts(x, w13, w2, dispatch(routing, 8), F.silu, linear_grouped_mm)
    assert relative_error(grouped, want) < 1e-2


@pytest.mark.parametrize("configs", [row[1:] for row in MOE_TILE_CONFIGS])
def test_every_tile_config_is_correct(configs):
    x, w13, w2, routing = moe_problem(100, H=256, Fn=384)
    want = moe_experts(x.float(), w13.float(), w2.float(), dispatch(routing, 8), F.silu, linear_per_expert)
    assert relative_error(fused_moe(x, w13, w2, routing.weights, routing.experts, configs=configs), want) < 1e-2


def test_fused_moe_with_an_expert_nobody_chose_and_one_expert_everyone_chose():
    x, w13, w2, _ = moe_problem(50)
    routing = route(torch.full((50, 8), -1e4, device=DEV).index_fill_(1, torch.tensor([5], device=DEV), 0.0), 1)
    want = moe_experts(x.float(), w13.float(), w2.float(), dispatch(routing, 8), F.silu, linear_per_expert)
    assert relative_error(fused_moe(x, w13, w2, routing.weights, routing.experts), want) < 1e-2


@pytest.mark.parametrize("T, K, E, block_m", [(1, 2, 8, 16), (37, 2, 8, 32), (512, 2, 8, 64), (4096, 2, 8, 128)])
def test_one_program_alignment_equals_the_torch_one(T, K, E, block_m):
    experts = torch.randint(0, E, (T, K), device=DEV)
    experts[:, 0] %= 2  # skewed: some experts get nothing
    want, got = align_by_expert(experts, E, block_m), align_by_expert_triton(experts, E, block_m)
    assert torch.equal(got.sorted_rows, want.sorted_rows) and torch.equal(got.position, want.position)
    assert torch.equal(got.block_expert.long(), want.block_expert.long()) and got.padded_rows == want.padded_rows


@pytest.mark.parametrize("T", [3, 64, 5000])  # 5000 tokens: the torch alignment (over 8192 assignments)
def test_fused_moe_skips_the_assignments_of_other_ranks(T):
    """Expert parallelism, rank 0 of 2: experts 0-3 here, id 4 marks the others' assignments. The oracle
    is the full MoE restricted to local experts (the dispatch computes the others with weight 0)."""
    x, w13, w2, routing = moe_problem(T, seed=T)
    here = routing.experts < 4
    local = Routing(routing.weights, torch.where(here, routing.experts, 4), elsewhere=True)
    masked = Routing(torch.where(here, routing.weights, 0.0), torch.where(here, routing.experts, 0))
    want = moe_experts(x.float(), w13[:4].float(), w2[:4].float(), dispatch(masked, 4), F.silu, linear_per_expert)
    via_dispatch = moe_experts(x.float(), w13[:4].float(), w2[:4].float(), dispatch(local, 4), F.silu,
                               linear_per_expert)
    assert torch.equal(via_dispatch, want)
    got = fused_moe(x, w13[:4], w2[:4], local.weights, local.experts, elsewhere=True)
    assert relative_error(got, want) < 1e-2


def paged_problem(lengths, block_size, KVH=8, H=32, D=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks_needed) + 7
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lengths), max(blocks_needed), dtype=torch.int32)
    slots = []
    for b, (n, nb) in enumerate(zip(lengths, blocks_needed)):
        blocks = [free.pop() for _ in range(nb)]
        tables[b, :nb] = torch.tensor(blocks)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(n)]
    cache = [torch.randn(num_blocks, block_size, KVH, D, generator=g).bfloat16().to(DEV) for _ in range(2)]
    k = torch.randn(sum(lengths), KVH, D, generator=g).bfloat16().to(DEV)
    v = torch.randn(sum(lengths), KVH, D, generator=g).bfloat16().to(DEV)
    return cache, tables.to(DEV), torch.tensor(slots, device=DEV), k, v


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("window", [None, 100])
def test_paged_decode_matches_reference(block_size, window):
    lengths = [1, 37, 700, 2049]
    (kc, vc), tables, slots, k, v = paged_problem(lengths, block_size)
    write_kv(k, v, kc, vc, slots)
    q = torch.randn(len(lengths), 32, 128, device=DEV).bfloat16()
    seqlen = Seqlen(torch.ones(len(lengths), dtype=torch.int32, device=DEV),
                    torch.tensor(lengths, dtype=torch.int32, device=DEV) - 1)
    want = reference.paged_attention(q.float(), kc.float(), vc.float(), tables, seqlen, 128**-0.5, window)
    got = paged_decode_attention(q, kc, vc, tables, seqlen.total_lengths.int(), max(lengths), 128**-0.5, window)
    assert relative_error(got, want) < 1e-2


def test_paged_decode_and_write_kv_take_strided_views_of_the_rotated_q_and_k():
    """The model rotates q and k in one tensor [T, H + KVH, D] and hands the kernels views of it."""
    lengths = [5, 300, 1]
    (kc, vc), tables, slots, k, v = paged_problem(lengths, 16)
    q_and_k = torch.randn(len(lengths), 32 + 8, 128, device=DEV).bfloat16()
    q, k_last = q_and_k.split([32, 8], dim=1)
    seqlen = Seqlen(torch.ones(len(lengths), dtype=torch.int32, device=DEV),
                    torch.tensor(lengths, dtype=torch.int32, device=DEV) - 1)
    last = torch.tensor(lengths, device=DEV).cumsum(0) - 1  # each sequence's newest token: written from k_last
    kr, vr = kc.clone(), vc.clone()
    reference.write_kv(k.index_copy(0, last, k_last), v, kr, vr, slots)
    write_kv(k, v, kc, vc, slots)
    write_kv(k_last, v[last], kc, vc, slots[last])
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    want = reference.paged_attention(q.float(), kc.float(), vc.float(), tables, seqlen, 128**-0.5, None)
    got = paged_decode_attention(q, kc, vc, tables, seqlen.total_lengths.int(), max(lengths), 128**-0.5, None)
    assert relative_error(got, want) < 1e-2


def test_write_kv_matches_reference_and_skips_padding():
    (kc, vc), _, slots, k, v = paged_problem([5, 40], 16)
    slots[3] = -1
    kr, vr = kc.clone(), vc.clone()
    reference.write_kv(k, v, kr, vr, slots)
    write_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@pytest.mark.parametrize("window", [None, 64])
def test_cuda_prefill_matches_reference(window):
    lengths = [300, 1, 129]
    cu = torch.tensor([0, 300, 301, 430], dtype=torch.int32, device=DEV)
    q = torch.randn(430, 32, 128, device=DEV).bfloat16()
    k, v = (torch.randn(430, 8, 128, device=DEV).bfloat16() for _ in range(2))
    want = reference.prefill_attention(q.float(), k.float(), v.float(), cu, max(lengths), 128**-0.5, window)
    got = cuda_attention.prefill_attention(q, k, v, cu, max(lengths), 128**-0.5, window)
    assert relative_error(got, want) < 1e-2


@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_reference_and_keeps_inputs(with_residual):
    x = torch.randn(77, 4096, device=DEV).bfloat16()
    residual = torch.randn_like(x) if with_residual else None
    weight = torch.randn(4096, device=DEV).bfloat16()
    before = x.clone()
    normed, summed = add_rms_norm(x, weight, 1e-5, residual)
    want_sum = x.float() + (residual.float() if with_residual else 0)
    assert relative_error(summed, want_sum) < 1e-2 and torch.equal(x, before)
    assert relative_error(normed, rms_norm_reference(want_sum, weight.float(), 1e-5)) < 1e-2
