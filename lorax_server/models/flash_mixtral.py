"""FlashMixtral: loads a Mixtral checkpoint directory into the engine, with its tokenizer and adapter targets."""

from pathlib import Path

import torch

from lorax_server.models.custom_modeling.flash_mixtral_modeling import (
    ATTN_K_PROJ,
    ATTN_O_PROJ,
    ATTN_Q_PROJ,
    ATTN_V_PROJ,
    LM_HEAD,
    FlashMixtralForCausalLM,
    MixtralConfig,
)
from lorax_server.models.flash_causal_lm import DEFAULT_BLOCK_SIZE, FlashCausalLM
from lorax_server.utils.weights import Weights, weight_files

ADAPTER_LAYERS = [ATTN_Q_PROJ, ATTN_K_PROJ, ATTN_V_PROJ, ATTN_O_PROJ, LM_HEAD]
DEFAULT_NUM_BLOCKS = 256


class FlashMixtral(FlashCausalLM):
    def __init__(self, model_dir: Path, dtype: torch.dtype, device, process_group,
                 num_blocks: int = DEFAULT_NUM_BLOCKS, block_size: int = DEFAULT_BLOCK_SIZE):
        from transformers import AutoTokenizer

        config = MixtralConfig.from_pretrained(model_dir)
        weights = Weights(weight_files(model_dir), device, dtype, process_group)
        model = FlashMixtralForCausalLM("", config, weights).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        super().__init__(model, tokenizer, dtype, device, num_blocks, block_size)
        self.model_dir = Path(model_dir)
        self.process_group = process_group

    @property
    def adapter_layers(self):
        return ADAPTER_LAYERS
