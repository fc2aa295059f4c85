"""Our FlashMixtralForCausalLM against transformers' MixtralForCausalLM (fp32, CPU, tiny random configs).

Each case: a ragged batch of three prompts packed with cu_seqlens into a paged cache whose blocks are
shuffled, then teacher-forced decode steps; every position's logits are compared with transformers'
forward over the whole sequence. Bound: relative error 1e-4 and identical argmax.
"""

import pytest
import torch

from lorax_server.models.custom_modeling.flash_mixtral_modeling import DenseMoE
from tests.tiny_mixtral import load_ours, paged_logits, reference_logits, relative_error, save_tiny_mixtral

PROMPT_LENS = [13, 5, 21]
DECODE_STEPS = 7

CASES = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_key_value_heads=1),
    "head_dim_differs": dict(head_dim=24),
    "top1": dict(num_experts_per_tok=1),
    "all_experts": dict(num_experts_per_tok=4),
    "sliding_window": dict(sliding_window=8),
    "tied_embeddings": dict(tie_word_embeddings=True),
    "rope_linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "rope_yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 64}),
    "rope_llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 16}),
}


def random_sequences(seed=1, vocab=96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n + DECODE_STEPS,), generator=g).tolist() for n in PROMPT_LENS]


def assert_matches(hf, ours_logits, sequences):
    for tokens, got in zip(sequences, ours_logits):
        want = reference_logits(hf, tokens)
        assert relative_error(got, want) <= 1e-4
        assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("block_size", [1, 16])
def test_logits_match_transformers(tmp_path, case, block_size):
    hf = save_tiny_mixtral(tmp_path, **CASES[case])
    sequences = random_sequences()
    got = paged_logits(load_ours(tmp_path), sequences, PROMPT_LENS, block_size=block_size, num_blocks=80)
    assert_matches(hf, got, sequences)


def test_dense_moe_matches_transformers(tmp_path):
    hf = save_tiny_mixtral(tmp_path)
    sequences = random_sequences(seed=2)
    got = paged_logits(load_ours(tmp_path, moe_cls=DenseMoE), sequences, PROMPT_LENS)
    assert_matches(hf, got, sequences)


@pytest.mark.parametrize("backend", ["reference", "grouped_mm"])
def test_each_expert_backend_matches_transformers(tmp_path, monkeypatch, backend):
    monkeypatch.setenv("LORAX_MOE_BACKEND", backend)
    hf = save_tiny_mixtral(tmp_path)
    sequences = random_sequences(seed=3)
    assert_matches(hf, paged_logits(load_ours(tmp_path), sequences, PROMPT_LENS), sequences)
