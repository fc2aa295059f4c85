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
transformers-4 adapter's w1 and w3 are stacked block-diagonally into w13, each expert zero-padded to the
largest rank of its layer when `rank_pattern` gives experts different ranks (exact: the padding adds 0).

Everything is checked before anything is kept, so a refused adapter leaves nothing behind. A malformed
file or config is an AdapterError naming the file or field and what is wrong with it; `load` prefixes
every refusal with the adapter's name.
"""

import json
import math
import pickle
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file

from lorax_server.adapters.targets import (
    ATTN_K_PROJ,
    ATTN_O_PROJ,
    ATTN_Q_PROJ,
    ATTN_V_PROJ,
    LM_HEAD,
    LM_HEAD_LAYER_ID,
    ROUTER,
)
from lorax_server.adapters.weights import AdapterError, AdapterWeights, ExpertLoraWeights, LoraWeights
from lorax_server.layers.linear import vocab_shard
from lorax_server.utils.weights import shard_range

ATTENTION_TARGETS = {"q_proj": ATTN_Q_PROJ, "k_proj": ATTN_K_PROJ, "v_proj": ATTN_V_PROJ, "o_proj": ATTN_O_PROJ}

ATTENTION = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)")
ROUTER_GATE = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate")
PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])")
STACKED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts((?:\.base_layer)*)")
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$")
# The base weight PEFT saves beside a LoRA on lm_head / embed_tokens (`.base_layer`), or for a resized vocabulary.
BASE_WEIGHT = re.compile(r"^(?:base_model\.model\.)?(lm_head|model\.embed_tokens)(?:\.base_layer)?\.weight$")
EMBEDDING_LORA = re.compile(r"^(?:base_model\.model\.)?(?:.+\.)?embed_tokens\.lora_(?:embedding_)?[AB](?:\.weight)?$")
EMBEDDING_REFUSAL = ("LoRA on the token embedding (embed_tokens) is not supported; LoRA is served on q_proj, k_proj, "
                     "v_proj, o_proj, lm_head, the router gate and the experts")

UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# |lora_alpha / r| (lora_alpha / sqrt(r) with rsLoRA) beyond this is refused as a corrupt or mistaken config.
# Trained adapters set lora_alpha to r .. 4r (scales 1 to 4); this leaves room for alpha_pattern outliers, while
# a scale such as 1e38 gives nothing but NaN logits (which is what PEFT serves for it).
MAX_LORA_SCALE = 1024.0
# Saved base weights equal the model's up to the rounding of the coarser dtype, plus this (fp16 subnormals).
BASE_WEIGHT_ATOL = 1e-6
MAX_QUOTED = 200  # characters of a parser's message or of a file's key quoted in a refusal

UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+)")


def shorten(text: str, limit: int = MAX_QUOTED) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def brief(error: Exception) -> str:
    """`Type: first sentence of the message`, bounded."""
    lines = str(error).strip().splitlines()
    first = re.split(r"\.\s", lines[0])[0] if lines else ""
    return shorten(f"{type(error).__name__}: {first}" if first else type(error).__name__)


def json_kind(value) -> str:
    kinds = ((bool, "boolean"), (dict, "object"), (list, "list"), (str, "string"), ((int, float), "number"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")


def is_finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# -- files ----------------------------------------------------------------------------------------------


def read_adapter_dir(adapter_dir) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(adapter_config.json, the tensors of adapter_model.safetensors or else adapter_model.bin); any missing,
    unreadable or malformed file is an AdapterError naming it."""
    adapter_dir = Path(adapter_dir)
    config = read_config(adapter_dir / "adapter_config.json")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).is_file():
            tensors = read_weights(adapter_dir / name)
            check_tensors(adapter_dir / name, tensors)
            return config, tensors
    raise AdapterError(f"{adapter_dir} has neither adapter_model.safetensors nor adapter_model.bin")


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise AdapterError(f"{path} does not exist: not a PEFT adapter directory")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AdapterError(f"{path} cannot be read: {e.strerror or brief(e)}") from None
    if not raw.strip():
        raise AdapterError(f"{path} is empty")
    try:
        config = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, or bytes that are not text
        raise AdapterError(f"{path} is not valid JSON ({shorten(str(e))})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path} holds a JSON {json_kind(config)}, not an object of LoRA settings")
    return config


