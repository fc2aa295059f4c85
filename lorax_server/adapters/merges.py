"""Serving several PEFT LoRA adapters as one: linear, TIES, DARE (linear / TIES) merges, as LoRAX does them.

What is merged, and when
  Each adapter's raw PEFT tensors are merged per module, lora_A with lora_A and lora_B with lora_B, as
  read from disk: full (not sharded) and without the LoRA scale. The merged adapter then takes ONE scale,
  the first adapter's (its lora_alpha / r, use_rslora, alpha and rank patterns), and goes through the
  same loader path as a single adapter: checked against the base model, sharded for this rank, the
  scale folded into B. So the result is what LoRAX computes (merge raw A/B, copy the first config), and
  every tensor-parallel rank merges the same full tensors before taking its own slice.

Rules (LoRAX's)
  - every adapter must have the same `r`; a module's tensors must have the same shape in every adapter
  - targets are the union: a module is merged over the adapters that have it, with their weights only
  - weights default to 1 each; they multiply A and B alike (so a lone weight w scales the delta by w^2)
  - sign election (TIES) happens before the weights are applied, the disjoint mean after
  - the base model ("__base_model__") cannot be part of a merge

Random pruning (DARE) keeps each entry with probability `density` and divides the kept ones by
`density`. Its masks come from one generator per tensor, seeded from (seed, adapter position, module,
A/B): reproducible, independent of the order modules are visited, and the same on every rank since
they are drawn on the full tensor before sharding.
"""

import copy
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from lorax_server.adapters.peft import (
    PER_EXPERT,
    STACKED_EXPERTS,
    PeftLoraLoader,
    check_peft_config,
    read_adapter_dir,
)
from lorax_server.adapters.weights import AdapterError, AdapterWeights

BASE_MODEL_ADAPTER_ID = "__base_model__"

# In the order of the wire enums (generate.proto MergeStrategy / MajoritySignMethod), so ints map too.
STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
PRUNING_STRATEGIES = {"ties", "dare_linear", "dare_ties"}

Pairs = Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # module name -> (lora_A [r, in], lora_B [out, r])


# -- the strategies on tensors ---------------------------------------------------------------------------


def prune_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the int(density * numel) entries of largest absolute value, zeroes the rest."""
    keep = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    kept = torch.zeros_like(flat)
    if keep > 0:
        top = torch.topk(flat.abs(), keep, largest=True).indices
        kept[top] = flat[top]
    return kept.reshape(tensor.shape)


def prune_randomly(tensor: torch.Tensor, density: float, generator: Optional[torch.Generator],
                   rescale: bool = True) -> torch.Tensor:
    """Keeps each entry with probability `density` (a Bernoulli mask drawn from `generator`); with
    `rescale`, the kept entries are divided by `density` so the expected value is unchanged."""
    if density <= 0:
        return torch.zeros_like(tensor)
    probabilities = torch.full(tensor.shape, float(density), dtype=torch.float32, device=tensor.device)
    mask = torch.bernoulli(probabilities, generator=generator).to(tensor.dtype)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def prune(tensor: torch.Tensor, density: float, method: str, generator: Optional[torch.Generator] = None,
          rescale: bool = False) -> torch.Tensor:
    """`method` "magnitude" or "random"; a density of 1 or more keeps the tensor as it is."""
    if density < 0:
        raise AdapterError(f"density must be >= 0, got {density}")
    if density >= 1:
        return tensor
    if method == "magnitude":
        return prune_by_magnitude(tensor, density)
    if method == "random":
        return prune_randomly(tensor, density, generator, rescale=rescale)
    raise AdapterError(f"unknown pruning method '{method}'; expected 'magnitude' or 'random'")


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """For tensors stacked on dim 0: where each one agrees with the elected sign of its entry.

    "total" elects the sign of the sum of the entries, "frequency" the sign held by more tensors; a tie
    elects +. Zero entries agree with neither sign, so they never count.
    """
    signs = stacked.sign()
    if method == "total":
        score = stacked.sum(dim=0)
    elif method == "frequency":
        score = signs.sum(dim=0)
    else:
        raise AdapterError(f"unknown majority sign method '{method}'; expected one of {list(SIGN_METHODS)}")
    elected = torch.where(score >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == elected


def disjoint_merge(stacked: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the entries that agree with the elected sign (0 where none does)."""
    total = (stacked * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return total / count


def weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.to(stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))


