"""Quantized checkpoints: what config.json and the stored tensors say, and what this server makes of it.

A checkpoint is served only in a way its numbers support. Two layouts carry FP8 (e4m3) weights, with the same
tensor names:
  - AutoFP8: `quantization_config.quant_method: fp8`; per-tensor scales (0-d); static activation scales
    (`input_scale`); router gate and lm_head left in float.
  - compressed-tensors (llm-compressor): `quant_method: compressed-tensors`, format `float-quantized`,
    config groups whose weights are `type: float, num_bits: 8, strategy: tensor | channel`; per-channel
    scales are [out, 1].
Without `--quantize`, an FP8 checkpoint loads exactly: each weight is multiplied by its `weight_scale` in
float32 and served in the compute dtype. With `--quantize fp8` the attention projections and the experts are
served in FP8 (lorax_server/layers/fp8.py): an FP8 checkpoint's weights as stored, with their scales (and
static input scales, where the checkpoint has them), and a float checkpoint's weights quantized at load, one
scale per output channel, with activations scaled per token. Router, norms, embeddings and lm_head stay in
the compute dtype either way.
Every other method (GPTQ, AWQ, bitsandbytes, packed int4 compressed-tensors, ...) is refused by name before
any weight is read, as are integer tensors where float weights belong.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lorax_server.utils.fp8 import Fp8Tensors, fp8_unsupported
from lorax_server.utils.weights import CheckpointError

logger = logging.getLogger(__name__)

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors names of the dtypes a float checkpoint stores
FP8_DTYPE = "F8_E4M3"
SCALE_SUFFIX = "_scale"  # X.weight -> X.weight_scale, in both FP8 layouts
# Tensors an FP8 checkpoint carries for FP8 compute only: static activation scales (`act_scale` in the first
# AutoFP8 checkpoints) and the FP8 KV cache's scales. Dequantized weights and a KV cache in the compute
# dtype need none of them, so ignoring them is exact.
FP8_COMPUTE_ONLY_SUFFIXES = (".input_scale", ".act_scale", ".output_scale", ".k_scale", ".v_scale", ".kv_scale")
INPUT_SCALE_SUFFIXES = (".input_scale", ".act_scale")  # X.weight -> X.input_scale (X.act_scale in early AutoFP8)
SERVED = ("this server loads float16, bfloat16 and float32 checkpoints, and FP8 ones (quant_method 'fp8', or "
          "'compressed-tensors' with format 'float-quantized'), dequantized to the compute dtype, or served in FP8 "
          "with --quantize fp8 (which also quantizes a float checkpoint to FP8 on load)")


@dataclass(frozen=True)
class Fp8Checkpoint:
    """An FP8 checkpoint: float8_e4m3 weights, each beside its float `weight_scale`, dequantized on load."""

    method: str  # quant_method: "fp8" (AutoFP8) or "compressed-tensors"
    detail: str  # for log lines: e.g. "per-tensor scales, static activation scales"

    def scale_name(self, weight_name: str) -> str:
        return weight_name + SCALE_SUFFIX

    def is_compute_only(self, name: str) -> bool:
        return name.endswith(FP8_COMPUTE_ONLY_SUFFIXES)

    def dequantize(self, weight: torch.Tensor, scale: torch.Tensor, rows, scale_name: str = "") -> torch.Tensor:
        """float32 weight * scale, for `weight` read at rows `rows` (an int or slice of the output dim) of the
        stored tensor: a per-channel scale [out, 1] is sliced with its rows, a per-tensor one applies to all."""
        check_scale_values(scale_name, scale)
        if scale.numel() == 1:
            return weight.float() * scale.float().reshape(())
        return weight.float() * scale.float().reshape(-1, 1)[rows]

    def fp8_tensors(self, weights, weight: torch.Tensor, stored: str, index: tuple) -> Fp8Tensors:
        """A stored FP8 weight read at `index` (the stored tensor's coordinates) in this server's FP8 layout: the
        weight as stored, its scale sliced with its output rows (per-channel; whole for a row-parallel read,
        which keeps every row) or repeated over them (per-tensor), and its static input scale, if stored."""
        name = self.scale_name(stored)
        scale = weights.read_stored(name)[0].float()
        check_scale_values(name, scale)
        if scale.numel() == 1:
            scale = scale.reshape(()).expand(weight.shape[-2]).contiguous()
        else:
            scale = scale.reshape(-1)[index[0] if index else slice(None)].contiguous()
        return Fp8Tensors(weight, scale, self.input_scale(weights, stored))

    def input_scale(self, weights, stored: str) -> Optional[torch.Tensor]:
        """The static activation scale (0-d float32) stored beside weight `stored`, or None."""
        base = stored[: -len(".weight")]
        for suffix in INPUT_SCALE_SUFFIXES:
            if weights.has(base + suffix):
                scale = weights.read_stored(base + suffix)[0].float()
                if scale.numel() != 1:
                    raise CheckpointError(f"tensor {base + suffix}: shape {list(scale.shape)}; a static activation "
                                          f"scale is one number (per-tensor)")
                check_scale_values(base + suffix, scale, positive=True)
                return scale.reshape(())
        return None

    def __str__(self) -> str:
        return f"FP8 ({self.method}, {self.detail})"


# -- config.json -------------------------------------------------------------------------------------


def checkpoint_quantization(config: dict, model_dir=None) -> Optional[Fp8Checkpoint]:
    """How the checkpoint's weights are quantized, from config.json's `quantization_config`: None for float
    weights, an Fp8Checkpoint for FP8; anything else raises CheckpointError naming the method."""
    values = config.get("quantization_config")
    if values is None:
        legacy = Path(model_dir) / "quantize_config.json" if model_dir is not None else None
        if legacy is not None and legacy.is_file():  # AutoGPTQ's own file, from before quantization_config
            raise CheckpointError(f"{legacy}: a GPTQ checkpoint (AutoGPTQ's quantize_config.json) is not supported; "
                                  f"{SERVED}")
        return None
    if not isinstance(values, dict):
        raise CheckpointError(f"config.json quantization_config must be an object, got {values!r}")
    method = values.get("quant_method")
    if method == "fp8":
        return autofp8(values)
    if method == "compressed-tensors":
        return compressed_tensors_fp8(values)
    raise CheckpointError(f"config.json quantization_config: quant_method '{method}'{describe(values)} is not "
                          f"supported; {SERVED}")


def describe(values: dict) -> str:
    """What a refused method stores, in a few words (e.g. ' (4-bit nf4)')."""
    if values.get("load_in_4bit"):
        return f" (4-bit {values.get('bnb_4bit_quant_type', 'fp4')})"
    if values.get("load_in_8bit"):
        return " (8-bit LLM.int8)"
    bits = values.get("bits", values.get("w_bit"))
    return f" ({bits}-bit weights)" if bits is not None else ""


def autofp8(values: dict) -> Fp8Checkpoint:
    block = values.get("weight_block_size")
    if block is not None:
        raise CheckpointError(f"config.json quantization_config: quant_method 'fp8' with weight_block_size {block} "
                              f"(block-wise scales) is not supported; only per-tensor and per-channel scales are")
    fmt = values.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"config.json quantization_config: quant_method 'fp8' with fmt '{fmt}' is not "
                              f"supported; only e4m3 weights are")
    scheme = values.get("activation_scheme", "dynamic")
    return Fp8Checkpoint("fp8", f"per-tensor scales, {scheme} activation scales")


def compressed_tensors_fp8(values: dict) -> Fp8Checkpoint:
    """compressed-tensors is served only when every config group holds 8-bit float weights with per-tensor or
    per-channel scales; the format is top-level in older files, per group in newer ones."""
    refuse = "config.json quantization_config: quant_method 'compressed-tensors'"
    sparsity = (values.get("sparsity_config") or {}).get("format")
    if sparsity not in (None, "dense"):
        raise CheckpointError(f"{refuse} with sparsity format '{sparsity}' is not supported; {SERVED}")
    if values.get("transform_config"):
        raise CheckpointError(f"{refuse} with a transform_config (rotated weights) is not supported; {SERVED}")
    groups = values.get("config_groups") or {}
    if not groups:
        raise CheckpointError(f"{refuse} has no config_groups: nothing says how its weights are stored")
    strategies = set()
    for name, group in groups.items():
        fmt = group.get("format") or values.get("format")
        weights = group.get("weights") or {}
        kind = (f"format '{fmt}' (weights {weights.get('type')} {weights.get('num_bits')}-bit, "
                f"strategy {weights.get('strategy')})")
        if fmt != "float-quantized" or weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise CheckpointError(f"{refuse}, group {name}: {kind} is not supported; {SERVED}")
        if weights.get("strategy") not in ("tensor", "channel") or weights.get("symmetric") is False:
            raise CheckpointError(f"{refuse}, group {name}: {kind} is not supported; only symmetric FP8 weights "
                                  f"with strategy 'tensor' or 'channel' are")
        strategies.add(weights["strategy"])
    return Fp8Checkpoint("compressed-tensors", f"float-quantized, per-{' and per-'.join(sorted(strategies))} scales")


def check_quantize_option(quantize: Optional[str], quantization: Optional[Fp8Checkpoint]) -> None:
    """`--quantize` is nothing or 'fp8' (FP8 compute, for a float or an FP8 checkpoint); every other method is
    refused, naming what the checkpoint is."""
    if quantize not in (None, "fp8"):
        found = f"the checkpoint is {quantization}" if quantization else "the checkpoint is not quantized"
        raise ValueError(f"quantization '{quantize}' is not supported by this server: {found}, and {SERVED}")


def check_fp8_device(device: torch.device, what: str = "quantization 'fp8'") -> None:
    """`--quantize fp8` (or `--kv-cache-dtype fp8`, `what`) on a GPU without FP8 support is refused, saying so;
    a CPU dequantizes each FP8 weight in its matmuls, or each cache entry where it is read (slow, exact: the
    tests' oracle)."""
    if device.type == "cuda":
        reason = fp8_unsupported(device)
        if reason is not None:
            if what.startswith("kv"):
                raise ValueError(f"{what} is not supported on this machine: {reason}; serve without "
                                 f"--kv-cache-dtype fp8 (the KV cache then stays in the compute dtype)")
            raise ValueError(f"{what} is not supported on this machine: {reason}; serve the checkpoint "
                             f"without --quantize (an FP8 checkpoint is then dequantized to bfloat16 on load)")
    elif what.startswith("kv"):
        logger.warning("%s on %s: FP8 cache entries are converted where they are read", what, device)
    else:
        logger.warning("%s on %s: FP8 weights are dequantized in every matmul (no FP8 GEMMs here)", what, device)


# -- the stored tensors --------------------------------------------------------------------------------


def check_tensor_dtypes(weights, quantization: Optional[Fp8Checkpoint]) -> None:
    """Every stored tensor is float, or an FP8 weight that this checkpoint's config explains and whose scale is
    stored beside it; reads only the files' headers."""
    for name in sorted(weights.routing):
        dtype = weights.stored_dtype(name)
        if dtype in FLOAT_DTYPES:
            continue
        if dtype != FP8_DTYPE:
            raise CheckpointError(f"tensor {name} is stored as {dtype}, not as floating-point numbers: "
                                  f"{what_integer_tensors_mean(quantization)}")
        if quantization is None:
            raise CheckpointError(f"tensor {name} is stored as {dtype} (FP8), but config.json has no "
                                  f"quantization_config saying how it is scaled")
        check_fp8_weight(weights, name, quantization)


def what_integer_tensors_mean(quantization: Optional[Fp8Checkpoint]) -> str:
    if quantization is not None:
        return f"an {quantization} checkpoint stores only float8_e4m3 weights and float tensors"
    return f"integer weights are quantized (or packed) weights; {SERVED}"


def check_fp8_weight(weights, name: str, quantization: Fp8Checkpoint) -> None:
    if not name.endswith(".weight"):
        raise CheckpointError(f"tensor {name} is stored as {FP8_DTYPE}, but only `.weight` tensors are quantized in "
                              f"an FP8 checkpoint")
    scale = quantization.scale_name(name)
    if scale not in weights.routing:
        raise CheckpointError(f"tensor {name} is stored as {FP8_DTYPE} but its scale {scale} is missing")
    if weights.stored_dtype(scale) not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor {scale} is stored as {weights.stored_dtype(scale)}; scales must be float")
    check_scale_shape(scale, weights.get_shape(scale), weights.get_shape(name))


def check_scale_values(name: str, scale: torch.Tensor, positive: bool = False) -> None:
    """Scales are finite and not negative (a zero weight scale is an all-zero channel; an activation scale,
    which divides, must be positive): a NaN or infinite one would make every logit of every request NaN."""
    values = scale.float()
    bad = ~torch.isfinite(values) | (values <= 0 if positive else values < 0)
    if bad.any():
        first = values.reshape(-1)[bad.reshape(-1)][0].item()
        kind = "NaN, infinite or not positive" if positive else "NaN, infinite or negative"
        raise CheckpointError(f"tensor {name or 'a weight scale'}: {int(bad.sum())} of its {values.numel()} values "
                              f"are {kind} (e.g. {first}); the checkpoint's FP8 scales are broken")


def check_scale_shape(scale_name: str, scale_shape, weight_shape) -> None:
    """One scale for the whole weight, or one per output row ([out, 1]); block or group scales are refused."""
    numel = 1
    for size in scale_shape:
        numel *= size
    per_channel = len(weight_shape) == 2 and list(scale_shape) == [weight_shape[0], 1]
    if numel != 1 and not per_channel:
        raise CheckpointError(f"tensor {scale_name}: shape {list(scale_shape)} for a weight of shape "
                              f"{list(weight_shape)}; only per-tensor and per-output-channel [out, 1] scales are "
                              f"supported (not block or group scales)")
