"""A small-batch FP8 linear in Triton: y = x @ (W_fp8 * scale).T with x in its own dtype (W8A16).

Oracle: `lorax_server.layers.fp8.linear_dequantized`. For a few rows the product reads the weight once and is
bound by its bytes; torch._scaled_mm's row-wise kernel, plus the launch that quantizes the activations, took
longer than a bf16 matmul of twice the bytes there (docs/PERF.md, FP8 section). Each program takes BLOCK_N
output columns for BLOCK_M rows and walks K, raising each e4m3 weight tile to x's dtype in registers; the
per-channel scale is applied to the fp32 accumulator.
"""

import torch
import triton
import triton.language as tl

# (BLOCK_M ceiling, BLOCK_N, BLOCK_K, warps, stages): BLOCK_N 32 gives Mixtral's o_proj (4096 rows) 128 programs
# and q/k/v (6144) 192, one per multiprocessor or more, each streaming 4096 x 32 bytes of weight.
W8A16_TILES = (64, 32, 256, 4, 4)


@triton.jit(do_not_specialize=["M"])
def w8a16_linear_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_out,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_tile = x_ptr + rows[:, None] * stride_x + ks[None, :]
    w_tile = w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(x_tile, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_tile, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a, b.to(a.dtype))
        x_tile += BLOCK_K
        w_tile += BLOCK_K
    acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    out = out_ptr + rows[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def w8a16_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, tiles=W8A16_TILES) -> torch.Tensor:
    """x [M, K] (rows contiguous), weight [N, K] e4m3, weight_scale [N] float32 -> [M, N] in x's dtype."""
    assert x.stride(1) == 1, "rows must be contiguous"
    M, K = x.shape
    N = weight.shape[0]
    max_m, block_n, block_k, warps, stages = tiles
    block_m = min(max_m, max(16, triton.next_power_of_2(M)))
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    w8a16_linear_kernel[grid](x, weight, weight_scale, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0),
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out
