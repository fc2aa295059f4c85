"""Adapters PEFT loads that a plain LoRA loader gets wrong: per-module ranks and scales, base weights saved
beside the LoRA, embedding LoRA. Each is served as PEFT serves it (logits compared), or refused by name."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorax_server.adapters import AdapterError
from lorax_server.adapters.peft import MAX_LORA_SCALE
from tests.adapters.peft_adapters import make_peft_adapter, store_for, write_per_expert_adapter
from tests.tiny_mixtral import load_ours, paged_logits, reference_logits, relative_error, save_tiny_mixtral

SEQUENCES, PROMPT_LENS = [list(range(2, 15)), list(range(40, 48))], [8, 5]
HEAD_BASE = "base_model.model.lm_head.base_layer.weight"
EMBED_BASE = "base_model.model.model.embed_tokens.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(transformers model, our model, a directory for adapters)."""
    root = tmp_path_factory.mktemp("variants")
    hf = save_tiny_mixtral(root / "base")
    return hf, load_ours(root / "base"), root


def served_logits(ours, adapter_dir, **store_kwargs):
    store = store_for(ours, **store_kwargs)
    store.load(1, adapter_dir)
    return paged_logits(ours, SEQUENCES, PROMPT_LENS, block_size=4, adapters=store, adapter_indices=[1, 1])


def assert_matches(got, reference, unchanged_from=None, changed_from=None):
    for tokens, logits in zip(SEQUENCES, got):
        want = reference_logits(reference, tokens)
        assert relative_error(logits, want) <= 1e-4 and torch.equal(logits.argmax(-1), want.argmax(-1))
        if changed_from is not None:  # the adapter really changes the output
            assert relative_error(want, reference_logits(changed_from, tokens)) > 1e-2


# -- per-module ranks and scales, against PEFT -------------------------------------------------------------

AS_PEFT = {
    # PEFT (transformers 5) turns w1/w3 into gate_up_proj and records its rank as rank_pattern '.*\.gate_up_proj'.
    "expert ranks per layer": dict(target_modules=[], target_parameters=["gate_up_proj", "down_proj"],
                                   rank_pattern={"layers.1.mlp.experts.down_proj": 6, "gate_up_proj": 2},
                                   alpha_pattern={"layers.0.mlp.experts.gate_up_proj": 5}),
    "attention ranks per layer": dict(target_modules=["q_proj", "v_proj", "w1", "w2", "w3"],
                                      rank_pattern={"model.layers.1.self_attn.q_proj": 2, "v_proj": 6},
                                      alpha_pattern={"layers.0.self_attn.v_proj": 3}),
    "rslora with patterns": dict(target_modules=["q_proj", "o_proj", "w1", "w2", "w3"], use_rslora=True,
                                 rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 1}),
    # The router is PEFT's parameter `mlp.gate.weight` on transformers 5: a pattern "gate" does not reach it.
    "router patterns": dict(target_modules=["gate", "q_proj"], rank_pattern={"layers.0.mlp.gate.weight": 2},
                            alpha_pattern={"gate": 3, "layers.1.mlp.gate.weight": 16}),
    "negative lora_alpha": dict(target_modules=["q_proj", "lm_head", "w2"], alpha=-8),
}


@pytest.mark.parametrize("case", sorted(AS_PEFT))
def test_ranks_and_scales_are_peft_s(base, case):
    hf, ours, root = base
    peft_model = make_peft_adapter(hf, root / case.replace(" ", "_"), seed=3, **AS_PEFT[case])
    assert_matches(served_logits(ours, root / case.replace(" ", "_")), peft_model, changed_from=hf)


def test_lora_alpha_zero_is_the_base_model_as_in_peft(base):
    hf, ours, root = base
    peft_model = make_peft_adapter(hf, root / "alpha0", seed=3, alpha=0, target_modules=["q_proj", "w1", "w3"])
    got = served_logits(ours, root / "alpha0")
    assert_matches(got, peft_model)
    assert_matches(got, hf)


def test_transformers4_experts_of_different_ranks_match_merged_weights(base):
    """rank_pattern gives experts of one layer different ranks (PEFT on transformers 4 builds exactly that)."""
    hf, ours, root = base
    merged = write_per_expert_adapter(hf, root / "per_expert_ranks", seed=4, r=3, alpha=6,
                                      rank_pattern={"experts.0.w1": 5, "layers.1.block_sparse_moe.experts.2.w2": 2,
                                                    "w3": 4},
                                      alpha_pattern={"experts.3.w1": 2, "layers.0.block_sparse_moe.experts.1.w2": 9})
    ranks = {k: v.shape[0] for k, v in load_file(root / "per_expert_ranks" / "adapter_model.safetensors").items()
             if k.endswith("lora_A.weight")}
    assert sorted(set(ranks.values())) == [2, 3, 4, 5]
    assert_matches(served_logits(ours, root / "per_expert_ranks"), merged, changed_from=hf)


# -- scales that only make NaN ----------------------------------------------------------------------------


