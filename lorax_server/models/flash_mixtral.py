"""FlashMixtral: loads a Mixtral checkpoint directory into the engine, with its tokenizer and adapter targets."""

import logging
from pathlib import Path
from typing import Optional

import torch

from lorax_server.layers.attention import check_fp8_kv_ops
from lorax_server.models.custom_modeling.flash_mixtral_modeling import (
    ATTN_K_PROJ,
    ATTN_O_PROJ,
    ATTN_Q_PROJ,
    ATTN_V_PROJ,
    LM_HEAD,
    ROUTER,
    BlockSparseMoE,
    ExpertParallelMoE,
    FlashMixtralForCausalLM,
    MixtralConfig,
)
from lorax_server.models.checkpoint import (
    check_all_read,
    check_before_loading,
    eos_token_ids,
    load_tokenizer,
    loading_progress,
)
from lorax_server.models.flash_causal_lm import DEFAULT_BLOCK_SIZE, FlashCausalLM, kv_cache_blocks
from lorax_server.utils.quantization import checkpoint_quantization
from lorax_server.utils.weights import Weights, read_json, weight_files

logger = logging.getLogger(__name__)

# LoRA targets this model serves (see lorax_server/adapters/peft.py for the experts' two formats).
ADAPTER_LAYERS = [ATTN_Q_PROJ, ATTN_K_PROJ, ATTN_V_PROJ, ATTN_O_PROJ, LM_HEAD, ROUTER, "experts.w13", "experts.w2"]
# KV-cache budget when none is given: a fixed slice of RAM on a CPU; on a GPU, most of what the weights left free.
CPU_KV_CACHE_BYTES = 256 << 20
GPU_KV_CACHE_FRACTION = 0.85


class FlashMixtral(FlashCausalLM):
    """A Mixtral checkpoint directory served by the engine.

    With `quantize="fp8"` the attention projections and the experts compute in FP8 (lorax_server/layers/fp8.py).
    With `kv_cache_dtype=torch.float8_e4m3fn` the KV cache holds e4m3 entries (one byte each, so twice the
    tokens of a 16-bit cache in the same budget), scaled by each layer's k_scale / v_scale.
    Everything cheap is checked before any weight is read: config.json's values and quantization, the
    tokenizer (tokenizer.json or sentencepiece's tokenizer.model; its chat template is
    `tokenizer.chat_template`), generation_config.json's stop ids, and the dtypes and layer/expert indices
    of the stored tensors. Stopping honours every eos id of config.json and generation_config.json.
    """

    def __init__(self, model_dir: Path, dtype: torch.dtype, device, process_group,
                 kv_cache_bytes: Optional[int] = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 expert_parallel: bool = False, quantize: Optional[str] = None,
                 kv_cache_dtype: Optional[torch.dtype] = None):
        model_dir = Path(model_dir)
        values = read_json(model_dir / "config.json")
        config = MixtralConfig.from_dict(values)
        quantization = checkpoint_quantization(values, model_dir)
        tokenizer = load_tokenizer(model_dir)
        eos_ids = eos_token_ids(model_dir, config.eos_token_id)
        weights = Weights(weight_files(model_dir), device, dtype, process_group, quantization=quantization)
        weights.fp8_compute = quantize == "fp8"
        check_before_loading(weights, config)
        log_quantization(quantization, weights.fp8_compute, dtype)
        moe_cls = ExpertParallelMoE if expert_parallel else BlockSparseMoE
        with loading_progress(weights, show=process_group.rank() == 0):
            model = FlashMixtralForCausalLM("", config, weights, moe_cls).eval()
        check_all_read(weights, config)
        budget = kv_cache_bytes or default_kv_cache_bytes(torch.device(device))
        cache_dtype = kv_cache_dtype or dtype
        num_blocks = agreed_num_blocks(kv_cache_blocks(model, block_size, budget, cache_dtype), process_group, device)
        super().__init__(model, tokenizer, dtype, device, num_blocks, block_size, kv_cache_dtype=cache_dtype)
        if cache_dtype == torch.float8_e4m3fn:
            attention = model.model.layers[0].self_attn
            # The kernels against the reference on a tiny case before any request meets them (nothing on a CPU,
            # whose ops are the reference).
            check_fp8_kv_ops(attention.ops, torch.device(device), attention.num_heads, attention.num_kv_heads,
                             attention.head_dim, dtype)
            logger.info("--kv-cache-dtype fp8: %d cache blocks of %d tokens (float8_e4m3fn)", num_blocks, block_size)
        self.eos_token_ids = eos_ids


def log_quantization(quantization, fp8_compute: bool, dtype: torch.dtype) -> None:
    if fp8_compute:
        stored = f"{quantization} weights as stored" if quantization is not None else \
            "float weights quantized at load (per output channel; activations per token)"
        logger.info("--quantize fp8: attention projections and experts in FP8 (%s); router, norms, embeddings and "
                    "lm_head in %s", stored, dtype)
    elif quantization is not None:
        logger.info("%s checkpoint: weights dequantized to %s on load", quantization, dtype)


def agreed_num_blocks(num_blocks: int, process_group, device) -> int:
    """The smallest cache of all ranks: every rank must admit exactly the same requests."""
    if process_group.size() == 1:
        return num_blocks
    count = torch.tensor([num_blocks], device=device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN, group=process_group)
    return int(count.item())


def default_kv_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_KV_CACHE_FRACTION)
    return CPU_KV_CACHE_BYTES
