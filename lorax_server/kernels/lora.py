"""Triton LoRA kernels for batches that mix adapters of different ranks: per row (BGMV) and per group of rows (SGMV).

Oracle: `AdapterBatchData.add_fused_lora`'s loop over adapters (lorax_server/adapters/batch.py).

Every adapter loaded for one target group (q/k/v of a layer, or a single target) is stacked into
  a [slots, sections * R, in]  (section i's A in rows i*R .. (i+1)*R, rank zero-padded to R)
  b [slots, out, R]            (section i's B in rows section_ends[i-1] .. section_ends[i])
with the scale folded into B. Each row of the batch names its slot (-1: no LoRA). `lora_shrink` computes
v = A[slot] @ x for every section in one launch; `lora_expand` adds B[slot] @ v[section] into the output
columns of each section (a fused q/k/v output takes one launch instead of three).

Shapes and grids depend only on the batch size, never on which adapters it holds, so a decode step with
adapters can be captured in a CUDA graph. Rows are independent, so the same kernels serve prefill (each
row re-reads its adapter's A and B, mostly from L2) and decode.
"""

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

MAX_SECTIONS = 3  # q, k, v


@triton.jit
def shrink_kernel(x_ptr, x_index_ptr, a_ptr, slots_ptr, v_ptr, in_features, x_row_div,
                  stride_x, stride_as, stride_ar, stride_v,
                  HAS_X_INDEX: tl.constexpr, RANK: tl.constexpr, BLOCK_K: tl.constexpr):
    row, section = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + row)
    r = tl.arange(0, RANK)
    # Products accumulate element-wise and are reduced across K once at the end: a reduction inside the
    # loop would synchronise the warps on every step.
    acc = tl.zeros((RANK, BLOCK_K), tl.float32)
    if slot >= 0:
        if HAS_X_INDEX:
            x_row = tl.load(x_index_ptr + row)
        else:
            x_row = row // x_row_div
        ks = tl.arange(0, BLOCK_K)
        a_tile = a_ptr + slot.to(tl.int64) * stride_as + (section * RANK + r)[:, None] * stride_ar + ks[None, :]
        x_tile = x_ptr + x_row.to(tl.int64) * stride_x + ks
        for k0 in range(0, in_features, BLOCK_K):
            ok = ks < in_features - k0
            x = tl.load(x_tile, mask=ok, other=0.0).to(tl.float32)
            a = tl.load(a_tile, mask=ok[None, :], other=0.0).to(tl.float32)
            acc += a * x[None, :]
            a_tile += BLOCK_K
            x_tile += BLOCK_K
    tl.store(v_ptr + row * stride_v + section * RANK + r, tl.sum(acc, 1))


