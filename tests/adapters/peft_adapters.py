"""PEFT adapters for the tiny Mixtral: made by PEFT itself, or written in the transformers-4 per-expert form."""

import copy
import json
from pathlib import Path

import peft
import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from lorax_server.adapters.store import AdapterStore

ATTENTION_AND_HEAD = ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]


def make_peft_adapter(hf_model, directory: Path, seed: int, r: int = 4, alpha: int = 8, **lora_kwargs):
    """Saves a PEFT LoRA with random (non-zero) A and B and returns the PEFT model that made it."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, **lora_kwargs)
    model = peft.get_peft_model(copy.deepcopy(hf_model), config).eval()
    with torch.no_grad():  # PEFT's random init is small; make the adapter change the output visibly
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(5.0)
    model.save_pretrained(directory)
    return model


def write_per_expert_adapter(hf_model, directory: Path, seed: int, r: int = 3, alpha: int = 6,
                             rank_pattern=None, alpha_pattern=None):
    """The transformers-4 + PEFT layout (experts.E.w1/w2/w3), and the model with those deltas merged in.
    `rank_pattern` / `alpha_pattern` give modules their own rank / alpha, resolved by PEFT's own rule."""
    g = torch.Generator().manual_seed(seed)
    config = hf_model.config
    H, F = config.hidden_size, config.intermediate_size
    merged = copy.deepcopy(hf_model)
    rank_pattern, alpha_pattern, tensors = rank_pattern or {}, alpha_pattern or {}, {}
    for layer_id, layer in enumerate(merged.model.layers):
        for e in range(config.num_local_experts):
            for name, (out_size, in_size) in {"w1": (F, H), "w2": (H, F), "w3": (F, H)}.items():
                module = f"model.layers.{layer_id}.block_sparse_moe.experts.{e}.{name}"
                rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r)
                scale = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha) / rank
                a, b = torch.randn(rank, in_size, generator=g) / in_size**0.5, torch.randn(out_size, rank, generator=g)
                key = f"base_model.model.{module}"
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
                delta = scale * b @ a
                with torch.no_grad():
                    if name == "w2":
                        layer.mlp.experts.down_proj[e] += delta
                    else:
                        rows = slice(0, F) if name == "w1" else slice(F, 2 * F)
                        layer.mlp.experts.gate_up_proj[e, rows] += delta
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["w1", "w2", "w3"], "bias": "none",
         "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}))
    return merged


def store_for(model, group=None, dtype=torch.float32, device="cpu") -> AdapterStore:
    """The model's adapter store; a `group` other than the model's (shards of an adapter for an unsharded model)
    leaves the saved base weights compared by shape only."""
    from lorax_server.utils.dist import FakeGroup

    group = group or FakeGroup(0, 1)
    same_shards = model.lm_head.process_group.size() == group.size()
    return AdapterStore(model.config, group, dtype, device, base_model=model if same_shards else None)
