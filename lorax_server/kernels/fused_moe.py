"""Triton fused MoE: the experts of `moe_experts` in two kernels, with no host synchronisation.

Oracle: `lorax_server.layers.moe.experts.moe_experts(..., linear_per_expert)`.

1. `gate_up_kernel`: a tile of rows of one expert against both its gate and up columns at once, writing
   silu(gate) * up: h [rows, F] (no [rows, 2F] intermediate, no activation launch).
2. `down_kernel`: h @ w2[e].T scaled by each assignment's routing weight.

The T*K (token, expert) assignments reach the programs in one of two layouts, chosen per token count by the
tile table (`MOE_TILE_CONFIGS`):
- pairs (a tile's block_m is 1; a few tokens): no alignment at all. Each program of step 1 takes one
  assignment as it comes, each program of step 2 one token and sums its K assignments itself, so one
  token's MoE is two launches. (A tile still has 16 rows, the least a tensor-core dot takes; one is live.)
- sorted: `align_by_expert` (one Triton program; torch ops above 8192 assignments) groups the assignments by
  expert, each group padded to a multiple of BLOCK_M, in a buffer whose size depends on T, K and E alone (so
  the grid never depends on the routing and the step can be captured in a CUDA graph). Programs take
  GROUP_M row blocks at a time across the columns (a column block of an expert's weights is read by all the
  expert's row blocks together, from L2); the K rows of a token are summed after step 2 (deterministic, no
  atomics).

Expert LoRA (`lora`, a StackedExpertLora): the shrinks v = A @ x are one small launch each (`lora_shrink_kernel`,
one program per assignment and 512 columns, so a single token's shrink is not one long serial loop); the
expands B @ v run inside steps 1 and 2 on the accumulators, as tensor-core dots over the B of the adapters
present in the tile (`add_lora`). No [T*K, 2F] delta buffer, no per-row loop.

FP8 experts (W8A8 e4m3: weights with an e4m3 `.weight` and its `.weight_scale`, as layers.fp8.Fp8Weight holds
them): x is quantized per token before step 1 and h per row before step 2 (`kernels/fp8_quant.py`);
both GEMMs multiply e4m3 by e4m3 into fp32 and apply the activation and weight scales in their epilogues; tiles
from `MOE_FP8_TILE_CONFIGS`. FP8 oracle: the same arithmetic in float32 over the dequantized weights
(tests/gpu/test_fp8_kernels.py).
"""

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lorax_server.kernels.alignment import Alignment, align_by_expert, padded_size
from lorax_server.kernels.fp8_quant import quantize_rows


class Tile(NamedTuple):
    """One kernel's launch shape. block_m 1 means the pairs layout (see the module docstring); group_m is how
    many row blocks sweep the column blocks together (the default: all of them, row blocks fastest)."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    group_m: int = 1024


DOT_M = 16  # rows of a pairs-layout tile: the smallest tensor-core dot
# Integers that change from step to step. Triton compiles a kernel per class of each integer argument (1, a
# multiple of 16, other), so a batch of a new size could wait seconds for a compile in serving (found on an H200 by
# tests/gpu/test_engine_on_gpu.py after the warm-up); these only bound masks and loops, where the class gains nothing.
ALIGN_PER_STEP_INTS = ["n", "padded_rows", "num_blocks"]
GEMM_PER_STEP_INTS = ["num_m", "num_assignments", "lora_slots", "lora_experts"]

# (max tokens, gate/up kernel tile, down kernel tile), tiles as `Tile` fields; the first row whose bound is >= the
# token count is used. Both tiles of a row share block_m.
# tune-table-begin
# Chosen by `python -m bench.moe_layer --tune --write` on an NVIDIA H200, 2026-11-28, at Mixtral-8x7B shapes
# (bf16, CUDA-graph replays of the whole fused_moe call, routing given; log docs/logs/moe_tune_s5_h200.log).
# Measured, tokens: ms: 1: 0.170, 4: 0.331, 8: 0.486, 16: 0.562, 64: 0.649, 256: 0.717, 1024: 1.564, 4096: 5.603.
MOE_TILE_CONFIGS = (
    (2, (1, 32, 64, 4, 3, 1024), (1, 32, 512, 4, 4, 1024)),
    (5, (16, 64, 128, 4, 5, 1024), (16, 64, 128, 4, 5, 1024)),
    (11, (16, 128, 128, 4, 4, 1024), (16, 64, 128, 4, 4, 1024)),
    (32, (16, 128, 128, 4, 3, 1024), (16, 128, 256, 4, 3, 1024)),
    (128, (32, 128, 128, 4, 3, 1024), (32, 128, 128, 4, 3, 1024)),
    (512, (128, 128, 64, 8, 4, 1024), (128, 256, 64, 8, 4, 1024)),
    (2048, (128, 128, 64, 8, 3, 16), (128, 256, 64, 8, 4, 16)),
    (1 << 62, (128, 128, 64, 8, 4, 1024), (128, 256, 64, 8, 4, 16)),
)
# tune-table-end
# fp8-tune-table-begin
# Chosen by `python -m bench.moe_layer --fp8 --tune --write` on an NVIDIA H200, 2026-11-28, at Mixtral-8x7B shapes
# (FP8 W8A8 e4m3 experts, CUDA-graph replays of the whole fused_moe call, routing given; log
# docs/logs/moe_fp8_tune_s8_run6_h200.log).
# Measured, tokens: ms: 1: 0.112, 16: 0.349, 64: 0.362, 256: 0.416, 512: 0.535, 1024: 0.820, 4096: 2.890.
MOE_FP8_TILE_CONFIGS = (
    (4, (1, 32, 128, 4, 3, 1024), (1, 32, 1024, 4, 3, 1024)),
    (32, (16, 32, 256, 4, 4, 1024), (16, 128, 256, 4, 4, 1024)),
    (128, (32, 64, 256, 4, 3, 1024), (32, 128, 256, 4, 3, 1024)),
    (362, (128, 128, 128, 8, 4, 1024), (128, 256, 128, 8, 4, 1024)),
    (724, (128, 128, 128, 8, 4, 16), (128, 256, 128, 8, 4, 8)),
    (2048, (128, 128, 128, 8, 4, 1024), (128, 256, 128, 8, 4, 1024)),
    (1 << 62, (128, 128, 128, 8, 4, 16), (128, 256, 128, 8, 4, 16)),
)
# fp8-tune-table-end


@triton.jit(do_not_specialize=ALIGN_PER_STEP_INTS)
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
    padded_rows = padded_size(n, num_experts, block_m)
    num_blocks = padded_rows // block_m
    sorted_rows = torch.empty(padded_rows, dtype=torch.int64, device=flat.device)
    position = torch.empty(n, dtype=torch.int64, device=flat.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=flat.device)
    n_pad = max(16, triton.next_power_of_2(max(n, num_blocks)))
    align_kernel[(1,)](flat, sorted_rows, position, block_expert, n, padded_rows, num_blocks,
                       NUM_EXPERTS=num_experts, BLOCK_M=block_m, N_PAD=n_pad, FILL=1024, num_warps=4)
    return Alignment(sorted_rows, position, block_expert, padded_rows)


@triton.jit
def tile_of(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block): GROUP_M row blocks at a time, row blocks fastest."""
    per_group = GROUP_M * num_n
    first_m = pid // per_group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + pid % per_group % group_rows, pid % per_group // group_rows


