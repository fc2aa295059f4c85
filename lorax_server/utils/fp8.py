"""The FP8 (e4m3) format every FP8 weight here takes, in plain tensors: its dtype and range, a loaded weight's
tensors, per-channel quantization and dequantization, and whether a device has FP8 tensor cores. Kernels,
checkpoint loading and the layers read it from here (the FP8 modules, linears and loaders are `layers.fp8`).

Layout: weight [..., out, in] float8_e4m3fn; weight_scale [..., out] float32 (one scale per output channel);
input_scale a 0-d float32 static activation scale, or None (each token's row of activations takes its own).
W = weight * weight_scale[..., None].
"""

from typing import NamedTuple, Optional, Tuple

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# Smallest scale: an all-zero row (a padding token, a pruned channel) quantizes to zeros, not to NaN.
MIN_SCALE = 1e-12
FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and later


class Fp8Tensors(NamedTuple):
    """An FP8 weight as loaded, before it becomes a module's state (see the module docstring for the layout)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: Optional[torch.Tensor] = None


def quantize_weight(weight: torch.Tensor) -> Fp8Tensors:
    """[..., out, in] float -> FP8 with one scale per output channel (absmax over the channel's inputs)."""
    w = weight.float()
    scale = (w.abs().amax(dim=-1) / FP8_MAX).clamp(min=MIN_SCALE)  # [..., out]
    return Fp8Tensors(to_fp8(w / scale.unsqueeze(-1)), scale)


def dequantize(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight * scale in float32 (the product an FP8 checkpoint means), then cast to `dtype`."""
    return (weight.float() * weight_scale.float().unsqueeze(-1)).to(dtype)


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Round to e4m3, saturating: e4m3fn has no infinity, and a cast past 448 would give NaN."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_unsupported(device: torch.device) -> Optional[str]:
    """Why FP8 tensor cores are not available on `device` (None when they are; a CPU has none)."""
    if device.type != "cuda":
        return f"FP8 GEMMs need a CUDA GPU, not {device.type}"
    capability = torch.cuda.get_device_capability(device)
    return gpu_without_fp8(torch.cuda.get_device_name(device), capability)


def gpu_without_fp8(name: str, capability: Tuple[int, int]) -> Optional[str]:
    if tuple(capability) >= FP8_MIN_CAPABILITY:
        return None
    return (f"this GPU ({name}, compute capability {capability[0]}.{capability[1]}) has no FP8 tensor cores, which "
            f"need compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer (Ada, Hopper and "
            f"later)")
