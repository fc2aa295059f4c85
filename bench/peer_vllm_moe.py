"""A peer for the MoE benchmark: vLLM's fused-MoE design, rewritten here from its published description so the
comparison runs where vLLM is not installed (the GPU machines have no vllm). Benchmark code only: nothing in
`lorax_server` imports it.

What it reproduces (read in vllm/model_executor/layers/fused_moe/fused_moe.py and its H200 table
configs/E=8,N=14336,device_name=NVIDIA_H200.json; every line below is written for this repository):
- Alignment: the T*K assignments grouped by expert, each group padded to a multiple of BLOCK_SIZE_M, as
  sorted ids (T*K marks padding), the expert of each row block and the padded total. vLLM does it in one CUDA
  kernel; here one Triton program (`align`). Below 4 assignments per expert on average (T*K*4 <= E: one token
  of top-2 of 8) it skips the alignment: each row block is one (token, expert) pair, its id the pair's.
- One GEMM kernel for both projections: a flat grid over (row block, column block) in GROUP_SIZE_M
  swizzled order, an early exit past the padded total, rows gathered through the sorted ids; the second
  projection multiplies by the routing weight in its epilogue. While T < BLOCK_SIZE_M the grid only covers
  T*K row blocks (each non-empty block holds at least one assignment).
- Between the GEMMs: [T*K, 2F] -> silu(gate) * up [T*K, F] in one elementwise kernel; after: the top-k sum
  (`moe_sum`, here a torch sum over K).
- Tiles: the published H200 table for this shape, the entry whose token count is nearest to T, the same
  tile for both GEMMs.
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

# vLLM's tuned table for E=8, N=14336 (Mixtral-8x7B, unsharded) on an NVIDIA H200, bf16:
# tokens -> (BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M, num_warps, num_stages)
H200_TABLE = {
    1: (16, 128, 128, 16, 4, 5),
    2: (32, 64, 128, 1, 4, 5),
    4: (16, 64, 64, 1, 4, 5),
    8: (16, 128, 128, 1, 4, 5),
    16: (16, 64, 256, 16, 4, 3),
    24: (16, 128, 256, 16, 4, 2),
    32: (16, 128, 128, 16, 8, 3),
    48: (32, 128, 128, 16, 4, 3),
    64: (32, 128, 128, 64, 4, 3),
    96: (32, 128, 128, 64, 4, 3),
    128: (64, 128, 128, 1, 8, 4),
    256: (128, 256, 64, 1, 8, 4),
    512: (128, 256, 64, 16, 8, 4),
    1024: (128, 256, 64, 16, 8, 4),
    1536: (128, 256, 64, 16, 8, 4),
    2048: (128, 256, 64, 32, 8, 4),
    3072: (128, 256, 64, 16, 8, 4),
    4096: (128, 256, 64, 16, 8, 4),
}


def config_for(num_tokens: int):
    return H200_TABLE[min(H200_TABLE, key=lambda t: abs(t - num_tokens))]


class Aligned(NamedTuple):
    sorted_ids: Optional[torch.Tensor]  # [EM] assignment id per padded row (T*K: padding); None: one pair per block
    block_experts: torch.Tensor  # [EM / BLOCK_SIZE_M] expert of each row block (-1: unused)
    padded_total: torch.Tensor  # [1] int32: rows in use


@triton.jit
def align_kernel(ids_ptr, sorted_ptr, block_experts_ptr, total_ptr, numel, max_rows, max_blocks,
                 NUM_EXPERTS: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, NUMEL_PAD: tl.constexpr,
                 BLOCKS_PAD: tl.constexpr, FILL: tl.constexpr):
    """Counts per expert, padded starts by a running sum, then each assignment at start + rank in its expert."""
    offs = tl.arange(0, NUMEL_PAD)
    live = offs < numel
    ids = tl.load(ids_ptr + offs, mask=live, other=NUM_EXPERTS)
    for start in range(0, max_rows, FILL):
        fill = start + tl.arange(0, FILL)
        tl.store(sorted_ptr + fill, tl.zeros((FILL,), tl.int32) + numel, mask=fill < max_rows)
    tl.debug_barrier()
    blocks = tl.arange(0, BLOCKS_PAD)
    block_expert = tl.full((BLOCKS_PAD,), -1, tl.int32)
    where = tl.zeros((NUMEL_PAD,), tl.int32)
    start = tl.sum(tl.zeros((NUMEL_PAD,), tl.int32), 0)
    for e in tl.static_range(NUM_EXPERTS):
        hit = (ids == e).to(tl.int32)
        where = tl.where(hit > 0, start + tl.cumsum(hit, 0) - 1, where)
        end = start + tl.cdiv(tl.sum(hit, 0), BLOCK_SIZE_M) * BLOCK_SIZE_M
        block_expert = tl.where((blocks * BLOCK_SIZE_M >= start) & (blocks * BLOCK_SIZE_M < end), e, block_expert)
        start = end
    tl.store(sorted_ptr + where, offs, mask=live & (ids < NUM_EXPERTS))
    tl.store(block_experts_ptr + blocks, block_expert, mask=blocks < max_blocks)
    tl.store(total_ptr, start)


def align(topk_ids: torch.Tensor, block_size_m: int, num_experts: int) -> Aligned:
    numel = topk_ids.numel()
    if numel * 4 <= num_experts:  # one pair per row block, no alignment
        return Aligned(None, topk_ids.flatten().to(torch.int32), torch.full((1,), numel * block_size_m,
                                                                             dtype=torch.int32, device=topk_ids.device))
    max_rows = numel + num_experts * (block_size_m - 1)
    max_blocks = triton.cdiv(max_rows, block_size_m)
    sorted_ids = torch.empty(max_blocks * block_size_m, dtype=torch.int32, device=topk_ids.device)
    block_experts = torch.empty(max_blocks, dtype=torch.int32, device=topk_ids.device)
    total = torch.empty(1, dtype=torch.int32, device=topk_ids.device)
    align_kernel[(1,)](topk_ids.flatten(), sorted_ids, block_experts, total, numel, sorted_ids.numel(), max_blocks,
                       NUM_EXPERTS=num_experts, BLOCK_SIZE_M=block_size_m,
                       NUMEL_PAD=max(16, triton.next_power_of_2(numel)),
                       BLOCKS_PAD=max(16, triton.next_power_of_2(max_blocks)), FILL=1024, num_warps=4)
    return Aligned(sorted_ids, block_experts, total)


@triton.jit
def moe_gemm_kernel(a_ptr, b_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr, block_experts_ptr, total_ptr,
                    N, K, EM, num_valid, stride_am, stride_be, stride_bn, stride_cm,
                    top_k: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, ONE_PAIR_PER_BLOCK: tl.constexpr,
                    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
                    GROUP_SIZE_M: tl.constexpr):
    """C[id] = A[id // top_k] @ B[e].T (* routing weight) for the ids of each row block of expert e."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(EM, BLOCK_SIZE_M)
    blocks_n = tl.cdiv(N, BLOCK_SIZE_N)
    in_group = GROUP_SIZE_M * blocks_n
    first = pid // in_group * GROUP_SIZE_M
    rows_here = tl.minimum(blocks_m - first, GROUP_SIZE_M)
    pid_m = first + (pid % in_group) % rows_here
    pid_n = (pid % in_group) // rows_here
    if pid_m * BLOCK_SIZE_M >= tl.load(total_ptr):
        return
    r = tl.arange(0, BLOCK_SIZE_M).to(tl.int64)
    if ONE_PAIR_PER_BLOCK:
        ids = tl.where(r == 0, pid_m, num_valid).to(tl.int64)
    else:
        ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_SIZE_M + r).to(tl.int64)
    valid = ids < num_valid
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert == -1:
        return
    cols_b = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N).to(tl.int64)) % N
    ks = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = a_ptr + (ids // top_k)[:, None] * stride_am + ks[None, :]
    b_ptrs = b_ptr + expert * stride_be + cols_b[None, :] * stride_bn + ks[:, None]
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        left = K - k * BLOCK_SIZE_K
        a = tl.load(a_ptrs, mask=valid[:, None] & (ks[None, :] < left), other=0.0)
        b = tl.load(b_ptrs, mask=ks[:, None] < left, other=0.0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_SIZE_K
        b_ptrs += BLOCK_SIZE_K
    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(topk_weights_ptr + ids, mask=valid, other=0.0)[:, None]
    cols = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    tl.store(c_ptr + ids[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=valid[:, None] & (cols[None, :] < N))


@triton.jit
def silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=ok)


def gemm(a, b, c, topk_weights, aligned: Aligned, top_k: int, mul_weight: bool, config, num_valid: int):
    """One projection: a's row of assignment id i is i // top_k (top_k 1: a holds one row per assignment)."""
    bm, bn, bk, group, warps, stages = config
    em = aligned.block_experts.numel() * bm
    if a.shape[0] < bm:  # each non-empty block holds an assignment: at most rows * top_k blocks
        em = min(em, a.shape[0] * top_k * bm)
    n_out, k_in = b.shape[1], b.shape[2]
    grid = (triton.cdiv(em, bm) * triton.cdiv(n_out, bn),)
    one_pair = aligned.sorted_ids is None
    moe_gemm_kernel[grid](a, b, c, topk_weights, aligned.block_experts if one_pair else aligned.sorted_ids,
                          aligned.block_experts, aligned.padded_total, n_out, k_in, em, num_valid,
                          a.stride(0), b.stride(0), b.stride(1), c.stride(0),
                          top_k=top_k, MUL_ROUTED_WEIGHT=mul_weight, ONE_PAIR_PER_BLOCK=one_pair,
                          BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=group,
                          num_warps=warps, num_stages=stages)


def experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, aligned: Optional[Aligned] = None) -> torch.Tensor:
    """x [T, H], w1 [E, 2F, H] (gate rows then up rows), w2 [E, H, F], topk [T, K] -> [T, H]. `aligned`:
    the alignment computed beforehand (`align(topk_ids, config_for(T)[0], E)`), else computed here."""
    T, H = x.shape
    E, two_f, _ = w1.shape
    top_k = topk_ids.shape[1]
    config = config_for(T)
    if aligned is None:
        aligned = align(topk_ids, config[0], E)
    weights = topk_weights.flatten().to(torch.float32)
    gate_up = torch.empty(T * top_k, two_f, dtype=x.dtype, device=x.device)
    gemm(x, w1, gate_up, weights, aligned, top_k, False, config, T * top_k)
    h = torch.empty(T * top_k, two_f // 2, dtype=x.dtype, device=x.device)
    silu_and_mul_kernel[(T * top_k, triton.cdiv(two_f // 2, 1024))](gate_up, h, two_f // 2, gate_up.stride(0),
                                                                    h.stride(0), BLOCK=1024, num_warps=4)
    out = torch.empty(T * top_k, H, dtype=x.dtype, device=x.device)
    gemm(h, w2, out, weights, aligned, 1, True, config, T * top_k)
    return out.view(T, top_k, H).sum(dim=1)
