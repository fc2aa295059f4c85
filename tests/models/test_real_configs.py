"""The real Mixtral-8x7B and Mixtral-8x22B config.json values parse and build, on the meta device."""

import pytest
import torch

from lorax_server.models.custom_modeling.flash_mixtral_modeling import FlashMixtralForCausalLM, MixtralConfig
from lorax_server.utils.dist import FakeGroup
from lorax_server.utils.weights import MetaWeights

# config.json of mistralai/Mixtral-8x7B-v0.1 and mistralai/Mixtral-8x22B-v0.1 (original form).
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
}
MIXTRAL_8X22B = {
    **MIXTRAL_8X7B, "hidden_size": 6144, "intermediate_size": 16384, "max_position_embeddings": 65536,
    "num_attention_heads": 48, "num_hidden_layers": 56, "router_aux_loss_coef": 0.001,
    "transformers_version": "4.38.0", "vocab_size": 32768,
}


@pytest.mark.parametrize("values, params_billions", [(MIXTRAL_8X7B, 46.7), (MIXTRAL_8X22B, 140.6)])
@pytest.mark.parametrize("world_size", [1, 8])
def test_real_config_builds_with_right_shapes(values, params_billions, world_size):
    config = MixtralConfig.from_dict(values)
    assert config.head_dim == 128 and config.sliding_window is None
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    model = FlashMixtralForCausalLM("", config, MetaWeights(FakeGroup(0, world_size)))
    layer = model.model.layers[0]
    h, f, e, ws = config.hidden_size, config.intermediate_size, config.num_local_experts, world_size
    assert len(model.model.layers) == config.num_hidden_layers
    assert layer.moe.expert_w13.shape == (e, 2 * f // ws, h)
    assert layer.moe.expert_w2.shape == (e, h, f // ws)
    assert layer.moe.gate.shape == (e, h)
    assert layer.self_attn.query_key_value.base.weight.shape == ((32 if h == 4096 else 48) * 128 // ws + 2 * 8 * 128 // ws, h)
    assert layer.self_attn.o_proj.base.weight.shape == (h, config.num_attention_heads * 128 // ws)
    assert model.lm_head.weight.shape == (-(-config.vocab_size // ws), h)
    if world_size == 1:
        total = sum(p.numel() for p in model.parameters())
        assert total / 1e9 == pytest.approx(params_billions, rel=0.01)
        assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())
