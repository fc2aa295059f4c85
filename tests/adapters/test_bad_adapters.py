"""Bad adapters are refused at load with a message naming the problem; nothing is kept; the model still serves."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorax_server.adapters import AdapterError
from tests.adapters.peft_adapters import make_peft_adapter, store_for
from tests.tiny_mixtral import load_ours, paged_logits, save_tiny_mixtral

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def edit_tensors(directory, edit):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def set_nan(t):
    t[Q_A][0, 0] = float("nan")


def rename(old, new):
    return lambda t: t.__setitem__(new, t.pop(old))


BAD = {
    "wrong hidden size": (lambda t: t.__setitem__(Q_A, torch.zeros(4, 32)), None,
                          r"lora_A has shape \[4, 32\], the base model needs \[4, 64\]"),
    "wrong vocab": (lambda t: t.__setitem__("base_model.model.lm_head.lora_B.weight", torch.zeros(50, 4)), None,
                    r"lm_head: lora_B has shape \[50, 4\], the base model needs \[96, 4\]"),
    "layer beyond the model": (lambda t: (rename(Q_A, Q_A.replace("layers.0", "layers.7"))(t),
                                          rename(Q_B, Q_B.replace("layers.0", "layers.7"))(t)), None, None),
    "expert beyond the model": (lambda t: t.update({
        "base_model.model.model.layers.0.block_sparse_moe.experts.9.w1.lora_A.weight": torch.zeros(4, 64),
        "base_model.model.model.layers.0.block_sparse_moe.experts.9.w1.lora_B.weight": torch.zeros(96, 4)}),
        None, "expert 9 does not exist; the base model has 4 experts"),
    "rank 0": (lambda t: t.update({Q_A: torch.zeros(0, 64), Q_B: torch.zeros(64, 0)}), None, "rank 0 is not a LoRA"),
    "missing lora_B": (lambda t: t.pop(Q_B), None, "has lora_A but no lora_B"),
    "NaN weights": (set_nan, None, "lora_A holds NaN or infinite values"),
    "unknown target": (lambda t: t.update({
        "base_model.model.model.norm.lora_A.weight": torch.zeros(4, 64),
        "base_model.model.model.norm.lora_B.weight": torch.zeros(64, 4)}), None, "norm: unknown LoRA target"),
    "embedding LoRA": (lambda t: t.update({
        "base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(4, 64),
        "base_model.model.model.embed_tokens.lora_B.weight": torch.zeros(96, 4)}), None,
        r"embed_tokens\.lora_A\.weight: LoRA on the token embedding \(embed_tokens\) is not supported"),
    "DoRA": (None, dict(use_dora=True), r"DoRA \(use_dora\) is not supported"),
    "bias all": (None, dict(bias="all"), "bias='all' is not supported"),
    "modules_to_save": (None, dict(modules_to_save=["score"]), "modules_to_save"),
    "not LoRA": (None, dict(peft_type="IA3"), "peft_type 'IA3' is not supported"),
    # adapter_config.json and the weights disagree: PEFT would adapt other modules than the weights say
    "config targets another model's modules": (None, dict(target_modules=["gate_proj", "up_proj"]),
                                               r"module lm_head: the adapter has LoRA weights for it, but "
                                               r"adapter_config.json does not target it"),
    "config targets fewer modules": (None, dict(target_modules=["lm_head", "w1", "w3"]),
                                     r"module model.layers.0.self_attn.q_proj: the adapter has LoRA weights for it"),
    "config leaves a layer out": (None, dict(layers_to_transform=[1]),
                                  r"module model.layers.0.self_attn.q_proj: .*'layers_to_transform': \[1\]"),
    "all-linear leaves lm_head out": (None, dict(target_modules="all-linear"),
                                      r"module lm_head: the adapter has LoRA weights for it"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_refused_and_the_model_still_serves(tmp_path, case):
    hf = save_tiny_mixtral(tmp_path / "base")
    make_peft_adapter(hf, tmp_path / "good", seed=1, target_modules=["q_proj", "lm_head"])
    make_peft_adapter(hf, tmp_path / "bad", seed=1, target_modules=["q_proj", "lm_head", "w1", "w3"])
    tensor_edit, config_edit, message = BAD[case]
    if tensor_edit:
        edit_tensors(tmp_path / "bad", tensor_edit)
    if config_edit:
        edit_config(tmp_path / "bad", **config_edit)
    model = load_ours(tmp_path / "base")
    store = store_for(model)
    store.load(1, tmp_path / "good")
    sequences = [list(range(3, 12)), list(range(30, 36))]
    before = paged_logits(model, sequences, [5, 3], adapters=store, adapter_indices=[1, 0])
    with pytest.raises(AdapterError, match=message or "layer 7 does not exist; the base model has 2 layers"):
        store.load(2, tmp_path / "bad")
    assert sorted(store.loaded) == [1]  # nothing of the bad adapter is left
    after = paged_logits(model, sequences, [5, 3], adapters=store, adapter_indices=[1, 0])
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_adapter_for_a_model_with_more_experts_is_refused(tmp_path):
    other = save_tiny_mixtral(tmp_path / "other", num_local_experts=8)
    make_peft_adapter(other, tmp_path / "bad", seed=1, target_modules=["gate"])
    save_tiny_mixtral(tmp_path / "base")
    store = store_for(load_ours(tmp_path / "base"))
    with pytest.raises(AdapterError, match=r"lora_B has shape \[8, 4\], the base model needs \[4, 4\]"):
        store.load(1, tmp_path / "bad")


def test_index_rules(tmp_path):
    hf = save_tiny_mixtral(tmp_path / "base")
    make_peft_adapter(hf, tmp_path / "good", seed=1, target_modules=["q_proj"])
    store = store_for(load_ours(tmp_path / "base"))
    with pytest.raises(AdapterError, match="index 0 is the base model"):
        store.load(0, tmp_path / "good")
    store.load(1, tmp_path / "good")
    with pytest.raises(AdapterError, match="already holds"):
        store.load(1, tmp_path / "good")
    with pytest.raises(AdapterError, match="adapter index 4 is not loaded"):
        store.batch_data(torch.tensor([0, 4, 1]))
    with pytest.raises(AdapterError, match="adapter index 3 is not loaded"):
        store.offload(3)
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        store.load(2, tmp_path / "nowhere")


def test_rank_beyond_the_kernels_is_refused_when_they_serve(tmp_path):
    """With the GPU kernels (forced on here; the check precedes any kernel) a rank above MAX_KERNEL_RANK
    is refused by name; the torch loop takes it."""
    from lorax_server.adapters.store import MAX_KERNEL_RANK

    hf = save_tiny_mixtral(tmp_path / "base")
    make_peft_adapter(hf, tmp_path / "wide", seed=1, r=MAX_KERNEL_RANK + 1, target_modules=["q_proj"])
    model = load_ours(tmp_path / "base")
    store = store_for(model)
    store.use_kernels = True
    with pytest.raises(AdapterError, match=f"rank {MAX_KERNEL_RANK + 1}; the GPU LoRA kernels take at most"):
        store.load(1, tmp_path / "wide")
    assert not store.loaded and store.stacks is None
    store.use_kernels = False
    store.load(1, tmp_path / "wide")
