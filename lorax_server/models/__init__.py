"""get_model(): the registry of model types this server can load, keyed by `config.model_type`."""

import json
import logging
import os
import re
import struct
from pathlib import Path
from typing import Optional

import torch

from lorax_server.utils.dist import FakeGroup, initialize_torch_distributed
from lorax_server.utils.quantization import check_fp8_device, check_quantize_option, checkpoint_quantization
from lorax_server.utils.sources import HUB, resolve
from lorax_server.utils.weights import CheckpointError, read_json, weight_files

logger = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# `--kv-cache-dtype`: "auto" keeps the cache in the compute dtype; "fp8" stores e4m3 with per-layer scales.
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}
# The weights `--quantize fp8` serves in FP8 (attention projections, experts, in both expert layouts).
FP8_SERVED = re.compile(r"(self_attn\.[qkvo]_proj|experts\.\d+\.w[123])\.weight$|experts\.(gate_up|down)_proj$")
# Index at which get_model loads `adapter_id` before merging it (the index is free again afterwards).
MERGE_INDEX = 1


def _flash_mixtral():
    from lorax_server.models.flash_mixtral import FlashMixtral

    return FlashMixtral


MODEL_TYPES = {"mixtral": _flash_mixtral}


def resolve_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    """None picks bfloat16 on a GPU and float32 on a CPU; "float32" means float32 (upstream mapped it to fp16)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not supported; supported: {sorted(DTYPES)}")
    return DTYPES[dtype]


def cuda_memory_fraction() -> float:
    """CUDA_MEMORY_FRACTION (set by the LoRAX launcher): the share of its GPU's memory this process may use."""
    value = os.getenv("CUDA_MEMORY_FRACTION", "1.0")
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"CUDA_MEMORY_FRACTION={value!r}: must be a number in (0, 1]")
    return fraction