@triton.jit
def rows_of(pid_m, sorted_rows_ptr, block_expert_ptr, experts_ptr, num_assignments,
            PAIRS: tl.constexpr, BLOCK_M: tl.constexpr):
    """A program's expert and rows: each row's assignment (num_assignments for none) and its row of h."""
    i = tl.arange(0, BLOCK_M)
    if PAIRS:  # row 0 is assignment pid_m, h row pid_m; the other rows are empty
        expert = tl.load(experts_ptr + pid_m).to(tl.int32)
        assignment = tl.where(i == 0, pid_m, num_assignments).to(tl.int64)
        h_rows = assignment
    else:
        expert = tl.load(block_expert_ptr + pid_m)
        h_rows = (pid_m * BLOCK_M + i).to(tl.int64)
        assignment = tl.load(sorted_rows_ptr + h_rows)
    return expert, assignment, h_rows


@triton.jit
def short_block(pid_m, num_m, sorted_rows_ptr, num_assignments, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr):
    """Whether row block pid_m exists and holds at most TAIL_M assignments (an expert's rows come first in its
    blocks, the padding after them, so row TAIL_M tells)."""
    row = tl.load(sorted_rows_ptr + pid_m * BLOCK_M + TAIL_M, mask=pid_m < num_m, other=0)
    return (pid_m < num_m) & (row >= num_assignments)


@triton.jit
def same_expert(pid_m, expert, num_m, block_expert_ptr):
    """Whether row block pid_m exists and belongs to `expert`."""
    inside = (pid_m >= 0) & (pid_m < num_m)
    return inside & (tl.load(block_expert_ptr + pid_m, mask=inside, other=-1) == expert)


@triton.jit
def merged_into_previous(pid_m, expert, num_m, block_expert_ptr, sorted_rows_ptr, num_assignments,
                         BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr):
    """TAIL_M: row block pid_m is its expert's last, holds at most TAIL_M rows and follows another block of its
    expert, whose program computes these rows too (`takes_tail`)."""
    return same_expert(pid_m - 1, expert, num_m, block_expert_ptr) & \
        short_block(pid_m, num_m, sorted_rows_ptr, num_assignments, BLOCK_M, TAIL_M)


@triton.jit
def takes_tail(pid_m, expert, num_m, block_expert_ptr, sorted_rows_ptr, num_assignments,
               BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr):
    """TAIL_M: the next row block is merged into this one (`merged_into_previous` of it, seen from here): it is
    `expert`'s too, and short. (A short block of another expert runs alone: its rows need its own weights.)"""
    return same_expert(pid_m + 1, expert, num_m, block_expert_ptr) & \
        short_block(pid_m + 1, num_m, sorted_rows_ptr, num_assignments, BLOCK_M, TAIL_M)


