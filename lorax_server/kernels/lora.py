"""Triton LoRA kernels for batches that mix adapters of different ranks (BGMV style).

Oracle: `AdapterBatchData.add_lora`'s loop over adapters (lorax_server/adapters/batch.py).

Every adapter loaded for one target is stacked into a [slots, R, in] A and a [slots, out, R] B, with
ranks zero-padded to the largest R; each row of the batch names its slot (-1: no LoRA). `lora_shrink`
computes v = A[slot] @ x per row, `lora_expand` adds B[slot] @ v into the output in place (the scale is
already folded into B). Shapes and grids depend only on the batch size, never on which adapters it
holds, so a decode step with adapters can be captured in a CUDA graph (the benchmarks do; the engine
replays graphs only for base-model steps so far). Rows are independent, so the
same kernels serve prefill (each row re-reads its adapter's A and B, from L2) and decode.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def shrink_kernel(x_ptr, a_ptr, slots_ptr, v_ptr, in_features, stride_x, stride_as, stride_ar, stride_v,
                  RANK: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    r = tl.arange(0, RANK)
    acc = tl.zeros((RANK,), tl.float32)
    if slot >= 0:
        ks = tl.arange(0, BLOCK_K)
        a_tile = a_ptr + slot.to(tl.int64) * stride_as + r[:, None] * stride_ar + ks[None, :]
        x_tile = x_ptr + row.to(tl.int64) * stride_x + ks
        for k0 in range(0, in_features, BLOCK_K):
            ok = ks < in_features - k0
            x = tl.load(x_tile, mask=ok, other=0.0).to(tl.float32)
            a = tl.load(a_tile, mask=ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], 1)
            a_tile += BLOCK_K
            x_tile += BLOCK_K
    tl.store(v_ptr + row * stride_v + r, acc)


@triton.jit
def expand_kernel(v_ptr, b_ptr, slots_ptr, y_ptr, out_features, stride_v, stride_bs, stride_bn, stride_y,
                  RANK: tl.constexpr, BLOCK_N: tl.constexpr):
    row, pid_n = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + row)
    if slot < 0:
        return
    r = tl.arange(0, RANK)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = n < out_features
    v = tl.load(v_ptr + row * stride_v + r)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + n[:, None] * stride_bn + r[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)
    delta = tl.sum(b * v[None, :], 1)
    y = y_ptr + row.to(tl.int64) * stride_y + n
    tl.store(y, (tl.load(y, mask=ok, other=0.0).to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=ok)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x [T, in], a [S, R, in] (R a power of two), slots [T] -> v [T, R] in fp32 (zeros where slot is -1)."""
    T, in_features = x.shape
    rank = a.shape[1]
    v = torch.empty(T, rank, dtype=torch.float32, device=x.device)
    if T:
        shrink_kernel[(T,)](x, a, slots, v, in_features, x.stride(0), a.stride(0), a.stride(1), v.stride(0),
                            RANK=rank, BLOCK_K=max(32, min(256, 8192 // rank)), num_warps=4)
    return v


def lora_expand(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, slots: torch.Tensor) -> None:
    """y [T, out] (may be a column slice of a wider tensor) += b[slot] @ v per row, in place."""
    T, out_features = y.shape
    if T:
        block_n = max(16, min(256, 8192 // b.shape[2]))
        expand_kernel[(T, triton.cdiv(out_features, block_n))](
            v, b, slots, y, out_features, v.stride(0), b.stride(0), b.stride(1), y.stride(0),
            RANK=b.shape[2], BLOCK_N=block_n, num_warps=4)