def checkpoint_bytes(model_dir: Path, dtype: torch.dtype, world_size: int, fp8: bool = False) -> int:
    """The bytes one rank's weights take on the device: every floating tensor of the safetensors headers cast
    to `dtype` (with `fp8`, one byte per element of the weights served in FP8), split over `world_size` ranks
    (norms and the router are replicated, and small)."""
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for file in weight_files(model_dir):
        try:
            with open(file, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        except (OSError, struct.error, ValueError) as error:
            raise CheckpointError(f"{file} is not a readable safetensors file ({error}); was it downloaded "
                                  f"completely?") from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            start, end = info["data_offsets"]
            served = 1 if fp8 and FP8_SERVED.search(name) else size
            total += numel * served if info["dtype"].startswith(("F", "BF")) else end - start
    return total // world_size


def kv_cache_budget(model_dir: Path, dtype: torch.dtype, device: torch.device, world_size: int,
                    fraction: float, fp8: bool = False) -> int:
    """The KV-cache budget within `fraction` of the GPU's memory: what the engine's default leaves (a share of
    the memory free once the weights are in), counted against the memory this process may use."""
    from lorax_server.models.flash_mixtral import GPU_KV_CACHE_FRACTION

    weights = checkpoint_bytes(model_dir, dtype, world_size, fp8)
    free, total = torch.cuda.mem_get_info(device)
    allowed = int(total * fraction) - torch.cuda.memory_reserved(device)
    left = min(free, allowed) - weights
    budget = int(left * GPU_KV_CACHE_FRACTION)
    if budget <= 0:
        raise ValueError(f"CUDA_MEMORY_FRACTION={fraction} leaves no memory for the KV cache: this process may use "
                         f"{allowed / 2**30:.2f} GiB of {total / 2**30:.2f} GiB and its weights take about "
                         f"{weights / 2**30:.2f} GiB")
    logger.info("CUDA_MEMORY_FRACTION=%s: %.2f GiB of %.2f GiB for this process, %.2f GiB of it for the KV cache",
                fraction, allowed / 2**30, total / 2**30, budget / 2**30)
    return budget


def get_model(model_id: str, adapter_id: str = "", revision: Optional[str] = None, sharded: bool = False,
              quantize: Optional[str] = None, compile: Optional[bool] = None, dtype: Optional[str] = None,
              trust_remote_code: bool = False, source: str = HUB, adapter_source: str = HUB,
              merge_adapter_weights: bool = False, embedding_dim: Optional[int] = None, *,
              kv_cache_bytes: Optional[int] = None, block_size: int = 16, expert_parallel: bool = False,
              kv_cache_dtype: Optional[str] = None):
    """Loads the model `model_id` from `source` (upstream's arguments, in upstream's order).

    - `model_id`: with source "hub" a local checkpoint directory, else a model in the local Hugging Face
      cache at `revision` (no hub is reachable from a serving machine); with source "local" a directory.
      See lorax_server/utils/sources.py.
    - `adapter_id` (from `adapter_source`): upstream applies it to every request of the base model
      (adapter index 0). The engine applies no LoRA at index 0, so it is merged into the base weights,
      with or without `merge_adapter_weights` (which upstream uses to choose merging); other adapters
      then apply on top of the merged weights. `merge_adapter_weights` without `adapter_id` is refused.
    - `compile`: upstream's CUDA graphs for decode. True keeps the engine's decode graphs (GPU only;
      LORAX_CUDA_GRAPHS=0 still turns them off), False decodes eagerly, None keeps the engine's default
      (graphs on a GPU). Nothing to do on a CPU.
    - `quantize`: None, or "fp8": the attention projections and experts compute in FP8 (W8A8 e4m3), from an FP8
      checkpoint's weights as stored (AutoFP8 or compressed-tensors float-quantized) or from float weights
      quantized at load; on a CPU each FP8 weight is dequantized in its matmul, and a GPU without FP8 tensor
      cores is refused. Without it an FP8 checkpoint is dequantized to the compute dtype on load. Any other
      value, and quantization methods other than FP8 in config.json, are refused
      (lorax_server/utils/quantization.py).
    - `embedding_dim` is refused (Mixtral has no embedding head); `trust_remote_code` has no effect (no
      remote code is ever run).
    - `kv_cache_bytes` (default: 256 MiB on a CPU, most of the free GPU memory within CUDA_MEMORY_FRACTION),
      `block_size`, and `expert_parallel` (split the experts over the ranks instead of every expert's ffn;
      sharded runs only) are this server's own.
    - `kv_cache_dtype` (this server's `--kv-cache-dtype`): None or "auto" keeps the KV cache in the compute
      dtype; "fp8" stores it in float8_e4m3fn, one byte an entry (twice the tokens in the same budget), with a
      K and a V scale per layer from the checkpoint (`self_attn.k_scale` / `v_scale`, or `kv_scale`; 1.0 where
      absent), as vLLM's. A GPU without FP8 support is refused.
    """
    if embedding_dim is not None:
        raise ValueError(f"embedding_dim {embedding_dim}: this server serves Mixtral, a causal LM with no "
                         f"embedding head")
    if merge_adapter_weights and not adapter_id:
        raise ValueError("merge_adapter_weights needs an adapter_id: there is no adapter to merge")
    try:
        model_dir = resolve(model_id, source, revision)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}: model_id must be a local checkpoint directory or a model in the local "
                                f"Hugging Face cache") from None
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist: model_id must be a local checkpoint directory")
    config = read_json(config_file)
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type '{model_type}' is not supported; supported: {sorted(MODEL_TYPES)}")
    # Before anything loads: a quantization method this server cannot serve, or a `quantize` the checkpoint
    # does not match, is refused by name.
    check_quantize_option(quantize, checkpoint_quantization(config, model_dir))
    adapter_dir = resolve(adapter_id, adapter_source) if adapter_id else None
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not supported; supported: {sorted(DTYPES)}")
    process_group = initialize_torch_distributed()[0] if sharded else FakeGroup(0, 1)
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    torch_dtype = resolve_dtype(dtype, device)
    if quantize == "fp8":
        check_fp8_device(device)
    if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype '{kv_cache_dtype}' is not supported; supported: {sorted(KV_CACHE_DTYPES)}")
    cache_dtype = KV_CACHE_DTYPES[kv_cache_dtype or "auto"]
    if cache_dtype is not None:
        check_fp8_device(device, what="kv cache dtype 'fp8'")
    fraction = cuda_memory_fraction()
    if device.type == "cuda" and fraction < 1.0:
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        if kv_cache_bytes is None:
            kv_cache_bytes = kv_cache_budget(model_dir, torch_dtype, device, process_group.size(), fraction,
                                             fp8=quantize == "fp8")
    model = MODEL_TYPES[model_type]()(model_dir, torch_dtype, device, process_group,
                                      kv_cache_bytes=kv_cache_bytes, block_size=block_size,
                                      expert_parallel=expert_parallel, quantize=quantize,
                                      kv_cache_dtype=cache_dtype)
    if compile is False and getattr(model, "graphs", None) is not None:
        model.graphs = None
        logger.info("decode steps run eagerly (no compile: CUDA graphs off)")
    elif compile and device.type == "cuda" and getattr(model, "graphs", None) is None:
        logger.info("compile asked, but decode CUDA graphs are off (LORAX_CUDA_GRAPHS=0)")
    if adapter_dir is not None:
        model.adapters.load(MERGE_INDEX, adapter_dir, adapter_id)
        model.merge_adapter(MERGE_INDEX)
        logger.info("adapter %s (%s) merged into the base weights: it answers every base-model request",
                    adapter_id, adapter_dir)
    return model
