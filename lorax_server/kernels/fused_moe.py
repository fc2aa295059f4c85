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

FP8 experts (W8A8 e4m3: weights with an e4m3 `.weight` and its `.weight_scale`, as layers.fp8.Fp8Weight holds
them): x is quantized per token before step 2 and h per padded row before step 3 (`kernels/fp8_quant.py`);
both GEMMs multiply e4m3 by e4m3 into fp32 and apply the activation and weight scales in their epilogues; tiles from `MOE_FP8_TILE_CONFIGS`. FP8 oracle: the same arithmetic in float32 over
the dequantized weights (tests/gpu/test_fp8_kernels.py).
"""

import torch
import triton
import triton.language as tl

from lorax_server.kernels.fp8_quant import quantize_rows
from lorax_server.kernels.alignment import Alignment, align_by_expert

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
# The same for FP8 experts (W8A8 e4m3: a K step of 256 bytes is the bf16 table's 128 elements). Candidates
# taken from the shapes of vLLM's published H200 fp8_w8a8 table for E=8, N=14336 (BLOCK_M 16-128, BLOCK_K
# 128-256), halved in BLOCK_N where our gate/up kernel holds two accumulators; the best of
# `python -m bench.moe_layer --fp8 --tune` on an H200 (CUDA-graph replays, docs/logs/h200_fp8_run1_moe_fp8.log).
MOE_FP8_TILE_CONFIGS = (
    (8, (64, 128, 128, 4, 4), (64, 32, 256, 4, 4)),  # 1 token: 0.149 ms
    (128, (16, 64, 256, 4, 4), (16, 64, 256, 4, 4)),  # 16 / 64 tokens: 0.394 / 0.405 ms
    (512, (64, 128, 128, 8, 4), (64, 128, 128, 8, 4)),  # 256 tokens: 0.497 ms
    (1 << 62, (128, 128, 128, 8, 3), (128, 128, 128, 8, 3)),  # 1024 / 4096 tokens: 1.133 / 3.881 ms
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
def gate_up_kernel(x_ptr, w13_ptr, h_ptr, delta_ptr, x_scale_ptr, w_scale_ptr, sorted_rows_ptr, block_expert_ptr,
                   num_assignments, top_k, hidden, ffn, stride_x, stride_we, stride_wn, stride_h, stride_d, stride_se,
                   HAS_DELTA: tl.constexpr, X_SCALED: tl.constexpr, W_SCALED: tl.constexpr, UPCAST_W: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """FP8 (W8A8): x and w13 are e4m3, the dot accumulates in fp32 and the epilogue applies each token's
    scale and each output channel's; W8A16: w13 is e4m3, raised to x's dtype before the dot (UPCAST_W)."""
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
        g = tl.load(gate_tile, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.load(up_tile, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_W:
            g = g.to(a.dtype)
            u = u.to(a.dtype)
        gate += tl.dot(a, g)
        up += tl.dot(a, u)
        x_tile += BLOCK_K
        gate_tile += BLOCK_K
        up_tile += BLOCK_K
    if X_SCALED:  # each token's activation scale
        x_scale = tl.load(x_scale_ptr + tokens, mask=real, other=0.0)
        gate = gate * x_scale[:, None]
        up = up * x_scale[:, None]
    if W_SCALED:  # each output channel's weight scale, gate rows then up rows
        w_scale = w_scale_ptr + expert.to(tl.int64) * stride_se + cols
        gate = gate * tl.load(w_scale, mask=col_ok, other=0.0)[None, :]
        up = up * tl.load(w_scale + ffn, mask=col_ok, other=0.0)[None, :]
    if HAS_DELTA:  # expert LoRA: per-assignment deltas of the gate and up pre-activations
        delta = delta_ptr + assignment[:, None] * stride_d + cols[None, :]
        ok = real[:, None] & col_ok[None, :]
        gate += tl.load(delta, mask=ok, other=0.0).to(tl.float32)
        up += tl.load(delta + ffn, mask=ok, other=0.0).to(tl.float32)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def down_kernel(h_ptr, w2_ptr, out_ptr, weights_ptr, h_scale_ptr, w_scale_ptr, sorted_rows_ptr, block_expert_ptr,
                num_assignments, hidden, ffn, stride_h, stride_we, stride_wn, stride_out, stride_se,
                X_SCALED: tl.constexpr, W_SCALED: tl.constexpr, UPCAST_W: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scales as in `gate_up_kernel`; h's scales are per padded row."""
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
        b = tl.load(w_tile, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_W:
            b = b.to(a.dtype)
        acc += tl.dot(a, b)
        h_tile += BLOCK_K
        w_tile += BLOCK_K
    weight = tl.load(weights_ptr + assignment, mask=real, other=0.0)
    if X_SCALED:
        weight = weight * tl.load(h_scale_ptr + rows)
    acc = acc * weight[:, None]
    if W_SCALED:
        acc = acc * tl.load(w_scale_ptr + expert.to(tl.int64) * stride_se + cols, mask=col_ok, other=0.0)[None, :]
    out = out_ptr + assignment[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=real[:, None] & col_ok[None, :])


def tile_config(num_tokens: int, element_size: int, table=MOE_TILE_CONFIGS):
    """The tiles for this many tokens; 4-byte inputs (fp32) take half the K depth to fit shared memory."""
    gate_up, down = next((g, d) for bound, g, d in table if num_tokens <= bound)
    if element_size > 2:
        gate_up, down = ((bm, bn, bk // 2, w, s) for bm, bn, bk, w, s in (gate_up, down))
    return gate_up, down


def fused_moe(x: torch.Tensor, w13, w2, routing_weights: torch.Tensor, experts: torch.Tensor, configs=None,
              lora=None, elsewhere: bool = False, fp8_activations: bool = True) -> torch.Tensor:
    """x [T, H], w13 [E, 2F, H], w2 [E, H, F], routing_weights / experts [T, K] -> [T, H] (this rank's partial).

    SiLU gating, as Mixtral uses; `configs` overrides the tile table (for tuning). `lora`, when given (a
    StackedExpertLora), adds expert-LoRA deltas over the assignments in t * K + k order: the gate/up
    deltas enter the first kernel before the activation, the down deltas join each assignment's output
    with its routing weight. The expert weights are still read once. With `elsewhere`, an expert id of
    E marks an assignment another rank computes (expert parallelism): it is skipped and adds zero.

    FP8: w13 and w2 may be FP8 weights (e4m3, one scale per expert and output channel). Then x is quantized
    once per token and h once per assignment (each with its own scale, or the layer's static input scale),
    both GEMMs multiply e4m3 by e4m3 and apply the scales to the fp32 accumulators (W8A8); expert-LoRA deltas
    still see x and h in x's dtype. `fp8_activations=False` keeps the activations in x's dtype (W8A16).
    """
    fp8 = not isinstance(w13, torch.Tensor)  # an FP8 weight: e4m3 `.weight` and its `.weight_scale`
    scaled_x = fp8 and fp8_activations
    T, H = x.shape
    E, two_f, _ = w13.shape
    F, K = two_f // 2, experts.shape[1]
    table = MOE_FP8_TILE_CONFIGS if scaled_x else MOE_TILE_CONFIGS  # W8A16: x's tiles take the shared memory
    (bm1, bn1, bk1, w1, s1), (bm2, bn2, bk2, w2_, s2) = configs or tile_config(T, x.element_size(), table)
    assert bm1 == bm2, "both kernels walk the same padded row blocks"
    aligned = (align_by_expert_triton if T * K <= 8192 else align_by_expert)(experts, E, bm1)
    w13_q, w13_scale = (w13.weight, w13.weight_scale) if fp8 else (w13, None)
    w2_q, w2_scale = (w2.weight, w2.weight_scale) if fp8 else (w2, None)
    x_in, x_scale = quantize_rows(x, w13.input_scale) if scaled_x else (x, None)
    h = torch.empty(aligned.padded_rows, F, dtype=x.dtype, device=x.device)
    blocks = aligned.padded_rows // bm1
    delta = lora.deltas(x, "w13", x_row_div=K) if lora is not None else None  # [T*K, 2F] fp32
    gate_up_kernel[(blocks, triton.cdiv(F, bn1))](
        x_in, w13_q, h, h if delta is None else delta, h if x_scale is None else x_scale,
        h if w13_scale is None else w13_scale, aligned.sorted_rows, aligned.block_expert, T * K, K, H, F,
        x_in.stride(0), w13_q.stride(0), w13_q.stride(1), h.stride(0), 0 if delta is None else delta.stride(0),
        0 if w13_scale is None else w13_scale.stride(0),
        HAS_DELTA=delta is not None, X_SCALED=scaled_x, W_SCALED=fp8, UPCAST_W=fp8 and not scaled_x,
        BLOCK_M=bm1, BLOCK_N=bn1, BLOCK_K=bk1, num_warps=w1, num_stages=s1)
    h_in, h_scale = (quantize_rows(h, w2.input_scale, (aligned.block_expert, bm1)) if scaled_x else (h, None))
    out = (torch.zeros if elsewhere else torch.empty)(T * K, H, dtype=x.dtype, device=x.device)  # skipped rows: 0
    weights = routing_weights.flatten().to(torch.float32).contiguous()
    down_kernel[(blocks, triton.cdiv(H, bn2))](
        h_in, w2_q, out, weights, h if h_scale is None else h_scale, h if w2_scale is None else w2_scale,
        aligned.sorted_rows, aligned.block_expert, T * K, H, F,
        h_in.stride(0), w2_q.stride(0), w2_q.stride(1), out.stride(0), 0 if w2_scale is None else w2_scale.stride(0),
        X_SCALED=scaled_x, W_SCALED=fp8, UPCAST_W=fp8 and not scaled_x,
        BLOCK_M=bm2, BLOCK_N=bn2, BLOCK_K=bk2, num_warps=w2_, num_stages=s2)
    if lora is not None:
        lora.add(out, h, "w2", row_scale=weights, x_index=aligned.position)
    return out.view(T, K, H).sum(dim=1)