def set_config(directory, **changes):
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def test_a_scale_beyond_any_trained_adapter_is_refused(base, tmp_path):
    hf, ours, _ = base
    make_peft_adapter(hf, tmp_path / "a", seed=3, target_modules=["q_proj", "lm_head"])
    set_config(tmp_path / "a", lora_alpha=1e38)
    with pytest.raises(AdapterError, match=rf"adapter {tmp_path / 'a'}: module lm_head: LoRA scale 2.5e\+37 "
                                           rf"\(lora_alpha 1e\+38 / r, r=4\) is beyond \+-{MAX_LORA_SCALE:g}"):
        store_for(ours).load(1, tmp_path / "a")
    set_config(tmp_path / "a", lora_alpha=8, alpha_pattern={"q_proj": 4 * MAX_LORA_SCALE * 2})
    with pytest.raises(AdapterError, match=r"layers\.0\.self_attn\.q_proj: LoRA scale 2\.05e\+03"):
        store_for(ours).load(1, tmp_path / "a")
    set_config(tmp_path / "a", use_rslora=True, alpha_pattern={"q_proj": 2 * MAX_LORA_SCALE})  # / sqrt(4): at the bound
    store_for(ours).load(1, tmp_path / "a")


def test_weights_that_overflow_the_serving_dtype_are_refused(base, tmp_path):
    hf, ours, _ = base
    make_peft_adapter(hf, tmp_path / "a", seed=3, r=4, alpha=4000, target_modules=["q_proj"])
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    tensors[Q_B][0, 0] = 100.0  # times the scale 1000: beyond float16's 65504
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"q_proj: lora_B overflows torch.float16 \(values up to 1e\+05"):
        store_for(ours, dtype=torch.float16).load(1, tmp_path / "a")
    store_for(ours).load(1, tmp_path / "a")  # float32 holds it


# -- base weights saved with the adapter ------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_adapter(base):
    """A PEFT adapter with a LoRA on lm_head: PEFT saves lm_head.base_layer.weight beside it."""
    hf, _, root = base
    peft_model = make_peft_adapter(hf, root / "head", seed=5, target_modules=["q_proj", "lm_head"])
    assert HEAD_BASE in load_file(root / "head" / "adapter_model.safetensors")
    return root / "head", peft_model


def copy_with(adapter_dir, destination, edit):
    shutil.copytree(adapter_dir, destination)
    tensors = load_file(destination / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, destination / "adapter_model.safetensors")
    return destination


def test_the_model_s_own_lm_head_saved_in_the_adapter_is_accepted(base, head_adapter, tmp_path):
    hf, ours, _ = base
    adapter_dir, peft_model = head_adapter
    assert_matches(served_logits(ours, adapter_dir), peft_model, changed_from=hf)
    as_bf16 = copy_with(adapter_dir, tmp_path / "bf16", lambda t: t.__setitem__(HEAD_BASE, t[HEAD_BASE].bfloat16()))
    served_logits(ours, as_bf16)  # the same weight, rounded to the dtype it was trained in
    embedding = hf.model.embed_tokens.weight.detach().clone()  # as PEFT saves it for a resized vocabulary
    with_embedding = copy_with(adapter_dir, tmp_path / "embedding", lambda t: t.__setitem__(EMBED_BASE, embedding))
    served_logits(ours, with_embedding)


def perturb(key, rows):
    def edit(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][rows] += 0.05
    return edit


BASE_REFUSED = {
    "another lm_head": (perturb(HEAD_BASE, slice(0, 96)), rf"tensor {HEAD_BASE} is not the base model's lm_head "
                                                          r"weight \(6144 of 6144 entries differ, by up to 0\.05"),
    "one row of lm_head": (perturb(HEAD_BASE, slice(7, 8)), r"lm_head weight \(64 of 6144 entries differ"),
    "lm_head with NaN": (lambda t: t[HEAD_BASE].__setitem__((3, 3), float("nan")), r"\(1 of 6144 entries differ"),
    "another embedding": (lambda t: t.__setitem__(EMBED_BASE, torch.randn(96, 64)),
                          rf"tensor {EMBED_BASE} is not the base model's embed_tokens weight"),
    "resized vocabulary": (lambda t: t.__setitem__(HEAD_BASE, torch.zeros(100, 64)),
                           rf"tensor {HEAD_BASE} has shape \[100, 64\]; the base model's lm_head is \[96, 64\] \(an "
                           r"adapter trained with a resized vocabulary\?\)"),
}


@pytest.mark.parametrize("case", sorted(BASE_REFUSED))
def test_a_base_weight_other_than_the_model_s_is_refused(base, head_adapter, tmp_path, case):
    """PEFT would load that weight into the model; adapters here share the base model, so it is refused."""
    _, ours, _ = base
    edit, message = BASE_REFUSED[case]
    bad = copy_with(head_adapter[0], tmp_path / "bad", edit)
    store = store_for(ours)
    with pytest.raises(AdapterError, match=rf"adapter {bad}: .*{message}"):
        store.load(1, bad)
    assert not store.loaded


# -- embedding LoRA ---------------------------------------------------------------------------------------


def test_embedding_lora_is_refused_as_not_supported(base, tmp_path):
    hf, ours, _ = base
    make_peft_adapter(hf, tmp_path / "emb", seed=6, target_modules=["embed_tokens", "q_proj"])
    tensors = load_file(tmp_path / "emb" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in tensors
    with pytest.raises(AdapterError, match=r"adapter_config.json: target_modules names embed_tokens: LoRA on the token "
                                           r"embedding \(embed_tokens\) is not supported"):
        store_for(ours).load(1, tmp_path / "emb")
    set_config(tmp_path / "emb", target_modules=["q_proj"])  # the tensors alone say it too
    with pytest.raises(AdapterError, match=r"tensor base_model\.model\.model\.embed_tokens\.lora_embedding_[AB]: LoRA "
                                           r"on the token embedding \(embed_tokens\) is not supported"):
        store_for(ours).load(1, tmp_path / "emb")