@triton.jit
def rows_times_weights(a_ptr, a_rows, a_real, t_rows, t_real, w_tile, depth, stride_a,
                       EVEN_K: tl.constexpr, UPCAST_W: tl.constexpr, ROWS: tl.constexpr, TAIL: tl.constexpr,
                       COLS: tl.constexpr, BLOCK_K: tl.constexpr):
    """a[a_rows] @ W.T over `depth` ([ROWS, COLS] fp32; rows not real read as zeros), W's tile at K step 0 being
    `w_tile` ([BLOCK_K, COLS] pointers); with TAIL rows, a[t_rows] @ W.T too, from the same weight tiles (an
    expert's few last rows without a program, and a weight read, of their own). Returns (acc, tail acc)."""
    ks = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + a_rows[:, None] * stride_a + ks[None, :]
    acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
    if TAIL > 0:
        t_tile = a_ptr + t_rows[:, None] * stride_a + ks[None, :]
        acc_t = tl.zeros((TAIL, COLS), dtype=tl.float32)
    else:
        acc_t = tl.zeros((16, COLS), dtype=tl.float32)  # unused (dead code once compiled): any shape does
    for k0 in range(0, depth, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_tile, mask=a_real[:, None], other=0.0)
            w = tl.load(w_tile)
        else:
            k_ok = ks < depth - k0
            a = tl.load(a_tile, mask=a_real[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_tile, mask=k_ok[:, None], other=0.0)
        if UPCAST_W:
            w = w.to(a.dtype)
        acc = tl.dot(a, w, acc)
        if TAIL > 0:
            if EVEN_K:
                t = tl.load(t_tile, mask=t_real[:, None], other=0.0)
            else:
                t = tl.load(t_tile, mask=t_real[:, None] & k_ok[None, :], other=0.0)
            acc_t = tl.dot(t, w, acc_t)
            t_tile += BLOCK_K
        a_tile += BLOCK_K
        w_tile += BLOCK_K
    return acc, acc_t


@triton.jit
def add_lora(acc, v_ptr, stack_rows_ptr, b_ptr, assignment, real, b_cols, num_slots, stack_experts, stride_v,
             stride_lb, stride_lbn, RANK: tl.constexpr, RANK_PAD: tl.constexpr, SLOTS: tl.constexpr):
    """acc [M, N] += each row's v [RANK_PAD] @ B[its stack row][b_cols].T, B [slots * stack_experts, out, RANK].

    The rows of a tile share one expert, so their stack rows differ only by adapter slot: v is spread into
    [M, SLOTS * RANK_PAD] (row i's v in the columns of its slot, zeros elsewhere) and multiplied by the B of
    SLOTS consecutive slots of that expert stacked along K, one tensor-core dot per SLOTS slots, over the
    slots present in the tile (a single adapter: one dot of depth RANK_PAD). No per-row loop."""
    stack_rows = tl.load(stack_rows_ptr + assignment, mask=real, other=-1)
    live = stack_rows >= 0
    slot = tl.where(live, stack_rows // stack_experts, -1)
    expert = tl.max(tl.where(live, stack_rows % stack_experts, 0), 0)  # the tile's expert, as the stacks number it
    first = tl.min(tl.where(live, slot, num_slots), 0)
    last = tl.max(slot, 0)
    c = tl.arange(0, SLOTS * RANK_PAD)
    c_rank = c % RANK_PAD
    for s0 in tl.range(first, last + 1, SLOTS, num_stages=1):  # not pipelined: its tiles would not fit
        c_slot = s0 + c // RANK_PAD
        v = tl.load(v_ptr + assignment[:, None] * stride_v + c_rank[None, :],
                    mask=(slot[:, None] == c_slot[None, :]) & real[:, None], other=0.0)  # [M, SLOTS * RANK_PAD]
        b_rows = (c_slot * stack_experts + expert).to(tl.int64)
        b = tl.load(b_ptr + b_rows[:, None] * stride_lb + b_cols[None, :] * stride_lbn + c_rank[:, None],
                    mask=((c_slot < num_slots) & (c_rank < RANK))[:, None], other=0.0)  # [SLOTS * RANK_PAD, N]
        acc = tl.dot(v.to(b.dtype), b, acc)
    return acc


@triton.jit
def lora_shrink_kernel(x_ptr, a_ptr, stack_rows_ptr, x_rows_ptr, out_ptr, in_features, x_row_div,
                       stride_x, stride_as, stride_ar, stride_op, stride_on,
                       HAS_X_ROWS: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[part, i] = A[stack row of i][:, part's BLOCK_K columns] @ x[row of i][same columns] (fp32, zeros
    without LoRA): one program per (row, part), so few rows still fill the GPU; the parts are summed after."""
    i, part = tl.program_id(0), tl.program_id(1)
    stack_row = tl.load(stack_rows_ptr + i)
    r = tl.arange(0, RANK_PAD)
    k = part * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((RANK_PAD, BLOCK_K), tl.float32)
    if stack_row >= 0:
        if HAS_X_ROWS:
            x_row = tl.load(x_rows_ptr + i)
        else:
            x_row = i // x_row_div
        ok = k < in_features
        x = tl.load(x_ptr + x_row.to(tl.int64) * stride_x + k, mask=ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + stack_row.to(tl.int64) * stride_as + r[:, None] * stride_ar + k[None, :],
                    mask=(r < RANK)[:, None] & ok[None, :], other=0.0).to(tl.float32)
        acc = a * x[None, :]
    tl.store(out_ptr + part * stride_op + i * stride_on + r, tl.sum(acc, 1))


@triton.jit(do_not_specialize=GEMM_PER_STEP_INTS)
def gate_up_kernel(x_ptr, w13_ptr, h_ptr, x_scale_ptr, w_scale_ptr, sorted_rows_ptr, block_expert_ptr, experts_ptr,
                   lora_v_ptr, lora_rows_ptr, lora_b_ptr, num_m, num_assignments, hidden, ffn, lora_slots,
                   lora_experts, stride_x, stride_we, stride_wn, stride_h, stride_se, stride_lv, stride_lb, stride_lbn,
                   TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr, PAIRS: tl.constexpr, EVEN_K: tl.constexpr,
                   LORA_RANK: tl.constexpr, LORA_RANK_PAD: tl.constexpr, LORA_SLOTS: tl.constexpr,
                   X_SCALED: tl.constexpr, W_SCALED: tl.constexpr, UPCAST_W: tl.constexpr, TAIL_M: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One dot of width 2 * BLOCK_N per K step: the weight tile's column 2j is gate row j of the block, column
    2j + 1 up row j (ffn rows further), so the accumulator splits into gate and up in registers. (Two dots of
    width BLOCK_N keep Hopper's wgmma from overlapping one step with the next.)

    FP8 (W8A8): x and w13 are e4m3, the dot accumulates in fp32 and the epilogue applies each token's
    scale and each output channel's; W8A16: w13 is e4m3, raised to x's dtype before the dot (UPCAST_W)."""
    pid_m, pid_n = tile_of(tl.program_id(0), num_m, tl.cdiv(ffn, BLOCK_N), GROUP_M)
    expert, assignment, h_rows = rows_of(pid_m, sorted_rows_ptr, block_expert_ptr, experts_ptr, num_assignments,
                                         PAIRS, BLOCK_M)
    if (expert < 0) | (expert >= NUM_EXPERTS):  # a row block past the last, or another rank's assignment
        return
    if TAIL_M > 0:
        if merged_into_previous(pid_m, expert, num_m, block_expert_ptr, sorted_rows_ptr, num_assignments,
                                BLOCK_M, TAIL_M):
            return
    real = assignment < num_assignments
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c2 = tl.arange(0, 2 * BLOCK_N)
    # w13 rows of the wide tile, always in bounds (wrapped columns are not stored): no mask on the weights
    w_rows = (pid_n * BLOCK_N + c2 // 2) % ffn + (c2 % 2) * ffn
    ks = tl.arange(0, BLOCK_K)
    w_tile = w13_ptr + expert.to(tl.int64) * stride_we + w_rows[None, :] * stride_wn + ks[:, None]
    if TAIL_M > 0:
        if takes_tail(pid_m, expert, num_m, block_expert_ptr, sorted_rows_ptr, num_assignments, BLOCK_M, TAIL_M):
            t_h_rows = ((pid_m + 1) * BLOCK_M + tl.arange(0, TAIL_M)).to(tl.int64)
            t_assignment = tl.load(sorted_rows_ptr + t_h_rows).to(tl.int64)
            t_real = t_assignment < num_assignments
            acc, acc_t = rows_times_weights(x_ptr, assignment // TOP_K, real, t_assignment // TOP_K, t_real, w_tile,
                                            hidden, stride_x, EVEN_K, UPCAST_W, BLOCK_M, TAIL_M, 2 * BLOCK_N, BLOCK_K)
            gate_up_store(acc_t, h_ptr, x_scale_ptr, w_scale_ptr, lora_v_ptr, lora_rows_ptr, lora_b_ptr, expert,
                          t_assignment, t_h_rows, t_real, cols, w_rows, ffn, lora_slots, lora_experts, stride_h,
                          stride_se, stride_lv, stride_lb, stride_lbn, TOP_K, PAIRS, LORA_RANK, LORA_RANK_PAD,
                          LORA_SLOTS, X_SCALED, W_SCALED, TAIL_M, BLOCK_N)
        else:
            acc, _ = rows_times_weights(x_ptr, assignment // TOP_K, real, assignment, real, w_tile, hidden, stride_x,
                                        EVEN_K, UPCAST_W, BLOCK_M, 0, 2 * BLOCK_N, BLOCK_K)
    else:
        acc, _ = rows_times_weights(x_ptr, assignment // TOP_K, real, assignment, real, w_tile, hidden, stride_x,
                                    EVEN_K, UPCAST_W, BLOCK_M, 0, 2 * BLOCK_N, BLOCK_K)
    gate_up_store(acc, h_ptr, x_scale_ptr, w_scale_ptr, lora_v_ptr, lora_rows_ptr, lora_b_ptr, expert, assignment,
                  h_rows, real, cols, w_rows, ffn, lora_slots, lora_experts, stride_h, stride_se, stride_lv, stride_lb,
                  stride_lbn, TOP_K, PAIRS, LORA_RANK, LORA_RANK_PAD, LORA_SLOTS, X_SCALED, W_SCALED, BLOCK_M, BLOCK_N)


@triton.jit
def gate_up_store(acc, h_ptr, x_scale_ptr, w_scale_ptr, lora_v_ptr, lora_rows_ptr, lora_b_ptr, expert, assignment,
                  h_rows, real, cols, w_rows, ffn, lora_slots, lora_experts, stride_h, stride_se, stride_lv, stride_lb,
                  stride_lbn, TOP_K: tl.constexpr, PAIRS: tl.constexpr, LORA_RANK: tl.constexpr,
                  LORA_RANK_PAD: tl.constexpr, LORA_SLOTS: tl.constexpr, X_SCALED: tl.constexpr,
                  W_SCALED: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The epilogue of gate_up_kernel for ROWS rows: scales, expert LoRA, silu(gate) * up, stored as h."""
    if X_SCALED:  # each token's activation scale
        acc = acc * tl.load(x_scale_ptr + assignment // TOP_K, mask=real, other=0.0)[:, None]
    if W_SCALED:  # each output channel's weight scale
        acc = acc * tl.load(w_scale_ptr + expert.to(tl.int64) * stride_se + w_rows)[None, :]
    if LORA_RANK > 0:  # expert LoRA: the B rows of the same gate and up channels, against each row's shrunk x
        acc = add_lora(acc, lora_v_ptr, lora_rows_ptr, lora_b_ptr, assignment, real, w_rows, lora_slots,
                       lora_experts, stride_lv, stride_lb, stride_lbn, LORA_RANK, LORA_RANK_PAD, LORA_SLOTS)
    gate, up = tl.split(tl.reshape(acc, (ROWS, BLOCK_N, 2)))
    h = gate * tl.sigmoid(gate) * up
    store_ok = (cols < ffn)[None, :]
    if PAIRS:  # the empty rows have no row of h
        store_ok = store_ok & real[:, None]
    tl.store(h_ptr + h_rows[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def down_epilogue(acc, expert, assignment, h_rows, real, w_cols, weights_ptr, h_scale_ptr, w_scale_ptr,
                  lora_v_ptr, lora_rows_ptr, lora_b_ptr, lora_slots, lora_experts, stride_se, stride_lv, stride_lb,
                  stride_lbn, X_SCALED: tl.constexpr, W_SCALED: tl.constexpr, LORA_RANK: tl.constexpr,
                  LORA_RANK_PAD: tl.constexpr, LORA_SLOTS: tl.constexpr):
    """FP8 scales, then the LoRA delta, then the routing weight (which scales the delta too), all on acc: one
    accumulator (a second one for the delta spilled registers next to a 128 x 256 tile)."""
    if X_SCALED:  # h's scale, one per row of h
        acc = acc * tl.load(h_scale_ptr + h_rows, mask=real, other=0.0)[:, None]
    if W_SCALED:
        acc = acc * tl.load(w_scale_ptr + expert.to(tl.int64) * stride_se + w_cols)[None, :]
    if LORA_RANK > 0:
        acc = add_lora(acc, lora_v_ptr, lora_rows_ptr, lora_b_ptr, assignment, real, w_cols, lora_slots,
                       lora_experts, stride_lv, stride_lb, stride_lbn, LORA_RANK, LORA_RANK_PAD, LORA_SLOTS)
    return acc * tl.load(weights_ptr + assignment, mask=real, other=0.0)[:, None]


@triton.jit(do_not_specialize=GEMM_PER_STEP_INTS)
def down_kernel(h_ptr, w2_ptr, out_ptr, weights_ptr, h_scale_ptr, w_scale_ptr, sorted_rows_ptr, block_expert_ptr,
                experts_ptr, lora_v_ptr, lora_rows_ptr, lora_b_ptr, num_m, num_assignments, hidden, ffn,
                lora_slots, lora_experts, stride_h, stride_we, stride_wn, stride_out, stride_se, stride_lv,
                stride_lb, stride_lbn, TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr, PAIRS: tl.constexpr,
                EVEN_K: tl.constexpr, LORA_RANK: tl.constexpr, LORA_RANK_PAD: tl.constexpr, LORA_SLOTS: tl.constexpr,
                X_SCALED: tl.constexpr, W_SCALED: tl.constexpr, UPCAST_W: tl.constexpr, TAIL_M: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Scales as in `gate_up_kernel`; h's scales are per row of h. Pairs: program (token, columns) sums the
    token's TOP_K assignments into out [T, H]; sorted: out [T*K, H], one row per assignment (TAIL_M as in
    `fused_moe`)."""
    pid_m, pid_n = tile_of(tl.program_id(0), num_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_cols = cols % hidden
    ks = tl.arange(0, BLOCK_K)
    i = tl.arange(0, BLOCK_M)
    if PAIRS:
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            expert, assignment, h_rows = rows_of(pid_m * TOP_K + k, sorted_rows_ptr, block_expert_ptr, experts_ptr,
                                                 num_assignments, PAIRS, BLOCK_M)
            if (expert >= 0) & (expert < NUM_EXPERTS):  # another rank's assignment adds nothing here
                real = assignment < num_assignments
                w_tile = w2_ptr + expert.to(tl.int64) * stride_we + w_cols[None, :] * stride_wn + ks[:, None]
                acc, _ = rows_times_weights(h_ptr, h_rows, real, h_rows, real, w_tile, ffn, stride_h, EVEN_K,
                                            UPCAST_W, BLOCK_M, 0, BLOCK_N, BLOCK_K)
                total += down_epilogue(acc, expert, assignment, h_rows, real, w_cols, weights_ptr, h_scale_ptr,
                                       w_scale_ptr, lora_v_ptr, lora_rows_ptr, lora_b_ptr, lora_slots, lora_experts,
                                       stride_se, stride_lv, stride_lb, stride_lbn, X_SCALED, W_SCALED, LORA_RANK,
                                       LORA_RANK_PAD, LORA_SLOTS)
        out = out_ptr + pid_m.to(tl.int64) * stride_out + cols[None, :] + i[:, None] * 0
        tl.store(out, total.to(out_ptr.dtype.element_ty), mask=(i == 0)[:, None] & (cols < hidden)[None, :])
    else:
        expert, assignment, h_rows = rows_of(pid_m, sorted_rows_ptr, block_expert_ptr, experts_ptr, num_assignments,
                                             PAIRS, BLOCK_M)
        if expert < 0:
            return
        if TAIL_M > 0:
            if merged_into_previous(pid_m, expert, num_m, block_expert_ptr, sorted_rows_ptr, num_assignments,
                                    BLOCK_M, TAIL_M):
                return
        real = assignment < num_assignments
        w_tile = w2_ptr + expert.to(tl.int64) * stride_we + w_cols[None, :] * stride_wn + ks[:, None]
        if TAIL_M > 0:
            if takes_tail(pid_m, expert, num_m, block_expert_ptr, sorted_rows_ptr, num_assignments, BLOCK_M, TAIL_M):
                t_h_rows = ((pid_m + 1) * BLOCK_M + tl.arange(0, TAIL_M)).to(tl.int64)
                t_assignment = tl.load(sorted_rows_ptr + t_h_rows).to(tl.int64)
                t_real = t_assignment < num_assignments
                acc, acc_t = rows_times_weights(h_ptr, h_rows, real, t_h_rows, t_real, w_tile, ffn, stride_h, EVEN_K,
                                                UPCAST_W, BLOCK_M, TAIL_M, BLOCK_N, BLOCK_K)
                down_store(acc_t, out_ptr, weights_ptr, h_scale_ptr, w_scale_ptr, lora_v_ptr, lora_rows_ptr,
                           lora_b_ptr, expert, t_assignment, t_h_rows, t_real, cols, w_cols, hidden, lora_slots,
                           lora_experts, stride_out, stride_se, stride_lv, stride_lb, stride_lbn, X_SCALED, W_SCALED,
                           LORA_RANK, LORA_RANK_PAD, LORA_SLOTS)
            else:
                acc, _ = rows_times_weights(h_ptr, h_rows, real, h_rows, real, w_tile, ffn, stride_h, EVEN_K,
                                            UPCAST_W, BLOCK_M, 0, BLOCK_N, BLOCK_K)
        else:
            acc, _ = rows_times_weights(h_ptr, h_rows, real, h_rows, real, w_tile, ffn, stride_h, EVEN_K, UPCAST_W,
                                        BLOCK_M, 0, BLOCK_N, BLOCK_K)
        down_store(acc, out_ptr, weights_ptr, h_scale_ptr, w_scale_ptr, lora_v_ptr, lora_rows_ptr, lora_b_ptr,
                   expert, assignment, h_rows, real, cols, w_cols, hidden, lora_slots, lora_experts, stride_out,
                   stride_se, stride_lv, stride_lb, stride_lbn, X_SCALED, W_SCALED, LORA_RANK, LORA_RANK_PAD,
                   LORA_SLOTS)


@triton.jit
def down_store(acc, out_ptr, weights_ptr, h_scale_ptr, w_scale_ptr, lora_v_ptr, lora_rows_ptr, lora_b_ptr, expert,
               assignment, h_rows, real, cols, w_cols, hidden, lora_slots, lora_experts, stride_out, stride_se,
               stride_lv, stride_lb, stride_lbn, X_SCALED: tl.constexpr, W_SCALED: tl.constexpr,
               LORA_RANK: tl.constexpr, LORA_RANK_PAD: tl.constexpr, LORA_SLOTS: tl.constexpr):
    """The sorted layout's epilogue: `down_epilogue`, then one row of out per assignment."""
    acc = down_epilogue(acc, expert, assignment, h_rows, real, w_cols, weights_ptr, h_scale_ptr, w_scale_ptr,
                        lora_v_ptr, lora_rows_ptr, lora_b_ptr, lora_slots, lora_experts, stride_se, stride_lv,
                        stride_lb, stride_lbn, X_SCALED, W_SCALED, LORA_RANK, LORA_RANK_PAD, LORA_SLOTS)
    out = out_ptr + assignment[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=real[:, None] & (cols < hidden)[None, :])


def tile_config(num_tokens: int, element_size: int, table=MOE_TILE_CONFIGS):
    """The tiles for this many tokens; 4-byte inputs (fp32) take half the K depth to fit shared memory."""
    gate_up, down = next((Tile(*g), Tile(*d)) for bound, g, d in table if num_tokens <= bound)
    if element_size > 2:
        gate_up, down = (t._replace(block_k=t.block_k // 2) for t in (gate_up, down))
    return gate_up, down


class ExpertLora(NamedTuple):
    """One MoE linear's expert LoRA as the kernels take it: v [T*K, RANK_PAD] fp32 (A @ each assignment's
    input, zero-padded), each assignment's stack row (-1: none), B [slots * stack experts, out, R]."""

    v: torch.Tensor
    rows: torch.Tensor
    b: torch.Tensor
    stack_experts: int
    slots_per_dot: int

    def pointers(self, dummy):
        return self.v, self.rows, self.b

    def scalars(self):
        return self.b.shape[0] // self.stack_experts, self.stack_experts

    def strides(self):
        return self.v.stride(0), self.b.stride(0), self.b.stride(1)

    def constants(self):
        return dict(LORA_RANK=self.b.shape[2], LORA_RANK_PAD=self.v.shape[1], LORA_SLOTS=self.slots_per_dot)


class NoLora(NamedTuple):
    """The kernels' LoRA arguments when there is none (`dummy` stands in for the pointers)."""

    def pointers(self, dummy):
        return dummy, dummy, dummy

    def scalars(self):
        return 0, 1

    def strides(self):
        return 0, 0, 0

    def constants(self):
        return dict(LORA_RANK=0, LORA_RANK_PAD=16, LORA_SLOTS=1)


# TAIL_M > 0 (an experiment, off until measured: LORAX_MOE_TAIL_M=32): an expert's last row block with at most
# TAIL_M rows after a block of its own (at ~128 rows an expert, half the experts spill a few rows into a second
# 128-row block) is computed by the program of the block before, from the same weight tiles, and has no program:
# every program streams a whole weight tile through shared memory whatever its rows, so a nearly empty block
# costs about what a full one does (docs/PERF.md, session 8).
def tail_m_from_env() -> int:
    """LORAX_MOE_TAIL_M: 0 (off), or a power of two of at least DOT_M rows (a tensor-core dot's). It applies
    where the tile table's row blocks are taller than it (with 32: from 256 tokens, the 128-row blocks)."""
    text = os.getenv("LORAX_MOE_TAIL_M", "0")
    value = int(text) if text.strip().isdigit() else -1
    if value and (value < DOT_M or value & (value - 1)):
        raise ValueError(f"LORAX_MOE_TAIL_M={text!r}: must be 0 or a power of two from {DOT_M}")
    return value


TAIL_M = tail_m_from_env()
SHRINK_BLOCK_K = 512  # columns of A per shrink program: 8 parts over Mixtral's 4096, 28 over 14336


def expert_lora_shrink(lora, name: str, x: torch.Tensor, rows: torch.Tensor, pairs: bool, x_row_div: int = 1,
                       x_rows: torch.Tensor = None):
    """`lora`'s `name` stack with v = A @ x computed for every assignment (x's row: x_rows[i], else i // x_row_div),
    as the kernels take it; NoLora without one."""
    stacked = lora.stacks.experts.get((lora.layer_id, name)) if lora is not None else None
    if stacked is None:
        return NoLora()
    n, rank = rows.shape[0], stacked.a.shape[1]
    rank_pad = max(16, rank)
    parts = triton.cdiv(x.shape[1], SHRINK_BLOCK_K)
    partial = torch.empty(parts, n, rank_pad, dtype=torch.float32, device=x.device)
    lora_shrink_kernel[(n, parts)](
        x, stacked.a, rows, rows if x_rows is None else x_rows, partial, x.shape[1], x_row_div,
        x.stride(0), stacked.a.stride(0), stacked.a.stride(1), partial.stride(0), partial.stride(1),
        HAS_X_ROWS=x_rows is not None, RANK=rank, RANK_PAD=rank_pad, BLOCK_K=SHRINK_BLOCK_K, num_warps=4)
    stack_experts = lora.stacks.num_experts
    slots = stacked.b.shape[0] // stack_experts
    # one slot per dot for a pair (it has one adapter); otherwise dots 64 deep (deeper ones spill registers
    # next to a 128 x 256 accumulator, compiled for sm_90a)
    per_dot = 1 if pairs else min(triton.next_power_of_2(slots), max(1, 64 // rank_pad))
    return ExpertLora(partial.sum(dim=0), rows, stacked.b, stack_experts, per_dot)


def fused_moe(x: torch.Tensor, w13, w2, routing_weights: torch.Tensor, experts: torch.Tensor, configs=None,
              lora=None, elsewhere: bool = False, fp8_activations: bool = True) -> torch.Tensor:
    """x [T, H], w13 [E, 2F, H], w2 [E, H, F], routing_weights / experts [T, K] -> [T, H] (this rank's partial).

    SiLU gating, as Mixtral uses; `configs` = (gate/up tile, down tile) overrides the tile table (for tuning).
    `lora`, when given (a StackedExpertLora over the assignments in t * K + k order), adds expert-LoRA deltas:
    the gate/up deltas before the activation, the down deltas with the routing weight; the expert weights
    are still read once. With `elsewhere`, an expert id of E marks an assignment another rank computes
    (expert parallelism): it is skipped and adds zero.

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
    n = T * K
    if n == 0:
        return x.new_zeros(T, H)
    table = MOE_FP8_TILE_CONFIGS if scaled_x else MOE_TILE_CONFIGS  # W8A16: x's tiles take the shared memory
    tile1, tile2 = (Tile(*c) for c in configs) if configs else tile_config(T, x.element_size(), table)
    assert tile1.block_m == tile2.block_m, "both kernels walk the same rows"
    pairs = tile1.block_m == 1
    tail_m = TAIL_M if not pairs and TAIL_M < tile1.block_m else 0  # merged rows fit in less than a block
    flat_experts = experts.flatten().contiguous()
    if pairs:
        block_m, rows1, rows2, h_rows = DOT_M, n, T, n
        sorted_rows = block_expert = flat_experts  # unread
        position = None  # h row = assignment
    else:
        block_m = tile1.block_m
        aligned = (align_by_expert_triton if n <= 8192 else align_by_expert)(experts, E, block_m)
        h_rows, sorted_rows, block_expert = aligned.padded_rows, aligned.sorted_rows, aligned.block_expert
        rows1 = rows2 = h_rows // block_m
        position = aligned.position
    w13_q, w13_scale = (w13.weight, w13.weight_scale) if fp8 else (w13, None)
    w2_q, w2_scale = (w2.weight, w2.weight_scale) if fp8 else (w2, None)
    x_in, x_scale = quantize_rows(x, w13.input_scale) if scaled_x else (x, None)
    lora_rows = None
    if lora is not None:  # another rank's assignments take no LoRA (and read no stack row)
        lora_rows = torch.where(flat_experts < E, lora.rows, -1).to(torch.int32) if elsewhere else lora.rows
    lora13 = expert_lora_shrink(lora, "w13", x, lora_rows, pairs, x_row_div=K)
    h = torch.empty(h_rows, F, dtype=x.dtype, device=x.device)
    gate_up_kernel[(rows1 * triton.cdiv(F, tile1.block_n),)](
        x_in, w13_q, h, h if x_scale is None else x_scale, h if w13_scale is None else w13_scale,
        sorted_rows, block_expert, flat_experts, *lora13.pointers(h), rows1, n, H, F, *lora13.scalars(),
        x_in.stride(0), w13_q.stride(0), w13_q.stride(1), h.stride(0), 0 if w13_scale is None else w13_scale.stride(0),
        *lora13.strides(),
        TOP_K=K, NUM_EXPERTS=E, PAIRS=pairs, EVEN_K=H % tile1.block_k == 0, **lora13.constants(),
        X_SCALED=scaled_x, W_SCALED=fp8, UPCAST_W=fp8 and not scaled_x, TAIL_M=tail_m,
        BLOCK_M=block_m, BLOCK_N=tile1.block_n, BLOCK_K=tile1.block_k, GROUP_M=tile1.group_m,
        num_warps=tile1.warps, num_stages=tile1.stages)
    skip = None if pairs else (block_expert, block_m)
    h_in, h_scale = quantize_rows(h, w2.input_scale, skip) if scaled_x else (h, None)
    lora2 = expert_lora_shrink(lora, "w2", h, lora_rows, pairs, x_rows=position)
    if pairs:
        out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    else:  # other ranks' rows are never written: zeros
        out = (torch.zeros if elsewhere else torch.empty)(n, H, dtype=x.dtype, device=x.device)
    weights = routing_weights.flatten().to(torch.float32).contiguous()
    down_kernel[(rows2 * triton.cdiv(H, tile2.block_n),)](
        h_in, w2_q, out, weights, h if h_scale is None else h_scale, h if w2_scale is None else w2_scale,
        sorted_rows, block_expert, flat_experts, *lora2.pointers(h), rows2, n, H, F, *lora2.scalars(),
        h_in.stride(0), w2_q.stride(0), w2_q.stride(1), out.stride(0), 0 if w2_scale is None else w2_scale.stride(0),
        *lora2.strides(),
        TOP_K=K, NUM_EXPERTS=E, PAIRS=pairs, EVEN_K=F % tile2.block_k == 0, **lora2.constants(),
        X_SCALED=scaled_x, W_SCALED=fp8, UPCAST_W=fp8 and not scaled_x, TAIL_M=tail_m,
        BLOCK_M=block_m, BLOCK_N=tile2.block_n, BLOCK_K=tile2.block_k, GROUP_M=tile2.group_m,
        num_warps=tile2.warps, num_stages=tile2.stages)
    return out if pairs else out.view(T, K, H).sum(dim=1)
