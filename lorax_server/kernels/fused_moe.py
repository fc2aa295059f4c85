"""Triton fused MoE: the experts of `moe_experts` in two kernels, with no host synchronisation.

Oracle: `lorax_server.layers.moe.experts.moe_experts(..., linear_per_expert)`.

1. `align_by_expert` (one Triton program; torch ops for large batches): the T*K assignments sorted by expert, each expert's run
   padded to a multiple of BLOCK_M, in a buffer whose size is fixed by T, K and E alone (so the launch
   grid never depends on the routing and the whole thing can be captured in a CUDA graph).
2. `gate_up_kernel`: for a tile of BLOCK_M rows of one expert, both gate and up columns at once,
   writing silu(gate) * up: h [padded rows, F].
3. `down_kernel`: h @ w2[e].T scaled by each row's routing weight, written per assignment [T*K, H];
   the K rows of a token are then summed (deterministic, no atomics).
Tile shapes are chosen per token count from `MOE_TILE_CONFIGS` (measured on the device, see docs/PERF.md).
"""

import torch
import triton
import triton.language as tl

from lorax_server.layers.moe.alignment import Alignment, align_by_expert

# (max tokens, gate/up kernel tiles, down kernel tiles); a tile is (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
# num_stages). The first row whose bound is >= the token count is used. Chosen by `python -m bench.moe_layer
# --tune` on an H200 at Mixtral-8x7B shapes (2026-11-28, docs/logs/h200_run2_moe_tune.log): best of 56 shapes
# at 1, 16, 64, 256, 1024 and 4096 tokens. Above TRITON_MOE_MAX_TOKENS the MoE block uses grouped_mm instead.
MOE_TILE_CONFIGS = (
    (8, (16, 128, 128, 4, 3), (16, 128, 128, 4, 3)),
    (32, (32, 64, 128, 4, 3), (32, 64, 128, 4, 3)),
    (128, (16, 64, 128, 4, 4), (16, 64, 128, 4, 4)),
    (512, (64, 64, 64, 4, 4), (64, 64, 64, 4, 4)),
    (1 << 62, (128, 128, 64, 8, 3), (128, 128, 64, 8, 3)),
)


