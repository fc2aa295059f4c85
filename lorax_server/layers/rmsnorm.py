"""RMS norm with the residual add fused in, returning (normed, residual) and never mutating its inputs."""

from typing import Optional, Tuple

import torch
from torch import nn

from lorax_server.utils.backends import Backend, choose, needs_cuda_and_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The oracle: normalise in fp32, cast back, then scale (transformers' order of operations)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    summed = x if residual is None else x + residual
    return rms_norm_reference(summed, weight, eps), summed


def load_triton_norm():
    from lorax_server.kernels.rmsnorm import add_rms_norm

    return add_rms_norm


NORM_BACKENDS = (
    Backend("triton", load_triton_norm, needs_cuda_and_triton, lazy=True),
    Backend("torch", add_rms_norm_torch),
)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.add_rms_norm = choose("norm", NORM_BACKENDS, weight.device)

    @classmethod
    def load(cls, weights, name: str, hidden_size: int, eps: float):
        return cls(weights.get_tensor(name, shape=(hidden_size,)), eps)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); with no residual, x itself is the new residual."""
        return self.add_rms_norm(x, self.weight, self.eps, residual)
