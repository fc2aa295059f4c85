"""Rotary inverse frequencies against transformers' ROPE_INIT_FUNCTIONS; RMS norm against transformers."""

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lorax_server.layers.rmsnorm import RMSNorm
from lorax_server.layers.rotary import RotaryEmbedding

ROPE = {
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 8.0, "original_max_position_embeddings": 512, "beta_fast": 16, "beta_slow": 2},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
}


@pytest.mark.parametrize("rope_type", sorted(ROPE))
@pytest.mark.parametrize("seq_len", [100, 5000])
def test_inv_freq_matches_transformers(rope_type, seq_len):
    params = {"rope_type": rope_type, "rope_theta": 10000.0, **ROPE[rope_type]}
    config = transformers.MixtralConfig(hidden_size=256, num_attention_heads=4, head_dim=64,
                                        max_position_embeddings=2048, rope_parameters=dict(params))
    want, want_scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    ours = RotaryEmbedding(params, head_dim=64, max_position_embeddings=2048)
    got, got_scale = ours.inv_freq_for(seq_len)
    torch.testing.assert_close(got, want)
    assert got_scale == pytest.approx(want_scale)


def test_dynamic_rope_grows_only_past_the_trained_length():
    ours = RotaryEmbedding({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 64, 2048)
    short = torch.arange(10)
    cos_short, _ = ours(short, torch.float32)
    cos_long, _ = ours(torch.cat([short, torch.tensor([4000])]), torch.float32)
    default = RotaryEmbedding({"rope_type": "default", "rope_theta": 10000.0}, 64, 2048)
    torch.testing.assert_close(cos_short, default(short, torch.float32)[0])
    assert not torch.allclose(cos_long[:10], cos_short)


def test_rms_norm_matches_transformers_and_does_not_mutate():
    hf = transformers.models.mixtral.modeling_mixtral.MixtralRMSNorm(32, eps=1e-5)
    torch.nn.init.normal_(hf.weight)
    ours = RMSNorm(hf.weight.detach().clone(), 1e-5)
    x, residual = torch.randn(7, 32), torch.randn(7, 32)
    x0, r0 = x.clone(), residual.clone()
    normed, new_residual = ours(x, residual)
    torch.testing.assert_close(normed, hf(x + residual))
    torch.testing.assert_close(new_residual, x + residual)
    assert torch.equal(x, x0) and torch.equal(residual, r0)
    normed, new_residual = ours(x)
    assert new_residual is x and torch.allclose(normed, hf(x))