@triton.jit
def align_kernel(experts_ptr, sorted_rows_ptr, position_ptr, block_expert_ptr, n, padded_rows, num_blocks,
                 NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, N_PAD: tl.constexpr, FILL: tl.constexpr):
    """`align_by_expert` in one program: small batches spend more time launching its ~18 torch ops than
    computing them. Each assignment's place = its expert's padded start + its rank among that expert's."""
    i = tl.arange(0, N_PAD)
    real = i < n
    expert = tl.load(experts_ptr + i, mask=real, other=NUM_EXPERTS)
    for start in range(0, padded_rows, FILL):  # padding rows point one past the last assignment
        fill = start + tl.arange(0, FILL)
        tl.store(sorted_rows_ptr + fill, tl.zeros((FILL,), tl.int64) + n, mask=fill < padded_rows)
    tl.debug_barrier()
    position = tl.zeros((N_PAD,), tl.int32)
    padded_start = tl.sum(tl.zeros((N_PAD,), tl.int32), 0)  # an int32 scalar, as the loop keeps it
    b = tl.arange(0, N_PAD)  # row blocks (there are at most N_PAD of them)
    block_expert = tl.zeros((N_PAD,), tl.int32) - 1
    for e in tl.static_range(NUM_EXPERTS):  # unrolled: E is small
        mine = (expert == e).to(tl.int32)
        rank = tl.cumsum(mine, 0) - 1
        position = tl.where(mine > 0, padded_start + rank, position)
        padded_end = padded_start + (tl.sum(mine, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        block_expert = tl.where((b * BLOCK_M >= padded_start) & (b * BLOCK_M < padded_end), e, block_expert)
        padded_start = padded_end
    here = real & (expert < NUM_EXPERTS)  # an expert id of E: computed by another rank
    tl.store(position_ptr + i, position.to(tl.int64), mask=here)
    tl.store(sorted_rows_ptr + position, i.to(tl.int64), mask=here)
    tl.store(block_expert_ptr + b, block_expert, mask=b < num_blocks)


def align_by_expert_triton(experts: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """The same alignment as `align_by_expert`, in one kernel launch (for up to 8192 assignments)."""
    flat = experts.flatten()
    n = flat.numel()
    padded_rows = -(-(n + num_experts * (block_m - 1)) // block_m) * block_m
    num_blocks = padded_rows // block_m
    sorted_rows = torch.empty(padded_rows, dtype=torch.int64, device=flat.device)
    position = torch.empty(n, dtype=torch.int64, device=flat.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=flat.device)
    n_pad = max(16, triton.next_power_of_2(max(n, num_blocks)))
    align_kernel[(1,)](flat, sorted_rows, position, block_expert, n, padded_rows, num_blocks,
                       NUM_EXPERTS=num_experts, BLOCK_M=block_m, N_PAD=n_pad, FILL=1024, num_warps=4)
    return Alignment(sorted_rows, position, block_expert, padded_rows)


@triton.jit
def gate_up_kernel(x_ptr, w13_ptr, h_ptr, delta_ptr, sorted_rows_ptr, block_expert_ptr, num_assignments, top_k,
                   hidden, ffn, stride_x, stride_we, stride_wn, stride_h, stride_d,
                   HAS_DELTA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assignment = tl.load(sorted_rows_ptr + rows)
    real = assignment < num_assignments
    tokens = assignment // top_k
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < ffn
    ks = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + tokens[:, None] * stride_x + ks[None, :]
    w_base = w13_ptr + expert.to(tl.int64) * stride_we
    gate_tile = w_base + cols[None, :] * stride_wn + ks[:, None]
    up_tile = gate_tile + ffn * stride_wn
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = ks < hidden - k0
        a = tl.load(x_tile, mask=real[:, None] & k_ok[None, :], other=0.0)
        gate += tl.dot(a, tl.load(gate_tile, mask=k_ok[:, None] & col_ok[None, :], other=0.0))
        up += tl.dot(a, tl.load(up_tile, mask=k_ok[:, None] & col_ok[None, :], other=0.0))
        x_tile += BLOCK_K
        gate_tile += BLOCK_K
        up_tile += BLOCK_K
    if HAS_DELTA:  # expert LoRA: per-assignment deltas of the gate and up pre-activations
        delta = delta_ptr + assignment[:, None] * stride_d + cols[None, :]
        ok = real[:, None] & col_ok[None, :]
        gate += tl.load(delta, mask=ok, other=0.0).to(tl.float32)
        up += tl.load(delta + ffn, mask=ok, other=0.0).to(tl.float32)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def down_kernel(h_ptr, w2_ptr, out_ptr, weights_ptr, sorted_rows_ptr, block_expert_ptr, num_assignments, hidden, ffn,
                stride_h, stride_we, stride_wn, stride_out,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assignment = tl.load(sorted_rows_ptr + rows)
    real = assignment < num_assignments
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    h_tile = h_ptr + rows[:, None] * stride_h + ks[None, :]
    w_tile = w2_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, ffn, BLOCK_K):
        k_ok = ks < ffn - k0
        a = tl.load(h_tile, mask=real[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(a, tl.load(w_tile, mask=k_ok[:, None] & col_ok[None, :], other=0.0))
        h_tile += BLOCK_K
        w_tile += BLOCK_K
    weight = tl.load(weights_ptr + assignment, mask=real, other=0.0)
    acc = acc * weight[:, None]
    out = out_ptr + assignment[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=real[:, None] & col_ok[None, :])


def tile_config(num_tokens: int, element_size: int):
    """The tiles for this many tokens; 4-byte inputs (fp32) take half the K depth to fit shared memory."""
    gate_up, down = next((g, d) for bound, g, d in MOE_TILE_CONFIGS if num_tokens <= bound)
    if element_size > 2:
        gate_up, down = ((bm, bn, bk // 2, w, s) for bm, bn, bk, w, s in (gate_up, down))
    return gate_up, down


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing_weights: torch.Tensor,
              experts: torch.Tensor, configs=None, lora=None, elsewhere: bool = False) -> torch.Tensor:
    """x [T, H], w13 [E, 2F, H], w2 [E, H, F], routing_weights / experts [T, K] -> [T, H] (this rank's partial).

    SiLU gating, as Mixtral uses; `configs` overrides the tile table (for tuning). `lora`, when given (a
    StackedExpertLora), adds expert-LoRA deltas over the assignments in t * K + k order: the gate/up
    deltas enter the first kernel before the activation, the down deltas join each assignment's output
    with its routing weight. The expert weights are still read once. With `elsewhere`, an expert id of
    E marks an assignment another rank computes (expert parallelism): it is skipped and adds zero.
    """
    T, H = x.shape
    E, two_f, _ = w13.shape
    F, K = two_f // 2, experts.shape[1]
    (bm1, bn1, bk1, w1, s1), (bm2, bn2, bk2, w2_, s2) = configs or tile_config(T, x.element_size())
    assert bm1 == bm2, "both kernels walk the same padded row blocks"
    aligned = (align_by_expert_triton if T * K <= 8192 else align_by_expert)(experts, E, bm1)
    h = torch.empty(aligned.padded_rows, F, dtype=x.dtype, device=x.device)
    blocks = aligned.padded_rows // bm1
    delta = lora.deltas(x, "w13", x_row_div=K) if lora is not None else None  # [T*K, 2F] fp32
    gate_up_kernel[(blocks, triton.cdiv(F, bn1))](
        x, w13, h, delta if delta is not None else h, aligned.sorted_rows, aligned.block_expert, T * K, K, H, F,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0), delta.stride(0) if delta is not None else 0,
        HAS_DELTA=delta is not None, BLOCK_M=bm1, BLOCK_N=bn1, BLOCK_K=bk1, num_warps=w1, num_stages=s1)
    out = (torch.zeros if elsewhere else torch.empty)(T * K, H, dtype=x.dtype, device=x.device)  # skipped rows: 0
    weights = routing_weights.flatten().to(torch.float32).contiguous()
    down_kernel[(blocks, triton.cdiv(H, bn2))](
        h, w2, out, weights, aligned.sorted_rows, aligned.block_expert, T * K, H, F,
        h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        BLOCK_M=bm2, BLOCK_N=bn2, BLOCK_K=bk2, num_warps=w2_, num_stages=s2)
    if lora is not None:
        lora.add(out, h, "w2", row_scale=weights, x_index=aligned.position)
    return out.view(T, K, H).sum(dim=1)
