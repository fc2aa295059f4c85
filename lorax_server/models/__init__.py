"""get_model(): the registry of model types this server can load, keyed by `config.model_type`."""

import json
from pathlib import Path
from typing import Optional

import torch

from lorax_server.utils.dist import FakeGroup, initialize_torch_distributed

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


def get_model(model_id: str, adapter_id: str = "", revision: Optional[str] = None, sharded: bool = False,
              quantize: Optional[str] = None, compile: bool = False, dtype: Optional[str] = None,
              trust_remote_code: bool = False, kv_cache_bytes: Optional[int] = None, block_size: int = 16,
              expert_parallel: bool = False, **unused):
    """Loads the model in local directory `model_id` (no hub is reachable from a serving machine).

    `adapter_id`, a local PEFT adapter directory, is loaded at adapter index 1; `trust_remote_code` has no
    effect (no remote code is ever run); `expert_parallel` splits the experts over the ranks instead of
    every expert's ffn (sharded runs only)."""
    model_dir = Path(model_id)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist: model_id must be a local checkpoint directory")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type '{model_type}' is not supported; supported: {sorted(MODEL_TYPES)}")
    if quantize is not None:
        raise ValueError(f"quantization '{quantize}' is not supported by this server")
    if compile:
        raise ValueError("compile=True is not supported yet")
    if revision:
        raise ValueError(f"revision '{revision}' cannot be honoured: models load from local directories")
    process_group = initialize_torch_distributed()[0] if sharded else FakeGroup(0, 1)
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    model = MODEL_TYPES[model_type]()(model_dir, resolve_dtype(dtype, device), device, process_group,
                                      kv_cache_bytes=kv_cache_bytes, block_size=block_size,
                                      expert_parallel=expert_parallel)
    if adapter_id:  # upstream's default adapter: served here at index 1
        model.adapters.load(1, adapter_id, adapter_id)
    return model
