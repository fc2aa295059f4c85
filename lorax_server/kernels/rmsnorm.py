"""Triton fused residual add + RMS norm: one read of x and residual, one write of each output.

Oracle: `lorax_server.layers.rmsnorm.rms_norm_reference` applied to x + residual. Inputs are never
written: the sum goes to a new residual tensor.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, normed_ptr, summed_ptr, hidden, eps, stride,
                        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    x = tl.load(x_ptr + row * stride + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row * stride + cols, mask=ok, other=0.0)
        tl.store(summed_ptr + row * stride + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / hidden + eps)
    normed = (xf * inv_rms).to(x.dtype) * tl.load(weight_ptr + cols, mask=ok, other=0.0)
    tl.store(normed_ptr + row * stride + cols, normed, mask=ok)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) for x [T, H]; with no residual, x is the residual."""
    x = x.contiguous()
    normed = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else x
    if x.shape[0]:
        add_rms_norm_kernel[(x.shape[0],)](
            x, residual.contiguous() if residual is not None else x, weight, normed, summed, x.shape[1], eps,
            x.stride(0), HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(x.shape[1]),
            num_warps=8 if x.shape[1] >= 4096 else 4)
    return normed, summed
