"""PEFT LoRA adapters: our logits against the PEFT model's (or merged weights), in prefill and decode."""

import pytest
import torch

from tests.adapters.peft_adapters import ATTENTION_AND_HEAD, make_peft_adapter, store_for, write_per_expert_adapter
from tests.tiny_mixtral import load_ours, paged_logits, reference_logits, relative_error, save_tiny_mixtral

PROMPT_LENS = [9, 4, 14]
SEQUENCES = [list(range(2, 17)), list(range(40, 50)), list(range(60, 80))]

ADAPTERS = {
    "attention_and_lm_head": dict(target_modules=ATTENTION_AND_HEAD),
    "router_gate": dict(target_modules=["q_proj", "gate"]),
    "experts_transformers5": dict(target_modules=["w1", "w2", "w3"]),
    "experts_target_parameters": dict(target_modules=[], target_parameters=["gate_up_proj", "down_proj"]),
    "everything_rslora": dict(target_modules=ATTENTION_AND_HEAD + ["gate", "w1", "w2", "w3"], use_rslora=True),
    "rank_and_alpha_patterns": dict(target_modules=["q_proj", "v_proj", "o_proj"],
                                    rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 32}),
}


def assert_all_match(ours_logits, reference_model, changed_from=None):
    for tokens, got in zip(SEQUENCES, ours_logits):
        want = reference_logits(reference_model, tokens)
        assert relative_error(got, want) <= 1e-4
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        if changed_from is not None:  # the adapter really changes the output
            assert relative_error(want, reference_logits(changed_from, tokens)) > 1e-2


@pytest.mark.parametrize("case", sorted(ADAPTERS))
def test_peft_adapter_matches_peft(tmp_path, case):
    hf = save_tiny_mixtral(tmp_path / "base")
    peft_model = make_peft_adapter(hf, tmp_path / "adapter", seed=1, **ADAPTERS[case])
    model = load_ours(tmp_path / "base")
    store = store_for(model)
    store.load(1, tmp_path / "adapter")
    got = paged_logits(model, SEQUENCES, PROMPT_LENS, block_size=4, adapters=store, adapter_indices=[1, 1, 1])
    assert_all_match(got, peft_model, changed_from=hf)


def test_adapter_model_bin_is_read(tmp_path):
    hf = save_tiny_mixtral(tmp_path / "base")
    peft_model = make_peft_adapter(hf, tmp_path / "adapter", seed=2, target_modules=["k_proj", "o_proj"])
    from safetensors.torch import load_file

    path = tmp_path / "adapter" / "adapter_model.safetensors"
    torch.save(load_file(path), tmp_path / "adapter" / "adapter_model.bin")
    path.unlink()
    model = load_ours(tmp_path / "base")
    store = store_for(model)
    store.load(1, tmp_path / "adapter")
    assert_all_match(paged_logits(model, SEQUENCES, PROMPT_LENS, adapters=store, adapter_indices=[1, 1, 1]), peft_model)


def test_transformers4_per_expert_adapter_matches_merged_weights(tmp_path):
    hf = save_tiny_mixtral(tmp_path / "base")
    merged = write_per_expert_adapter(hf, tmp_path / "adapter", seed=3)
    model = load_ours(tmp_path / "base")
    store = store_for(model)
    store.load(5, tmp_path / "adapter")
    got = paged_logits(model, SEQUENCES, PROMPT_LENS, adapters=store, adapter_indices=[5, 5, 5])
    assert_all_match(got, merged, changed_from=hf)
