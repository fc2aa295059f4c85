"""FP8 (e4m3) weights and activations: one layout for every FP8 weight, its quantization, and the FP8 linear.

Layout, whatever the checkpoint stored (AutoFP8 per-tensor, compressed-tensors per-channel, or float weights
quantized at load):
  weight        [..., out, in] float8_e4m3fn
  weight_scale  [..., out] float32: one scale per output channel (a per-tensor scale is repeated over its rows,
                which keeps fused q/k/v and w1/w3, each with its own scale, one tensor)
  input_scale   0-d float32 static activation scale (AutoFP8 'static'), or None: each token's row of activations
                then takes its own scale (dynamic, per token)
so that W = weight * weight_scale[..., None] and x ~= x_fp8 * x_scale[:, None]. An FP8 GEMM multiplies the FP8
operands and applies both scales to its fp32 accumulator (the epilogue).

Backends (family "fp8", LORAX_FP8_BACKEND): `scaled_mm` (torch._scaled_mm with row-wise scales, on GPUs with FP8
tensor cores: compute capability 8.9 or newer; batches of at most W8A16_MAX_ROWS rows go through a Triton kernel
that reads the FP8 weight and keeps the activations in their dtype) and `dequantize` (weight * scale in the
compute dtype, then an ordinary matmul; the CPU path, and the oracle of the tests).
"""

from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lorax_server.utils.backends import Backend, choose
from lorax_server.utils.fp8 import (  # noqa: F401 (the format's names are also read from here)
    FP8,
    FP8_MAX,
    FP8_MIN_CAPABILITY,
    MIN_SCALE,
    Fp8Tensors,
    dequantize,
    fp8_unsupported,
    gpu_without_fp8,
    quantize_weight,
    to_fp8,
)
from lorax_server.utils.weights import CheckpointError

# Rows up to which the `scaled_mm` backend multiplies with the Triton weight-only kernel (W8A16) instead of
# quantizing the activations for torch._scaled_mm. On an H200 at Mixtral's q/k/v and o_proj (docs/PERF.md, FP8
# section): _scaled_mm plus the quantizing launch took 19-25 us up to 64 rows, the weight-only kernel 15-18 us up
# to 16 rows and 23-44 us at 64; _scaled_mm wins from there on (bf16: 12-19 us up to 64 rows).
W8A16_MAX_ROWS = 16


# -- quantization (pure PyTorch: the reference, and the CPU path) ---------------------------------------


def quantize_rows_reference(x: torch.Tensor, input_scale: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_fp8 [M, K], scale [M] float32): each row's absmax scale, or the static `input_scale`."""
    xf = x.float()
    if input_scale is None:
        scale = (xf.abs().amax(dim=-1) / FP8_MAX).clamp(min=MIN_SCALE)
    else:
        scale = input_scale.float().reshape(1).expand(x.shape[0]).contiguous()
    return to_fp8(xf / scale.unsqueeze(-1)), scale