def read_weights(path: Path) -> Dict[str, torch.Tensor]:
    try:
        with path.open("rb") as f:
            empty = not f.read(1)
    except OSError as e:
        raise AdapterError(f"{path} cannot be read: {e.strerror or brief(e)}") from None
    if empty:
        raise AdapterError(f"{path} is empty")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        # weights_only: the pickle may rebuild tensors and plain containers only; nothing in it is called.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise AdapterError(unpickling_refusal(path, e)) from None
    except Exception as e:  # whatever the parser of an untrusted file raises, the file is malformed
        raise AdapterError(f"{path} is truncated or corrupt ({brief(e)})") from None


def unpickling_refusal(path: Path, error: Exception) -> str:
    text = str(error)
    if m := UNSAFE_GLOBAL.search(text):
        return (f"{path} is refused: its pickle calls {shorten(m.group(1))}, which weights-only loading never runs "
                "(a .bin adapter may hold tensors only; adapter_model.safetensors cannot hold code)")
    detail = shorten(m.group(1)) if (m := UNPICKLER_DETAIL.search(text)) else brief(error)
    return f"{path} is corrupt or not a PyTorch tensor file ({detail})"


def check_tensors(path: Path, tensors) -> None:
    if not isinstance(tensors, dict):
        raise AdapterError(f"{path} holds a {type(tensors).__name__}, not a dict of named tensors")
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise AdapterError(f"{path}: entry {shorten(repr(key))} is not a named tensor (it is {type(t).__name__})")
        if t.layout != torch.strided:
            raise AdapterError(f"{path}: tensor {shorten(key)} is stored as {t.layout}, not as a dense tensor")
        if t.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{path}: tensor {shorten(key)} has dtype {t.dtype}; LoRA weights are float32, "
                               "float16, bfloat16 or float64")


# -- adapter_config.json -----------------------------------------------------------------------------------


def check_peft_config(config: dict) -> None:
    """The settings of adapter_config.json the loader relies on; each refusal names its field and why."""
    check_method(config)
    for field, meaning in (("r", "the LoRA rank"), ("lora_alpha", "the LoRA scale is lora_alpha / r")):
        if field not in config:
            raise AdapterError(f"adapter_config.json has no '{field}' ({meaning})")
    check_rank("r", config["r"])
    check_alpha("lora_alpha", config["lora_alpha"])
    check_patterns(config, "rank_pattern", check_rank)
    check_patterns(config, "alpha_pattern", check_alpha)
    check_targets(config)
    if config.get("use_rslora") not in (None, False, True):
        raise AdapterError(f"adapter_config.json: use_rslora must be true or false, got "
                           f"{shorten(repr(config['use_rslora']))}")


