"""Loading PEFT LoRA adapters for Mixtral: validated against the base model, then sharded for this rank.

Supported targets: q_proj, k_proj, v_proj, o_proj, lm_head, the router `gate`, and the experts in both
formats found in the wild:
  - per expert, written by transformers 4.x + PEFT:
      model.layers.N.block_sparse_moe.experts.E.{w1,w2,w3}.lora_{A,B}.weight
  - PEFT's parameter-targeted form on transformers 5 (3-D gate_up_proj [E, 2F, H] / down_proj [E, H, F]):
      model.layers.N.mlp.experts[.base_layer]*.lora_A.weight  [E*r, in]   rows expert-major (e, r)
      model.layers.N.mlp.experts[.base_layer]*.lora_B.weight  [out, r*E] columns expert-minor (r, e)
    PEFT nests one wrapper per targeted parameter, so which key is gate_up and which is down depends
    on the order of `target_parameters`; we tell them apart by shape (in = H and out = 2F is gate_up).
Every expert LoRA becomes one LoRA on the fused w13 (gate rows then up rows) and one on w2; a
transformers-4 adapter's w1 and w3 are stacked block-diagonally into w13.

Everything is checked before anything is kept, so a refused adapter leaves nothing behind.
"""

import json
import math
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file

from lorax_server.adapters.weights import AdapterError, AdapterWeights, ExpertLoraWeights, LoraWeights
from lorax_server.layers.linear import vocab_shard
from lorax_server.models.custom_modeling.flash_mixtral_modeling import (
    ATTN_K_PROJ,
    ATTN_O_PROJ,
    ATTN_Q_PROJ,
    ATTN_V_PROJ,
    LM_HEAD,
    LM_HEAD_LAYER_ID,
    ROUTER,
)
from lorax_server.utils.weights import shard_range

ATTENTION_TARGETS = {"q_proj": ATTN_Q_PROJ, "k_proj": ATTN_K_PROJ, "v_proj": ATTN_V_PROJ, "o_proj": ATTN_O_PROJ}

ATTENTION = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)")
ROUTER_GATE = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate")
PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])")
STACKED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts((?:\.base_layer)*)")
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$")

UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "lora_bias": "LoRA bias (lora_bias)",
}


def read_adapter_dir(adapter_dir) -> Tuple[dict, Dict[str, torch.Tensor]]:
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{config_file} does not exist: not a PEFT adapter directory")
    config = json.loads(config_file.read_text())
    if (adapter_dir / "adapter_model.safetensors").is_file():
        tensors = load_file(adapter_dir / "adapter_model.safetensors")
    elif (adapter_dir / "adapter_model.bin").is_file():
        # weights_only: a pickle from elsewhere can hold nothing but tensors.
        tensors = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise AdapterError(f"{adapter_dir} has neither adapter_model.safetensors nor adapter_model.bin")
    return config, tensors