def fake_quantize_rows(x: torch.Tensor, input_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x as the FP8 kernels see it (quantized per row, then scaled back), in float32: the tests' oracle input."""
    x8, scale = quantize_rows_reference(x, input_scale)
    return x8.float() * scale.unsqueeze(-1)


def max_input_scale(scales: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """One static activation scale for weights that share their input (q/k/v, w1/w3, the experts of a layer):
    the largest, so that no input is clipped; None (dynamic) unless every part has one."""
    if not scales or any(s is None for s in scales):
        return None
    return torch.stack([s.float().reshape(()) for s in scales]).amax()


def cat_fp8(parts: Sequence[Fp8Tensors], dim: int = 0) -> Fp8Tensors:
    """Weights fused along their output rows (dim 0) or stacked into a new leading dim (`dim=None`)."""
    join = (lambda tensors: torch.cat(tensors, dim)) if dim is not None else torch.stack
    return Fp8Tensors(join([p.weight for p in parts]), join([p.weight_scale for p in parts]),
                      max_input_scale([p.input_scale for p in parts]))


# -- device support and the linear backends --------------------------------------------------------------


def scaled_mm_unavailable(device: torch.device, out_features: int, in_features: int) -> Optional[str]:
    reason = fp8_unsupported(device)
    if reason is not None:
        return reason
    if not hasattr(torch, "_scaled_mm"):
        return "torch._scaled_mm is missing from this torch"
    if out_features % 16 or in_features % 16:
        return f"torch._scaled_mm needs both sizes to be multiples of 16, not [{out_features}, {in_features}]"
    return None


def linear_dequantized(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       input_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The reference: the FP8 weight scaled back to x's dtype, activations left as they are."""
    return F.linear(x, dequantize(weight, weight_scale, x.dtype))


def load_scaled_mm():
    """The `scaled_mm` linear, with activations quantized by the Triton kernel where Triton is installed (and
    small batches through the Triton weight-only kernel)."""
    try:
        from lorax_server.kernels.fp8_linear import w8a16_linear
        from lorax_server.kernels.fp8_quant import quantize_rows
    except ImportError:  # no triton: the same quantization in torch ops, every batch through _scaled_mm
        quantize_rows, w8a16_linear = quantize_rows_reference, None

    def linear_scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         input_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """x [..., in] -> [..., out]: x quantized per token (or with the static scale), one FP8 GEMM with both
        scales applied row-wise (scale_a [M, 1], scale_b [1, N]; the row-wise mode writes bfloat16). Up to
        W8A16_MAX_ROWS rows: the weight-only kernel, activations unquantized."""
        rows = x.reshape(-1, x.shape[-1])
        if w8a16_linear is not None and rows.shape[0] <= W8A16_MAX_ROWS:
            return w8a16_linear(rows.contiguous(), weight, weight_scale).reshape(*x.shape[:-1], weight.shape[0])
        x8, x_scale = quantize_rows(rows, input_scale)
        y = torch._scaled_mm(x8, weight.t(), scale_a=x_scale.unsqueeze(1), scale_b=weight_scale.unsqueeze(0),
                             out_dtype=torch.bfloat16)
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    return linear_scaled_mm


def fp8_linear_backends(out_features: int, in_features: int):
    """Fastest first; `dequantize` is last and always available."""
    return (
        Backend("scaled_mm", load_scaled_mm,
                lambda device: scaled_mm_unavailable(device, out_features, in_features), lazy=True),
        Backend("dequantize", linear_dequantized),
    )


@lru_cache(maxsize=None)
def fp8_linear(device: torch.device, out_features: int, in_features: int):
    """The FP8 linear `(x, weight, weight_scale, input_scale) -> y` for this device and shape, chosen once."""
    return choose("fp8", fp8_linear_backends(out_features, in_features), device)


# -- stacked expert weights ----------------------------------------------------------------------------


class Fp8Weight(nn.Module):
    """FP8 weights with their scales as registered state: the experts of one MoE layer, [E, out, in].

    Passed where a stacked float weight would go; `shape`, `dtype` and `device` are the FP8 weight's."""

    def __init__(self, tensors: Fp8Tensors):
        super().__init__()
        self.weight = nn.Parameter(tensors.weight, requires_grad=False)
        self.register_buffer("weight_scale", tensors.weight_scale.float())
        self.register_buffer("input_scale", tensors.input_scale)

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, dtype)


# -- loading ------------------------------------------------------------------------------------------


def load_fp8(weights, name: str, dim: Optional[int], shape: Optional[Sequence[int]] = None) -> Fp8Tensors:
    """This rank's part of the weight `name` in FP8: its rows (`dim` 0, column-parallel), its input columns
    (`dim` 1, row-parallel) or all of it (None). A stored FP8 weight keeps its values and scales (a per-channel
    scale follows its rows; a row-parallel read keeps every row, so every rank holds all of them); a stored
    float weight is quantized here, one scale per output row of this rank's part (the absmax over the columns
    this rank holds: exact for its partial product, and no rank reads more than its shard)."""
    weight, stored, index = weights.read_stored(name, weights.shard_index(name, dim, shape))
    if weight.dtype != FP8:
        return quantize_weight(weight)
    if weights.quantization is None:
        raise CheckpointError(f"tensor {stored} is FP8, but config.json has no quantization_config saying how it is "
                              f"scaled")
    return weights.quantization.fp8_tensors(weights, weight, stored, index)


def load_fp8_col(weights, prefixes: Sequence[str], shapes: Sequence[Sequence[int]]) -> Fp8Tensors:
    """Column-parallel weights of several layers fused along their output rows (q/k/v; w1/w3)."""
    return cat_fp8([load_fp8(weights, f"{p}.weight", 0, s) for p, s in zip(prefixes, shapes)])


def load_fp8_row(weights, prefix: str, shape: Sequence[int]) -> Fp8Tensors:
    return load_fp8(weights, f"{prefix}.weight", 1, shape)


def add_delta(weight: torch.Tensor, weight_scale: Optional[torch.Tensor], index, delta: torch.Tensor) -> None:
    """weight[index] += delta in place (a merged LoRA). An FP8 weight (with `weight_scale`) has those rows
    dequantized, summed in float32 and quantized again, each with a new scale."""
    if weight_scale is None:
        weight[index] += delta.to(weight.dtype)
        return
    merged = quantize_weight(dequantize(weight[index], weight_scale[index]) + delta.float())
    weight[index] = merged.weight
    weight_scale[index] = merged.weight_scale