def check_method(config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type '{shorten(str(config.get('peft_type')))}' is not supported; only LORA")
    for flag, what in UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise AdapterError(f"{what} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"bias='{shorten(str(config['bias']))}' is not supported; only bias='none'")
    if config.get("modules_to_save"):
        raise AdapterError(f"modules_to_save {shorten(str(config['modules_to_save']))} is not supported")
    if config.get("fan_in_fan_out"):
        raise AdapterError("fan_in_fan_out=True is not supported (Mixtral's linears are not Conv1D)")


def check_rank(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterError(f"adapter_config.json: {field} must be a positive integer (a LoRA rank), "
                           f"got {shorten(repr(value))}")


def check_alpha(field: str, value) -> None:
    if not is_finite_number(value):
        raise AdapterError(f"adapter_config.json: {field} must be a finite number (the LoRA scale is lora_alpha / r), "
                           f"got {shorten(repr(value))}")


def check_patterns(config: dict, field: str, check_value) -> None:
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise AdapterError(f"adapter_config.json: {field} must be an object of {{pattern: value}}, "
                           f"got a {json_kind(patterns)}")
    for key, value in patterns.items():
        pattern_regex(key, field)
        check_value(f"{field}[{shorten(repr(key))}]", value)


def check_targets(config: dict) -> None:
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as e:
                raise AdapterError(f"adapter_config.json: {field} {shorten(repr(value))} is not a valid regular "
                                   f"expression ({e})") from None
        elif value is not None and not is_str_list(value):
            raise AdapterError(f"adapter_config.json: {field} must be a list of module names or a regular "
                               f"expression, got {shorten(repr(value))}")
    if config.get("target_parameters") is not None and not is_str_list(config["target_parameters"]):
        raise AdapterError(f"adapter_config.json: target_parameters must be a list of parameter names, "
                           f"got {shorten(repr(config['target_parameters']))}")
    if targets_embedding(config.get("target_modules")):
        raise AdapterError(f"adapter_config.json: target_modules names embed_tokens: {EMBEDDING_REFUSAL}")


ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output layer (lm_head)


def check_targeted(config: dict, module: str) -> None:
    """LoRA weights for a module adapter_config.json does not target mean the two disagree (an adapter made for
    another model, or an edited config): PEFT would not adapt that module, so serving it would differ from PEFT.
    The experts' transformers-5 form is targeted by parameter (`target_parameters`) and is not checked here."""
    if STACKED_EXPERTS.fullmatch(module) or is_targeted(config, module):
        return
    scope = {k: config[k] for k in ("target_modules", "exclude_modules", "layers_to_transform") if config.get(k)}
    raise AdapterError(f"module {module}: the adapter has LoRA weights for it, but adapter_config.json does not "
                       f"target it ({shorten(repr(scope))}): the config and the weights disagree")


def is_targeted(config: dict, module: str) -> bool:
    """PEFT's rule for whether `module` (its name in the base model) is adapted: its weight is one of
    target_parameters (names or suffixes of parameter names: transformers 5's router `gate.weight`), or
    target_modules is a regex the whole name matches, a list of names it is or ends with, or 'all-linear';
    exclude_modules (the same forms) takes names out; layers_to_transform, when given, keeps the layers it
    lists. Without target_modules there is nothing to compare with."""
    parameters = config.get("target_parameters") or []
    if any(names_module([p], module + ".weight") for p in parameters):  # e.g. "gate.weight": the router (tf 5)
        return True
    targets = config.get("target_modules")
    if targets is None:
        return True
    if targets == ALL_LINEAR:
        hit = not (module == "lm_head" or module.endswith(".lm_head"))
    else:
        hit = names_module(targets, module)
    if hit and config.get("exclude_modules"):
        hit = not names_module(config["exclude_modules"], module)
    layers = config.get("layers_to_transform")
    if hit and layers is not None:
        allowed = {layers} if isinstance(layers, int) else set(layers) if is_int_list(layers) else None
        if allowed is None:
            raise AdapterError(f"adapter_config.json: layers_to_transform must be a layer index or a list of them, "
                               f"got {shorten(repr(layers))}")
        m = re.match(r"model\.layers\.(\d+)\.", module)
        hit = m is None or int(m.group(1)) in allowed
    return hit


def names_module(names, module: str) -> bool:
    """Whether target_modules-style `names` (a regex for the whole name, or a list of names or suffixes) names
    `module`."""
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module == name or module.endswith("." + name) for name in names)


def is_int_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def targets_embedding(target_modules) -> bool:
    """PEFT's rule: a list names modules by suffix, a string is a regex the whole module name must match."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, "model.embed_tokens") is not None
    return any(t.split(".")[-1] == "embed_tokens" for t in target_modules or [])


def pattern_regex(key: str, field: str = "pattern") -> "re.Pattern":
    """PEFT's rule for rank_pattern / alpha_pattern: a key matches the module names that end with it, as a regex."""
    try:
        re.compile(key)  # alone first, so that an error's position is within the key
        return re.compile(rf"(.*\.)?({key})$")
    except re.error as e:
        raise AdapterError(f"adapter_config.json: {field} key {shorten(repr(key))} is not a valid regular "
                           f"expression ({e})") from None


def pattern_value(patterns: dict, name: str, default):
    """The value of the first pattern key (in the file's order, as PEFT) that matches `name`."""
    for key, value in (patterns or {}).items():
        if pattern_regex(key).match(name):
            return value
    return default


def weights_differ(saved: torch.Tensor, base: torch.Tensor, chunk_rows: int = 4096) -> Tuple[int, float]:
    """(entries that differ, largest difference) between two [rows, hidden] weights, beyond the rounding of the
    coarser of their dtypes (a float32 copy of a bfloat16 model's weight is the same weight). NaN differs."""
    rtol = max(torch.finfo(saved.dtype).eps, torch.finfo(base.dtype).eps)
    count, worst = 0, 0.0
    for start in range(0, saved.shape[0], chunk_rows):
        s = saved[start:start + chunk_rows].float()
        b = base[start:start + chunk_rows].to("cpu", torch.float32)
        diff = (s - b).abs()
        bad = ~(diff <= rtol * b.abs() + BASE_WEIGHT_ATOL)
        if bad.any():
            count += int(bad.sum())
            worst = torch.tensor([worst, diff[bad].max().item()]).max().item()  # NaN wins
    return count, worst


class PeftLoraLoader:
    """Turns one PEFT adapter directory into this rank's `AdapterWeights` for a Mixtral model.

    `base_model`, the served FlashMixtralForCausalLM, lets the loader compare the lm_head / embed_tokens weight an
    adapter saves with the model's; without it only the shape of such a weight is checked."""

    def __init__(self, model_config, process_group, dtype: torch.dtype, device, base_model=None):
        self.c = model_config
        self.group = process_group
        self.dtype = dtype
        self.device = torch.device(device)
        self.base_model = base_model

    def load(self, adapter_dir, adapter_id: Optional[str] = None) -> AdapterWeights:
        name = adapter_id or str(adapter_dir)
        try:
            config, tensors = read_adapter_dir(adapter_dir)
            check_peft_config(config)
            pairs = self.pair_tensors(tensors)
            weights = self.build(config, pairs, name)
            self.check_ranks(config, pairs)
            return weights
        except AdapterError as e:
            raise AdapterError(f"adapter {shorten(name)}: {e}") from None

    def build(self, config: dict, pairs: Dict[str, Tuple[torch.Tensor, torch.Tensor]], adapter_id: str) -> AdapterWeights:
        """(PEFT config, full unscaled (A, B) per module) -> this rank's AdapterWeights, checked and scaled."""
        adapter = AdapterWeights(adapter_id)
        per_expert: Dict[int, Dict] = {}
        for module, (a, b) in sorted(pairs.items()):
            self.check_values(module, a, b)
            self.add_module(adapter, per_expert, config, module, a, b)  # first what the model has, then the config
            check_targeted(config, module)
        for layer, modules in per_expert.items():
            self.add_per_expert_layer(adapter, layer, modules)
        if not adapter.linear and not adapter.experts:
            raise AdapterError("no LoRA weights (no lora_A / lora_B tensors)")
        return adapter

    # -- parsing and checks --------------------------------------------------------------------------

    def pair_tensors(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """{module: (lora_A, lora_B)}; a base weight saved beside them is checked against the model's and dropped."""
        halves: Dict[str, Dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            if m := BASE_WEIGHT.match(key):
                self.check_base_weight(key, "lm_head" if m.group(1) == "lm_head" else "embed_tokens", tensor)
                continue
            if EMBEDDING_LORA.match(key):
                raise AdapterError(f"tensor {key}: {EMBEDDING_REFUSAL}")
            match = LORA_KEY.match(key)
            if match is None:
                raise AdapterError(f"unexpected tensor {shorten(key)} in the adapter (only lora_A / lora_B are "
                                   "supported)")
            module, half = match.groups()
            if half in halves.setdefault(module, {}):
                raise AdapterError(f"module {shorten(module)}: lora_{half} is given twice (with and without the "
                                   "base_model.model. prefix?)")
            halves[module][half] = tensor
        for module, ab in halves.items():
            for half in "AB":
                if half not in ab:
                    raise AdapterError(f"module {shorten(module)} has lora_{'BA'[half == 'B']} but no lora_{half}")
        return {module: (ab["A"], ab["B"]) for module, ab in halves.items()}

    def check_base_weight(self, key: str, what: str, tensor: torch.Tensor) -> None:
        """PEFT saves the base lm_head / embed_tokens beside a LoRA on it (or for a resized vocabulary) and puts it
        in the model when it loads the adapter. Here every adapter shares the base model: it must be the model's."""
        c = self.c
        if list(tensor.shape) != [c.vocab_size, c.hidden_size]:
            raise AdapterError(f"tensor {key} has shape {list(tensor.shape)}; the base model's {what} is "
                               f"[{c.vocab_size}, {c.hidden_size}] (an adapter trained with a resized vocabulary?)")
        if self.base_model is None:
            return
        module = self.base_model.lm_head if what == "lm_head" else self.base_model.model.embed_tokens
        rows = vocab_shard(c.vocab_size, self.group)
        count, worst = weights_differ(tensor[rows], module.weight[: rows.stop - rows.start])
        if count:
            raise AdapterError(f"tensor {key} is not the base model's {what} weight ({count} of "
                               f"{(rows.stop - rows.start) * c.hidden_size} entries differ, by up to {worst:.3g}): the "
                               f"adapter was trained with its own {what}, and adapters here share the base model's")

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

    def pattern_name(self, module: str, a: torch.Tensor, b: torch.Tensor) -> Tuple[str, int]:
        """(the name PEFT matches rank_pattern / alpha_pattern against, the LoRA rank it gives) of a module. PEFT
        matches the name of what it wrapped: a Linear (attention, lm_head, transformers 4's `block_sparse_moe.gate`
        and `experts.E.w1`), or on transformers 5 a parameter (`mlp.gate.weight`, `mlp.experts.gate_up_proj`, whose
        rank is per expert), so there a pattern "gate" does not reach the router."""
        if m := STACKED_EXPERTS.fullmatch(module):
            gate_up = a.shape[1] == self.c.hidden_size and b.shape[0] == 2 * self.c.intermediate_size
            name = f"model.layers.{m.group(1)}.mlp.experts." + ("gate_up_proj" if gate_up else "down_proj")
            return name, a.shape[0] // self.c.num_local_experts
        if ROUTER_GATE.fullmatch(module) and "block_sparse_moe" not in module:
            return module + ".weight", a.shape[0]
        return module, a.shape[0]

    def scale(self, config: dict, module: str, a: torch.Tensor, b: torch.Tensor) -> float:
        """PEFT's scale of a module: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, where rank_pattern /
        alpha_pattern override r / lora_alpha. That r, not the tensors' rank, as PEFT and LoRAX (whose merges keep
        the first adapter's config for all)."""
        name, _ = self.pattern_name(module, a, b)
        r = pattern_value(config.get("rank_pattern"), name, config["r"])
        alpha = pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if abs(scale) > MAX_LORA_SCALE:
            over = "sqrt(r)" if config.get("use_rslora") else "r"
            raise AdapterError(f"module {module}: LoRA scale {scale:.3g} (lora_alpha {alpha!r} / {over}, r={r}) is "
                               f"beyond +-{MAX_LORA_SCALE:g}: a mistaken lora_alpha that would only make NaN logits")
        return scale

    def check_ranks(self, config: dict, pairs: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Each module's rank is the r its config gives (PEFT refuses an adapter otherwise): else its scale would
        be a guess."""
        for module, (a, b) in sorted(pairs.items()):
            name, rank = self.pattern_name(module, a, b)
            r = pattern_value(config.get("rank_pattern"), name, config["r"])
            if r != rank:
                raise AdapterError(f"module {module}: lora_A / lora_B have rank {rank} but adapter_config.json gives "
                                   f"r={r} (from r or rank_pattern)")

    # -- targets ------------------------------------------------------------------------------------

    def add_module(self, adapter: AdapterWeights, per_expert: Dict, config: dict, module: str, a, b) -> None:
        c, r = self.c, a.shape[0]
        if module == "lm_head" or module.endswith(".lm_head"):
            self.check_shape(module, "lora_A", a, (r, c.hidden_size))
            self.check_shape(module, "lora_B", b, (c.vocab_size, r))
            rows = vocab_shard(c.vocab_size, self.group)
            block = -(-c.vocab_size // self.group.size())
            b_shard = torch.nn.functional.pad(b[rows], (0, 0, 0, block - (rows.stop - rows.start)))
            scale = self.scale(config, module, a, b)
            adapter.linear[(LM_HEAD_LAYER_ID, LM_HEAD)] = self.lora(module, a.T, b_shard.T * scale)
        elif m := ATTENTION.fullmatch(module):
            self.add_attention(adapter, config, module, int(m.group(1)), m.group(2), a, b)
        elif m := ROUTER_GATE.fullmatch(module):
            self.check_layer(module, int(m.group(1)))
            self.check_shape(module, "lora_A", a, (r, c.hidden_size))
            self.check_shape(module, "lora_B", b, (c.num_local_experts, r))
            scale = self.scale(config, module, a, b)
            adapter.linear[(int(m.group(1)), ROUTER)] = self.lora(module, a.T, b.T * scale)
        elif m := PER_EXPERT.fullmatch(module):
            layer, expert = int(m.group(1)), int(m.group(2))
            self.check_layer(module, layer)
            if expert >= c.num_local_experts:
                raise AdapterError(f"module {module}: expert {expert} does not exist; the base model has "
                                   f"{c.num_local_experts} experts")
            per_expert.setdefault(layer, {})[(expert, m.group(3))] = (a, b * self.scale(config, module, a, b))
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
        b = b * self.scale(config, module, a, b)
        if proj == "o_proj":  # row-parallel: A takes this rank's input columns
            a = a[:, shard_range(in_size, self.group.rank(), self.group.size(), f"module {module} lora_A")]
        else:  # column-parallel: B takes this rank's output rows
            b = b[shard_range(out_size, self.group.rank(), self.group.size(), f"module {module} lora_B")]
        adapter.linear[(layer, ATTENTION_TARGETS[proj])] = self.lora(module, a.T, b.T)

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
        a_e = a.reshape(E, r, a.shape[1])  # [E, r, in]
        b_e = b.reshape(b.shape[0], r, E).permute(2, 0, 1) * self.scale(config, module, a, b)  # [E, out, r]
        self.add_experts(adapter, layer, "w13" if is_gate_up else "w2", a_e, b_e)

    def add_per_expert_layer(self, adapter, layer: int, modules: Dict) -> None:
        """transformers-4 form: stack the experts; w1 and w3 go block-diagonally into one w13 LoRA. Experts may
        have different ranks (rank_pattern): each is zero-padded to the largest rank of its w1 / w2 / w3."""
        c, E = self.c, self.c.num_local_experts
        F_, H = c.intermediate_size, c.hidden_size
        ranks: Dict[str, int] = {}
        for (expert, name), (a, b) in modules.items():
            module = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{name}"
            in_size, out_size = (F_, H) if name == "w2" else (H, F_)
            self.check_shape(module, "lora_A", a, (a.shape[0], in_size))
            self.check_shape(module, "lora_B", b, (out_size, a.shape[0]))
            ranks[name] = max(ranks.get(name, 0), a.shape[0])
        if "w1" in ranks or "w3" in ranks:
            r1, r3 = ranks.get("w1", 0), ranks.get("w3", 0)
            a13, b13 = torch.zeros(E, r1 + r3, H), torch.zeros(E, 2 * F_, r1 + r3)
            for (e, name), (a, b) in modules.items():
                r = a.shape[0]
                if name == "w1":
                    a13[e, :r], b13[e, :F_, :r] = a, b
                elif name == "w3":
                    a13[e, r1:r1 + r], b13[e, F_:, r1:r1 + r] = a, b
            self.add_experts(adapter, layer, "w13", a13, b13)
        if "w2" in ranks:
            a2, b2 = torch.zeros(E, ranks["w2"], F_), torch.zeros(E, H, ranks["w2"])
            for (e, name), (a, b) in modules.items():
                if name == "w2":
                    a2[e, :a.shape[0]], b2[e, :, :a.shape[0]] = a, b
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
        what = f"layer {layer} experts {name}"
        adapter.experts[key] = ExpertLoraWeights(self.to_device(a, f"{what}: lora_A"),
                                                 self.to_device(b, f"{what}: lora_B"))

    def lora(self, module: str, a: torch.Tensor, b: torch.Tensor) -> LoraWeights:
        what = f"module {module}"
        return LoraWeights(self.to_device(a, f"{what}: lora_A"), self.to_device(b, f"{what}: lora_B"))

    def to_device(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """`t` in the serving dtype on the device; refused when its values (scale folded in) overflow that dtype."""
        largest = t.abs().amax().item() if t.numel() else 0.0
        if largest > torch.finfo(self.dtype).max:
            raise AdapterError(f"{what} overflows {self.dtype} (values up to {largest:.3g} with the LoRA scale "
                               "folded in)")
        return t.to(device=self.device, dtype=self.dtype).contiguous()