def check_peft_config(config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type '{config.get('peft_type')}' is not supported; only LORA")
    for flag, what in UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise AdapterError(f"{what} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"bias='{config['bias']}' is not supported; only bias='none'")
    if config.get("modules_to_save"):
        raise AdapterError(f"modules_to_save {config['modules_to_save']} is not supported")
    if config.get("fan_in_fan_out"):
        raise AdapterError("fan_in_fan_out=True is not supported (Mixtral's linears are not Conv1D)")


def pattern_value(patterns: dict, names, default):
    """PEFT's rule: a pattern key matches a module name that ends with it (as a regex)."""
    for key, value in (patterns or {}).items():
        if any(re.match(rf"(.*\.)?({key})$", name) for name in names):
            return value
    return default


class PeftLoraLoader:
    """Turns one PEFT adapter directory into this rank's `AdapterWeights` for a Mixtral model."""

    def __init__(self, model_config, process_group, dtype: torch.dtype, device):
        self.c = model_config
        self.group = process_group
        self.dtype = dtype
        self.device = torch.device(device)

    def load(self, adapter_dir, adapter_id: Optional[str] = None) -> AdapterWeights:
        config, tensors = read_adapter_dir(adapter_dir)
        check_peft_config(config)
        return self.build(config, self.pair_tensors(tensors), adapter_id or str(adapter_dir))

    def build(self, config: dict, pairs: Dict[str, Tuple[torch.Tensor, torch.Tensor]], adapter_id: str) -> AdapterWeights:
        """(PEFT config, full unscaled (A, B) per module) -> this rank's AdapterWeights, checked and scaled."""
        adapter = AdapterWeights(adapter_id)
        per_expert: Dict[int, Dict] = {}
        for module, (a, b) in sorted(pairs.items()):
            self.check_values(module, a, b)
            self.add_module(adapter, per_expert, config, module, a, b)
        for layer, modules in per_expert.items():
            self.add_per_expert_layer(adapter, layer, modules)
        if not adapter.linear and not adapter.experts:
            raise AdapterError(f"adapter {adapter.adapter_id} has no LoRA weights")
        return adapter

    # -- parsing and checks --------------------------------------------------------------------------

    def pair_tensors(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        halves: Dict[str, Dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = LORA_KEY.match(key)
            if match is None:
                if key.endswith("lm_head.base_layer.weight") and list(tensor.shape) == [self.c.vocab_size, self.c.hidden_size]:
                    continue  # PEFT saves the base lm_head beside a LoRA on it; the base model has it already
                raise AdapterError(f"unexpected tensor {key} in the adapter (only lora_A / lora_B are supported)")
            halves.setdefault(match.group(1), {})[match.group(2)] = tensor
        for module, ab in halves.items():
            for half in "AB":
                if half not in ab:
                    raise AdapterError(f"module {module} has lora_{'BA'[half == 'B']} but no lora_{half}")
        return {module: (ab["A"], ab["B"]) for module, ab in halves.items()}

    def check_values(self, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(f"module {module}: lora_A and lora_B must be matrices")
        if a.shape[0] == 0 or b.shape[1] == 0:
            raise AdapterError(f"module {module}: rank 0 is not a LoRA")
        if a.shape[0] != b.shape[1]:
            raise AdapterError(f"module {module}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]}")
        for name, t in (("lora_A", a), ("lora_B", b)):
            if not torch.isfinite(t).all():
                raise AdapterError(f"module {module}: {name} holds NaN or infinite values")

    def check_layer(self, module: str, layer: int) -> None:
        if layer >= self.c.num_hidden_layers:
            raise AdapterError(f"module {module}: layer {layer} does not exist; the base model has "
                               f"{self.c.num_hidden_layers} layers")

    @staticmethod
    def check_shape(module: str, what: str, tensor: torch.Tensor, expected) -> None:
        if list(tensor.shape) != list(expected):
            raise AdapterError(f"module {module}: {what} has shape {list(tensor.shape)}, the base model needs "
                               f"{list(expected)} (an adapter for another base model?)")

    def scale(self, config: dict, names, rank: int) -> float:
        r = pattern_value(config.get("rank_pattern"), names, config.get("r", rank))
        alpha = pattern_value(config.get("alpha_pattern"), names, config.get("lora_alpha", r))
        return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

    # -- targets ------------------------------------------------------------------------------------

    def add_module(self, adapter: AdapterWeights, per_expert: Dict, config: dict, module: str, a, b) -> None:
        c, r = self.c, a.shape[0]
        if module == "lm_head" or module.endswith(".lm_head"):
            self.check_shape(module, "lora_A", a, (r, c.hidden_size))
            self.check_shape(module, "lora_B", b, (c.vocab_size, r))
            rows = vocab_shard(c.vocab_size, self.group)
            block = -(-c.vocab_size // self.group.size())
            b_shard = torch.nn.functional.pad(b[rows], (0, 0, 0, block - (rows.stop - rows.start)))
            adapter.linear[(LM_HEAD_LAYER_ID, LM_HEAD)] = self.lora(a.T, b_shard.T * self.scale(config, [module], r))
        elif m := ATTENTION.fullmatch(module):
            self.add_attention(adapter, config, module, int(m.group(1)), m.group(2), a, b)
        elif m := ROUTER_GATE.fullmatch(module):
            self.check_layer(module, int(m.group(1)))
            self.check_shape(module, "lora_A", a, (r, c.hidden_size))
            self.check_shape(module, "lora_B", b, (c.num_local_experts, r))
            scale = self.scale(config, [module, module + ".weight"], r)
            adapter.linear[(int(m.group(1)), ROUTER)] = self.lora(a.T, b.T * scale)
        elif m := PER_EXPERT.fullmatch(module):
            layer, expert = int(m.group(1)), int(m.group(2))
            self.check_layer(module, layer)
            if expert >= c.num_local_experts:
                raise AdapterError(f"module {module}: expert {expert} does not exist; the base model has "
                                   f"{c.num_local_experts} experts")
            per_expert.setdefault(layer, {})[(expert, m.group(3))] = (a, b * self.scale(config, [module], r))
        elif m := STACKED_EXPERTS.fullmatch(module):
            self.add_stacked_experts(adapter, config, module, int(m.group(1)), a, b)
        else:
            raise AdapterError(f"module {module}: unknown LoRA target; supported: q_proj, k_proj, v_proj, o_proj, "
                               f"lm_head, the router gate, and the experts (w1/w2/w3 or gate_up_proj/down_proj)")

    def add_attention(self, adapter, config, module, layer, proj, a, b) -> None:
        c, r = self.c, a.shape[0]
        self.check_layer(module, layer)
        q_size, kv_size = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        in_size = q_size if proj == "o_proj" else c.hidden_size
        out_size = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size, "o_proj": c.hidden_size}[proj]
        self.check_shape(module, "lora_A", a, (r, in_size))
        self.check_shape(module, "lora_B", b, (out_size, r))
        b = b * self.scale(config, [module], r)
        if proj == "o_proj":  # row-parallel: A takes this rank's input columns
            a = a[:, shard_range(in_size, self.group.rank(), self.group.size(), f"module {module} lora_A")]
        else:  # column-parallel: B takes this rank's output rows
            b = b[shard_range(out_size, self.group.rank(), self.group.size(), f"module {module} lora_B")]
        adapter.linear[(layer, ATTENTION_TARGETS[proj])] = self.lora(a.T, b.T)

    def add_stacked_experts(self, adapter, config, module, layer, a, b) -> None:
        """PEFT's transformers-5 form: A [E*r, in] expert-major, B [out, r*E] expert-minor."""
        c, E = self.c, self.c.num_local_experts
        self.check_layer(module, layer)
        if a.shape[0] % E:
            raise AdapterError(f"module {module}: lora_A has {a.shape[0]} rows, not a multiple of the base "
                               f"model's {E} experts")
        r = a.shape[0] // E
        is_gate_up = a.shape[1] == c.hidden_size and b.shape[0] == 2 * c.intermediate_size
        is_down = a.shape[1] == c.intermediate_size and b.shape[0] == c.hidden_size
        if not (is_gate_up or is_down):
            raise AdapterError(f"module {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} fit neither "
                               f"gate_up_proj [{E}, {2 * c.intermediate_size}, {c.hidden_size}] nor down_proj "
                               f"[{E}, {c.hidden_size}, {c.intermediate_size}] of the base model")
        param = f"model.layers.{layer}.mlp.experts." + ("gate_up_proj" if is_gate_up else "down_proj")
        a_e = a.reshape(E, r, a.shape[1])  # [E, r, in]
        b_e = b.reshape(b.shape[0], r, E).permute(2, 0, 1) * self.scale(config, [param], r)  # [E, out, r]
        self.add_experts(adapter, layer, "w13" if is_gate_up else "w2", a_e, b_e)

    def add_per_expert_layer(self, adapter, layer: int, modules: Dict) -> None:
        """transformers-4 form: stack the experts; w1 and w3 go block-diagonally into one w13 LoRA."""
        c, E = self.c, self.c.num_local_experts
        F_, H = c.intermediate_size, c.hidden_size
        ranks = {name: a.shape[0] for (_, name), (a, _) in modules.items()}
        for (expert, name), (a, b) in modules.items():
            module = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{name}"
            in_size, out_size = (F_, H) if name == "w2" else (H, F_)
            self.check_shape(module, "lora_A", a, (ranks[name], in_size))
            self.check_shape(module, "lora_B", b, (out_size, ranks[name]))
        if "w1" in ranks or "w3" in ranks:
            r1, r3 = ranks.get("w1", 0), ranks.get("w3", 0)
            a13, b13 = torch.zeros(E, r1 + r3, H), torch.zeros(E, 2 * F_, r1 + r3)
            for (e, name), (a, b) in modules.items():
                if name == "w1":
                    a13[e, :r1], b13[e, :F_, :r1] = a, b
                elif name == "w3":
                    a13[e, r1:], b13[e, F_:, r1:] = a, b
            self.add_experts(adapter, layer, "w13", a13, b13)
        if "w2" in ranks:
            a2, b2 = torch.zeros(E, ranks["w2"], F_), torch.zeros(E, H, ranks["w2"])
            for (e, name), (a, b) in modules.items():
                if name == "w2":
                    a2[e], b2[e] = a, b
            self.add_experts(adapter, layer, "w2", a2, b2)

    def add_experts(self, adapter, layer: int, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Shards like the base experts: w13's B rows (gate and up halves alike), w2's A columns."""
        F_, rank, world = self.c.intermediate_size, self.group.rank(), self.group.size()
        rows = shard_range(F_, rank, world, "expert ffn")
        if name == "w13":
            b = torch.cat([b[:, rows], b[:, F_:][:, rows]], dim=1)
        else:
            a = a[:, :, rows]
        key = (layer, name)
        if key in adapter.experts:
            raise AdapterError(f"layer {layer}: expert LoRA on {name} is given twice (both formats?)")
        adapter.experts[key] = ExpertLoraWeights(self.to_device(a), self.to_device(b))

    def lora(self, a: torch.Tensor, b: torch.Tensor) -> LoraWeights:
        return LoraWeights(self.to_device(a), self.to_device(b))

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype).contiguous()
