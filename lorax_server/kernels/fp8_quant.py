"""Activations to FP8 (e4m3) per row, in one Triton launch: what every FP8 GEMM's A operand goes through.

Oracle: `lorax_server.layers.fp8.quantize_rows_reference`. Each program takes one row: its absmax (skipped when
a static scale is given), then the row divided by its scale, saturated to +-448 and rounded to e4m3.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from lorax_server.utils.fp8 import FP8, FP8_MAX, MIN_SCALE

BLOCK = 1024  # elements of a row per step: Mixtral's 4096 and 14336 in 4 and 14 steps


@triton.jit
def quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, static_scale_ptr, block_expert_ptr, cols, stride_x, stride_out,
                         STATIC: tl.constexpr, SKIP_BLOCKS: tl.constexpr, ROWS_PER_BLOCK: tl.constexpr,
                         FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if SKIP_BLOCKS:  # a row block no expert computes (padding past the last real block): nothing reads it
        if tl.load(block_expert_ptr + row // ROWS_PER_BLOCK) < 0:
            return
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    if STATIC:
        scale = tl.load(static_scale_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, cols, BLOCK):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < cols, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    out_row = out_ptr + row * stride_out
    for k0 in range(0, cols, BLOCK):
        ok = k0 + offs < cols
        x = tl.load(x_row + k0 + offs, mask=ok, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
        tl.store(out_row + k0 + offs, q.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=ok)


def quantize_rows(x: torch.Tensor, input_scale: Optional[torch.Tensor] = None,
                  skip_blocks: Optional[Tuple[torch.Tensor, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (rows may be strided) -> (x_fp8 [M, K] contiguous, scale [M] float32); a static `input_scale`
    (0-d float32) replaces the per-row absmax scales. `skip_blocks` = (block_expert, rows per block) of an
    expert alignment: rows of blocks whose expert is -1 are left unwritten (the fused MoE's padding)."""
    assert x.stride(1) == 1, "rows must be contiguous"
    M, K = x.shape
    out = torch.empty(M, K, dtype=FP8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return out, scale
    static = input_scale is not None
    block_expert, rows_per_block = skip_blocks if skip_blocks is not None else (scale, 1)
    quantize_rows_kernel[(M,)](x, out, scale, input_scale if static else scale, block_expert, K, x.stride(0),
                               out.stride(0), STATIC=static, SKIP_BLOCKS=skip_blocks is not None,
                               ROWS_PER_BLOCK=rows_per_block, FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE, BLOCK=BLOCK,
                               num_warps=4)
    return out, scale