@triton.jit
def expand_kernel(v_ptr, b_ptr, slots_ptr, scale_ptr, y_ptr, out_features, end0, end1, y_shift0, y_shift1, y_shift2,
                  stride_v, stride_bs, stride_bn, stride_y,
                  RANK: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr):
    row, pid_n = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + row)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of B
    ok = n < out_features
    section = (n >= end0).to(tl.int32) + (n >= end1).to(tl.int32)
    y = y_ptr + row.to(tl.int64) * stride_y + n + tl.where(section == 0, y_shift0,
                                                            tl.where(section == 1, y_shift1, y_shift2))
    if slot < 0:
        if not ACCUMULATE:  # the caller's buffer is uninitialised: rows without LoRA get a zero delta
            tl.store(y, tl.zeros((BLOCK_N,), tl.float32).to(y_ptr.dtype.element_ty), mask=ok)
        return
    r = tl.arange(0, RANK)
    # [BLOCK_N, R], from L1; masked: past out_features `section` counts past the last section of v
    v = tl.load(v_ptr + row * stride_v + section[:, None] * RANK + r[None, :], mask=ok[:, None], other=0.0)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + n[:, None] * stride_bn + r[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)
    delta = tl.sum(b * v, 1)
    if HAS_SCALE:
        delta *= tl.load(scale_ptr + row)
    if ACCUMULATE:
        delta += tl.load(y, mask=ok, other=0.0).to(tl.float32)
    tl.store(y, delta.to(y_ptr.dtype.element_ty), mask=ok)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, sections: int = 1,
                x_index: Optional[torch.Tensor] = None, x_row_div: int = 1) -> torch.Tensor:
    """v [N, sections * R] fp32 with v[i] = A[slots[i]] @ x[j] (zeros where the slot is -1), where row j of
    x is x_index[i] when given, else i // x_row_div. a [S, sections * R, in], R a power of two."""
    N = slots.shape[0]
    rank = a.shape[1] // sections
    v = torch.empty(N, sections * rank, dtype=torch.float32, device=x.device)
    if N:
        shrink_kernel[(N, sections)](
            x, x_index if x_index is not None else slots, a, slots, v, x.shape[1], x_row_div,
            x.stride(0), a.stride(0), a.stride(1), v.stride(0),
            HAS_X_INDEX=x_index is not None, RANK=rank, BLOCK_K=max(32, min(512, 8192 // rank)), num_warps=4)
    return v


def lora_expand(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                section_ends: Sequence[int] = (), y_shifts: Sequence[int] = (0,),
                row_scale: Optional[torch.Tensor] = None, accumulate: bool = True) -> None:
    """y [N, *] (+)= row_scale * B[slot] @ v[section], in place. Row n of B (section i: n below
    section_ends[i]) lands in column n + y_shifts[i] of y. Without `accumulate` y is overwritten,
    with zeros in rows whose slot is -1."""
    N, out_features, rank = slots.shape[0], b.shape[1], b.shape[2]
    assert len(y_shifts) <= MAX_SECTIONS
    ends = list(section_ends[:-1]) + [out_features] * (MAX_SECTIONS - len(y_shifts) + 1)
    shifts = list(y_shifts) + [0] * (MAX_SECTIONS - len(y_shifts))
    if N:
        block_n = max(16, min(256, 8192 // rank))
        expand_kernel[(N, triton.cdiv(out_features, block_n))](
            v, b, slots, row_scale if row_scale is not None else v, y, out_features, ends[0], ends[1], *shifts,
            v.stride(0), b.stride(0), b.stride(1), y.stride(0),
            RANK=rank, BLOCK_N=block_n, HAS_SCALE=row_scale is not None, ACCUMULATE=accumulate, num_warps=4)


# -- SGMV: rows grouped by stack row, for large batches ------------------------------------------------
# BGMV re-reads a row's A and B for every row; with thousands of rows (prefill) over expert LoRA, whose B
# for gate/up is 2 x 14336 x R per expert, that is gigabytes per layer. Grouping the rows by stack row
# (adapter slot x expert) and padding each group to BLOCK_M rows lets one program multiply a whole tile
# of rows by its group's A or B with tensor cores, reading each weight once per tile.

SGMV_BLOCK_M = 32


@triton.jit(do_not_specialize=["n_rows"])
def sgmv_shrink_kernel(x_ptr, a_ptr, sorted_rows_ptr, block_group_ptr, v_ptr, n_rows, in_features,
                       stride_x, stride_as, stride_ar, stride_v,
                       RANK: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    group = tl.load(block_group_ptr + pid)
    if group < 0:
        return
    row = tl.load(sorted_rows_ptr + pid * BLOCK_M + tl.arange(0, BLOCK_M))
    real = row < n_rows
    r = tl.arange(0, RANK_PAD)
    ks = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + row[:, None] * stride_x + ks[None, :]
    a_tile = a_ptr + group.to(tl.int64) * stride_as + r[None, :] * stride_ar + ks[:, None]  # [K, R] view of A
    acc = tl.zeros((BLOCK_M, RANK_PAD), tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        ok = ks < in_features - k0
        x = tl.load(x_tile, mask=real[:, None] & ok[None, :], other=0.0)
        a = tl.load(a_tile, mask=ok[:, None] & (r[None, :] < RANK), other=0.0)
        acc += tl.dot(x, a.to(x.dtype))
        x_tile += BLOCK_K
        a_tile += BLOCK_K
    tl.store(v_ptr + row[:, None] * stride_v + r[None, :], acc, mask=real[:, None] & (r[None, :] < RANK))


@triton.jit(do_not_specialize=["n_rows"])
def sgmv_expand_kernel(v_ptr, b_ptr, sorted_rows_ptr, block_group_ptr, y_ptr, n_rows, out_features,
                       stride_v, stride_bs, stride_bn, stride_y,
                       RANK: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    group = tl.load(block_group_ptr + pid_m)
    if group < 0:
        return
    row = tl.load(sorted_rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    real = row < n_rows
    r = tl.arange(0, RANK_PAD)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = n < out_features
    v = tl.load(v_ptr + row[:, None] * stride_v + r[None, :], mask=real[:, None] & (r[None, :] < RANK), other=0.0)
    b = tl.load(b_ptr + group.to(tl.int64) * stride_bs + n[None, :] * stride_bn + r[:, None],
                mask=ok[None, :] & (r[:, None] < RANK), other=0.0)  # [R, N] view of B
    delta = tl.dot(v.to(b.dtype), b)  # v rounded to the weights' dtype, as the torch loop does
    y = y_ptr + row[:, None] * stride_y + n[None, :]
    mask = real[:, None] & ok[None, :]
    tl.store(y, (tl.load(y, mask=mask, other=0.0).to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


def sgmv_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sorted_rows: torch.Tensor,
              block_group: torch.Tensor) -> None:
    """y [N, out] += B[g] @ (A[g] @ x) per row, in place, where the rows are grouped by stack row
    g: `sorted_rows` / `block_group` as `kernels.alignment.align_by_expert` makes them with SGMV_BLOCK_M
    (rows without LoRA in no group). a [G, R, in], b [G, out, R]."""
    N, rank = x.shape[0], a.shape[1]
    rank_pad = max(16, rank)  # tensor-core tiles are at least 16 deep
    blocks = block_group.shape[0]
    if not N:
        return
    v = torch.empty(N, rank, dtype=torch.float32, device=x.device)
    sgmv_shrink_kernel[(blocks,)](x, a, sorted_rows, block_group, v, N, x.shape[1], x.stride(0), a.stride(0),
                                  a.stride(1), v.stride(0), RANK=rank, RANK_PAD=rank_pad, BLOCK_M=SGMV_BLOCK_M,
                                  BLOCK_K=64, num_warps=4)
    sgmv_expand_kernel[(blocks, triton.cdiv(b.shape[1], 128))](
        v, b, sorted_rows, block_group, y, N, b.shape[1], v.stride(0), b.stride(0), b.stride(1), y.stride(0),
        RANK=rank, RANK_PAD=rank_pad, BLOCK_M=SGMV_BLOCK_M, BLOCK_N=128, num_warps=4)