def merge_tensors(strategy: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float = 1.0,
                  majority_sign: str = "total",
                  generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> torch.Tensor:
    """Merges same-shaped tensors (one per adapter) into one; `generators[i]` draws tensor i's DARE mask."""
    if strategy not in STRATEGIES:
        raise AdapterError(f"unknown merge strategy '{strategy}'; expected one of {list(STRATEGIES)}")
    if strategy in ("dare_linear", "dare_ties"):
        generators = generators if generators is not None else [None] * len(tensors)
        tensors = [prune(t, density, "random", g, rescale=True) for t, g in zip(tensors, generators)]
    elif strategy == "ties":
        tensors = [prune(t, density, "magnitude") for t in tensors]
    stacked = torch.stack(list(tensors), dim=0)
    if strategy in ("linear", "dare_linear"):
        return weighted(stacked, weights).sum(dim=0)
    agree = majority_sign_mask(stacked, majority_sign)  # elected on the unweighted tensors
    return disjoint_merge(weighted(stacked, weights), agree)


def tensor_seed(seed: int, position: int, module: str, half: str) -> int:
    """The seed of the DARE mask of one full tensor: adapter `position` in the list, `module`, "A" or "B"."""
    digest = hashlib.sha256(f"{int(seed)}/{position}/{module}/{half}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def tensor_generator(seed: int, position: int, module: str, half: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(tensor_seed(seed, position, module, half))


# -- parameters -------------------------------------------------------------------------------------------


def enum_name(value: Union[str, int], names: Tuple[str, ...], what: str) -> str:
    """A strategy or sign method given by name (any case) or by its wire enum number."""
    if isinstance(value, bool):
        raise AdapterError(f"unknown {what} {value!r}; expected one of {list(names)}")
    if isinstance(value, int):
        if 0 <= value < len(names):
            return names[value]
    elif isinstance(value, str) and value.lower() in names:
        return value.lower()
    raise AdapterError(f"unknown {what} {value!r}; expected one of {list(names)}")


@dataclass(frozen=True)
class MergeParameters:
    strategy: str
    weights: Tuple[float, ...]
    density: float
    majority_sign: str
    seed: int

    @classmethod
    def parse(cls, count: int, strategy: Union[str, int] = "linear", weights: Sequence[float] = (),
              density: float = 1.0, majority_sign: Union[str, int] = "total", seed: int = 0) -> "MergeParameters":
        strategy = enum_name(strategy, STRATEGIES, "merge strategy")
        majority_sign = enum_name(majority_sign, SIGN_METHODS, "majority sign method")
        weights = tuple(float(w) for w in weights) if weights is not None and len(weights) else (1.0,) * count
        if len(weights) != count:
            raise AdapterError(f"{len(weights)} merge weights for {count} adapters; give one weight per adapter "
                               "(or none for all 1)")
        if not all(math.isfinite(w) for w in weights):
            raise AdapterError(f"merge weights must be finite numbers, got {list(weights)}")
        density = float(density)
        if strategy in PRUNING_STRATEGIES and not 0 < density <= 1:
            raise AdapterError(f"the {strategy} merge needs a density in (0, 1] (the fraction of each adapter's "
                               f"weights kept), got {density}")
        return cls(strategy, weights, density, majority_sign, int(seed))


# -- adapters ---------------------------------------------------------------------------------------------


@dataclass
class RawAdapter:
    """One adapter as read from disk: its PEFT config and its full, unscaled (lora_A, lora_B) per module."""

    name: str
    config: dict
    pairs: Pairs


def expert_target(module: str, a: torch.Tensor, b: torch.Tensor, config) -> Optional[Tuple[int, str, str]]:
    """(layer, fused target "w13"/"w2", format) of an expert module; None for other modules."""
    if m := PER_EXPERT.fullmatch(module):
        return int(m.group(1)), "w2" if m.group(3) == "w2" else "w13", "per-expert (experts.E.w1/w2/w3)"
    if m := STACKED_EXPERTS.fullmatch(module):
        # shapes as the loader tells them apart: gate_up is A [E*r, hidden], B [2*ffn, r*E]
        gate_up = a.shape[1] == config.hidden_size and b.shape[0] == 2 * config.intermediate_size
        fused = "w13" if gate_up else "w2"
        return int(m.group(1)), fused, "stacked (gate_up_proj/down_proj)"
    return None


def canonical_pairs(pairs: Pairs, config) -> Pairs:
    """Names PEFT's stacked expert LoRAs by what they are, not by their `.base_layer` nesting (which
    may vary with the PEFT version and `target_parameters`): gate_up as `model.layers.N.mlp.experts.base_layer`,
    down as `model.layers.N.mlp.experts`, the layout PEFT 0.21 writes. The loader tells them apart by
    shape, so the names change nothing there; they key the merge and the DARE seeds."""
    out: Pairs = {}
    for module, (a, b) in pairs.items():
        if m := STACKED_EXPERTS.fullmatch(module):
            _, fused, _ = expert_target(module, a, b, config)
            module = f"model.layers.{m.group(1)}.mlp.experts" + (".base_layer" if fused == "w13" else "")
        out[module] = (a, b)
    return out


def read_raw_adapter(loader: PeftLoraLoader, adapter_dir) -> RawAdapter:
    """Reads one adapter and checks it as `load` would (on the CPU, kept nowhere); errors name it."""
    name = str(adapter_dir)
    try:
        config, tensors = read_adapter_dir(adapter_dir)
        check_peft_config(config)
        pairs = loader.pair_tensors(tensors)
        checker = PeftLoraLoader(loader.c, loader.group, torch.float32, "cpu")
        checker.build(config, pairs, name)
    except AdapterError as e:
        raise AdapterError(f"adapter {name}: {e}") from None
    pairs = {module: (a.float(), b.float()) for module, (a, b) in canonical_pairs(pairs, loader.c).items()}
    return RawAdapter(name, config, pairs)


def check_compatible(adapters: Sequence[RawAdapter], model_config) -> None:
    """LoRAX's rule (one rank for all), per module shapes, and one expert format per fused expert target."""
    ranks = {a.name: a.config.get("r") for a in adapters}
    if len(set(ranks.values())) > 1:
        listed = ", ".join(f"{name} has r={r}" for name, r in ranks.items())
        raise AdapterError(f"cannot merge adapters of different LoRA ranks: {listed}")
    shapes: Dict[str, Tuple[str, list, list]] = {}
    formats: Dict[Tuple[int, str], Tuple[str, str]] = {}
    for adapter in adapters:
        for module, (a, b) in sorted(adapter.pairs.items()):
            seen = shapes.setdefault(module, (adapter.name, list(a.shape), list(b.shape)))
            if seen[1:] != (list(a.shape), list(b.shape)):
                raise AdapterError(f"cannot merge module {module}: lora_A {seen[1]} / lora_B {seen[2]} in "
                                   f"{seen[0]} but lora_A {list(a.shape)} / lora_B {list(b.shape)} in "
                                   f"{adapter.name} (different ranks, e.g. through rank_pattern?)")
            if (target := expert_target(module, a, b, model_config)) is not None:
                layer, fused, fmt = target
                first = formats.setdefault((layer, fused), (adapter.name, fmt))
                if first[1] != fmt:
                    raise AdapterError(f"cannot merge the expert LoRAs on layer {layer} {fused}: {first[0]} has "
                                       f"them in the {first[1]} form, {adapter.name} in the {fmt} form")


def merged_config(adapters: Sequence[RawAdapter]) -> dict:
    """LoRAX keeps the first adapter's config (hence its scale) with the union of the target modules
    (and here of the target parameters too; a regex target_modules string is left as the first's)."""
    config = copy.deepcopy(adapters[0].config)
    for key in ("target_modules", "target_parameters"):
        targets = [a.config.get(key) or [] for a in adapters]
        if all(isinstance(t, (list, tuple)) for t in targets) and any(targets):
            config[key] = sorted({m for t in targets for m in t})
    return config


def merge_pairs(adapters: Sequence[RawAdapter], params: MergeParameters) -> Pairs:
    """Each module's lora_A and lora_B merged, separately, over the adapters that have the module."""
    merged: Pairs = {}
    modules = sorted({m for a in adapters for m in a.pairs})
    for module in modules:
        having = [i for i, a in enumerate(adapters) if module in a.pairs]
        weights = torch.tensor([params.weights[i] for i in having], dtype=torch.float32)
        halves = []
        for h, half in enumerate("AB"):
            tensors = [adapters[i].pairs[module][h] for i in having]
            generators = [tensor_generator(params.seed, i, module, half) for i in having]
            halves.append(merge_tensors(params.strategy, tensors, weights, params.density, params.majority_sign,
                                        generators))
        merged[module] = (halves[0], halves[1])
    return merged


def merge_adapters(loader: PeftLoraLoader, adapter_dirs: Sequence, adapter_id: str,
                   strategy: Union[str, int] = "linear", weights: Sequence[float] = (), density: float = 1.0,
                   majority_sign: Union[str, int] = "total", seed: int = 0) -> AdapterWeights:
    """Reads the PEFT adapters in `adapter_dirs`, merges them by `strategy`, and returns this rank's
    AdapterWeights of the merged adapter (on the loader's device), named `adapter_id`.

    `strategy`: "linear" | "ties" | "dare_linear" | "dare_ties" (or the wire enum number); `weights`: one
    per adapter (empty: all 1); `density`: fraction kept by TIES / DARE pruning, in (0, 1], unused by
    linear; `majority_sign`: "total" | "frequency" (or the enum number); `seed`: of the DARE masks.
    """
    adapter_dirs = list(adapter_dirs)
    if not adapter_dirs:
        raise AdapterError("no adapters to merge")
    for d in adapter_dirs:
        if str(d) == BASE_MODEL_ADAPTER_ID or Path(str(d)).name == BASE_MODEL_ADAPTER_ID:
            raise AdapterError(f"{BASE_MODEL_ADAPTER_ID} is the base model, not an adapter: it cannot be merged")
    params = MergeParameters.parse(len(adapter_dirs), strategy, weights, density, majority_sign, seed)
    adapters: List[RawAdapter] = [read_raw_adapter(loader, d) for d in adapter_dirs]
    check_compatible(adapters, loader.c)
    pairs = merge_pairs(adapters, params)
    try:
        return loader.build(merged_config(adapters), pairs, adapter_id)
    except AdapterError as e:
        raise AdapterError(f"merged adapter {adapter_id}: {e}") from None
