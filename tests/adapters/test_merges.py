"""Merged adapters (linear, TIES, DARE): the strategies against oracles written here from the formulas,
the merged adapter against the same merge computed independently from the PEFT files, served through
the model, sharded for tensor parallelism, and the merges that are refused."""

import copy
import json
import re
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lorax_server.adapters import AdapterError
from lorax_server.adapters import merges
from lorax_server.adapters.peft import PeftLoraLoader
from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.models.custom_modeling.flash_mixtral_modeling import (
    ATTN_K_PROJ,
    ATTN_O_PROJ,
    ATTN_Q_PROJ,
    ATTN_V_PROJ,
    LM_HEAD,
    ROUTER,
    MixtralConfig,
)
from lorax_server.utils.dist import FakeGroup
from tests.adapters.peft_adapters import make_peft_adapter, store_for, write_per_expert_adapter
from tests.tiny_mixtral import load_ours, paged_logits, reference_logits, relative_error

STRATEGIES = ["linear", "ties", "dare_linear", "dare_ties"]
SEQUENCES = [list(range(5, 17)), list(range(300, 307))]
PROMPT_LENS = [8, 3]


# -- oracles, from the formulas ------------------------------------------------------------------------------
#   magnitude pruning keeps the int(density * n) entries of largest |value|;
#   DARE keeps entry j where a Bernoulli(density) mask is 1 and divides it by density;
#   linear: sum_i w_i t_i;  TIES: elect a sign per entry from the unweighted pruned tensors (sum of values,
#   or count of signs), ties elect +; the result is the mean of w_i t_i over the tensors whose entry has
#   the elected (non-zero) sign, 0 if none.


def bernoulli_mask(shape, density, seed):
    return torch.bernoulli(torch.full(tuple(shape), float(density)), generator=torch.Generator().manual_seed(seed))


def sign(v):
    return (v > 0) - (v < 0)


def loop_oracle(strategy, tensors, weights, density, method, masks=None):
    """Entry by entry, in float64 Python arithmetic."""
    shape = tensors[0].shape
    flats = [t.double().flatten().tolist() for t in tensors]
    if strategy == "ties" and density < 1:
        k = int(density * len(flats[0]))
        for f in flats:
            keep = set(sorted(range(len(f)), key=lambda j: -abs(f[j]))[:k])
            f[:] = [v if j in keep else 0.0 for j, v in enumerate(f)]
    if strategy.startswith("dare") and density < 1:
        flats = [[v * m / density for v, m in zip(f, mask.flatten().tolist())] for f, mask in zip(flats, masks)]
    out = []
    for j in range(len(flats[0])):
        values = [f[j] for f in flats]
        if strategy in ("linear", "dare_linear"):
            out.append(sum(w * v for w, v in zip(weights, values)))
            continue
        score = sum(values) if method == "total" else sum(sign(v) for v in values)
        elected = 1 if score >= 0 else -1
        kept = [w * v for w, v in zip(weights, values) if sign(v) == elected]
        out.append(sum(kept) / max(len(kept), 1))
    return torch.tensor(out, dtype=torch.float64).reshape(shape)


def tensor_oracle(strategy, tensors, weights, density, method, masks=None):
    """The same formulas on whole tensors (float64), for adapter-sized inputs; checked against the loop."""
    ts = [t.double() for t in tensors]
    if strategy == "ties" and density < 1:
        k = int(density * ts[0].numel())
        pruned = []
        for t in ts:
            keep = torch.zeros(t.numel(), dtype=torch.bool)
            keep[t.abs().flatten().argsort(descending=True)[:k]] = True
            pruned.append(torch.where(keep.reshape(t.shape), t, 0.0))
        ts = pruned
    if strategy.startswith("dare") and density < 1:
        ts = [t * m.double() / density for t, m in zip(ts, masks)]
    if strategy in ("linear", "dare_linear"):
        return sum(w * t for w, t in zip(weights, ts))
    s = torch.stack(ts)
    score = s.sum(0) if method == "total" else s.sign().sum(0)
    agree = s.sign() == torch.where(score >= 0, 1.0, -1.0)
    kept = sum(w * t * a for w, t, a in zip(weights, ts, agree))
    return kept / agree.sum(0).clamp(min=1)


def small_tensors(seed, n=3, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=g) for _ in range(n)]
    tensors[0][0, :2] = 0.0  # zeros agree with no sign
    tensors[1][1, 0], tensors[2][1, 0] = 0.5, -0.5  # a frequency tie with tensor 0's entry
    return tensors


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 0.75, 1.0])
def test_strategy_matches_the_formula(strategy, method, density):
    tensors = small_tensors(7)
    weights = [1.0, -0.5, 2.0]
    seeds = [11, 12, 13]
    masks = [bernoulli_mask(t.shape, density, s) for t, s in zip(tensors, seeds)]
    got = merges.merge_tensors(strategy, tensors, torch.tensor(weights), density, method,
                               [torch.Generator().manual_seed(s) for s in seeds])
    want = loop_oracle(strategy, tensors, weights, density, method, masks)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tensor_oracle(strategy, tensors, weights, density, method, masks), want)


def test_pruning_and_sign_election():
    t = torch.tensor([[0.1, -3.0, 2.0], [0.5, -0.2, 1.0]])
    assert torch.equal(merges.prune(t, 0.5, "magnitude"), torch.tensor([[0.0, -3.0, 2.0], [0.0, 0.0, 1.0]]))
    assert torch.equal(merges.prune(t, 1.0, "random"), t)
    big = torch.ones(200, 100)
    kept = merges.prune(big, 0.25, "random", torch.Generator().manual_seed(0), rescale=True)
    assert set(kept.unique().tolist()) == {0.0, 4.0} and abs((kept > 0).float().mean().item() - 0.25) < 0.02
    stacked = torch.tensor([[1.0, -1.0, 0.0], [-3.0, -1.0, 2.0], [1.0, 2.0, -1.0]])
    total = merges.majority_sign_mask(stacked, "total")  # sums -1, 0, 1 -> elected -, +, +
    freq = merges.majority_sign_mask(stacked, "frequency")  # counts 1, -1, 0 -> elected +, -, +
    assert total.tolist() == [[False, False, False], [True, False, True], [False, True, False]]
    assert freq.tolist() == [[True, True, False], [False, True, True], [True, False, False]]
    assert merges.disjoint_merge(stacked, total).tolist() == [-3.0, 2.0, 2.0]


# -- adapters -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    return transformers.MixtralForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def config():
    return MixtralConfig.from_pretrained(DEFAULT_MODEL_DIR)


def loader_for(config, rank=0, world=1):
    return PeftLoraLoader(config, FakeGroup(rank, world), torch.float32, "cpu")


ADAPTERS = {  # name: (seed, r, alpha, PEFT LoraConfig arguments)
    "attn": (1, 4, 8, dict(target_modules=["q_proj", "v_proj", "o_proj", "lm_head"])),
    "attn_gate": (2, 4, 16, dict(target_modules=["q_proj", "k_proj", "o_proj", "gate"])),
    "experts": (3, 4, 8, dict(target_modules=[], target_parameters=["gate_up_proj", "down_proj"])),
    "experts_attn": (4, 4, 4, dict(target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"])),
    "rank8": (5, 8, 8, dict(target_modules=["q_proj"])),
    "rank_pattern": (6, 4, 8, dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})),
}


@pytest.fixture(scope="module")
def adapters(hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_adapters")
    for name, (seed, r, alpha, kwargs) in ADAPTERS.items():
        make_peft_adapter(hf, root / name, seed=seed, r=r, alpha=alpha, **kwargs)
    write_per_expert_adapter(hf, root / "per_expert", seed=7, r=4, alpha=8)
    # The other `.base_layer` nesting of the stacked experts (gate_up outermost), as another PEFT may write it.
    tensors = load_file(root / "experts_attn" / "adapter_model.safetensors")
    swap = re.compile(r"experts(\.base_layer)?\.lora")
    swapped = {swap.sub(lambda m: "experts.lora" if m.group(1) else "experts.base_layer.lora", key): t
               for key, t in tensors.items()}
    assert swapped.keys() == tensors.keys() and any(not torch.equal(swapped[k], tensors[k]) for k in tensors)
    (root / "swapped").mkdir()
    save_file(swapped, root / "swapped" / "adapter_model.safetensors")
    (root / "swapped" / "adapter_config.json").write_text((root / "experts_attn" / "adapter_config.json").read_text())
    return root


LORA = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$")
STACKED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts(?:\.base_layer)*$")


def read_modules(directory: Path, ffn: int):
    """{module: {"A": a, "B": b}} straight from the file; the stacked expert LoRAs are named by their shape
    (gate_up: B has 2*ffn rows) as gate_up `...experts.base_layer`, down `...experts`."""
    modules = {}
    for key, t in load_file(directory / "adapter_model.safetensors").items():
        if m := LORA.match(key):
            modules.setdefault(m.group(1), {})[m.group(2)] = t
    named = {}
    for module, ab in modules.items():
        if m := STACKED.match(module):
            module = f"model.layers.{m.group(1)}.mlp.experts" + (".base_layer" if ab["B"].shape[0] == 2 * ffn else "")
        named[module] = ab
    return named


def oracle_adapter(directories, out: Path, ffn, strategy, weights, density, method, seed=0):
    """The merged adapter computed from the files: every module's A and B merged over the adapters that
    have it, written as a PEFT adapter with the first adapter's config and the union of the targets."""
    inputs = [read_modules(d, ffn) for d in directories]
    weights = weights or [1.0] * len(inputs)
    merged = {}
    for module in sorted({m for i in inputs for m in i}):
        having = [i for i, modules in enumerate(inputs) if module in modules]
        for half in "AB":
            tensors = [inputs[i][module][half] for i in having]
            masks = [bernoulli_mask(t.shape, density, merges.tensor_seed(seed, i, module, half))
                     for i, t in zip(having, tensors)]
            merged[f"base_model.model.{module}.lora_{half}.weight"] = tensor_oracle(
                strategy, tensors, [weights[i] for i in having], density, method, masks).float().contiguous()
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in directories]
    config = dict(configs[0])
    for key in ("target_modules", "target_parameters"):
        config[key] = sorted({t for c in configs for t in (c.get(key) or [])})
    out.mkdir(parents=True)
    save_file(merged, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def assert_same_weights(got, want, exact=False):
    assert sorted(got.linear) == sorted(want.linear) and sorted(got.experts) == sorted(want.experts)
    pairs = [(got.linear[k], want.linear[k]) for k in want.linear]
    pairs += [(got.experts[k], want.experts[k]) for k in want.experts]
    for g, w in pairs:
        for x, y in ((g.a, w.a), (g.b, w.b)):
            if exact:
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


CASES = {
    "linear": ("linear", [1.0, 0.5, 1.5], 0.0, "total"),
    "linear_default_weights": ("linear", [], 0.0, "total"),
    "ties_total": ("ties", [1.0, 0.7, 1.3], 0.4, "total"),
    "ties_frequency": ("ties", [2.0, 0.3, 0.7], 0.7, "frequency"),
    "dare_linear": ("dare_linear", [0.6, 1.0, 0.8], 0.5, "total"),
    "dare_ties_frequency": ("dare_ties", [1.0, 1.0, -0.5], 0.3, "frequency"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_adapter_matches_the_oracle(adapters, config, tmp_path, case):
    strategy, weights, density, method = CASES[case]
    dirs = [adapters / "attn", adapters / "attn_gate", adapters / "experts_attn"]
    loader = loader_for(config)
    got = merges.merge_adapters(loader, dirs, "merged", strategy, weights, density, method, seed=3)
    want = loader.load(oracle_adapter(dirs, tmp_path / "oracle", config.intermediate_size, strategy, weights,
                                      density if strategy != "linear" else 1.0, method, seed=3))
    assert got.adapter_id == "merged"
    assert_same_weights(got, want)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_adapter_with_weight_one_is_the_adapter(adapters, config, strategy):
    loader = loader_for(config)
    for name in ("attn", "experts_attn"):
        merged = merges.merge_adapters(loader, [adapters / name], name, strategy, [1.0], 1.0)
        assert_same_weights(merged, loader.load(adapters / name, name), exact=True)


def test_the_first_adapters_scale_applies_to_all(adapters, config):
    """LoRAX keeps the first config: attn_gate's own modules (k_proj, gate) take attn's alpha/r = 2, not 4."""
    loader = loader_for(config)
    merged = merges.merge_adapters(loader, [adapters / "attn", adapters / "attn_gate"], "m", "linear", [0.0, 1.0])
    alone = loader.load(adapters / "attn_gate")
    for key in [k for k in alone.linear if k[1].endswith("k_proj") or k[1] == "gate"]:
        torch.testing.assert_close(merged.linear[key].b, alone.linear[key].b / 2)


def test_stacked_expert_nesting_does_not_matter(adapters, config):
    loader = loader_for(config)
    a = merges.merge_adapters(loader, [adapters / "experts", adapters / "experts_attn"], "m", "dare_ties", [], 0.5)
    b = merges.merge_adapters(loader, [adapters / "experts", adapters / "swapped"], "m", "dare_ties", [], 0.5)
    assert_same_weights(a, b, exact=True)


def test_dare_is_reproducible_by_seed(adapters, config):
    loader = loader_for(config)
    dirs = [adapters / "attn", adapters / "experts_attn"]
    one, again, other = (merges.merge_adapters(loader, dirs, "m", "dare_linear", [], 0.5, seed=s) for s in (1, 1, 2))
    assert_same_weights(one, again, exact=True)
    key = next(iter(one.linear))
    assert not torch.equal(one.linear[key].a, other.linear[key].a)


@pytest.mark.parametrize("strategy", ["ties", "dare_ties"])
def test_every_tensor_parallel_rank_merges_the_same_adapter(adapters, config, strategy):
    """Each rank's merged shard is its slice of the one-rank merge (pruning sees the full tensors)."""
    dirs = [adapters / "attn", adapters / "attn_gate", adapters / "experts"]
    args = ("m", strategy, [1.0, 0.5, 2.0], 0.4, "frequency")
    full = merges.merge_adapters(loader_for(config), dirs, *args)
    shards = [merges.merge_adapters(loader_for(config, rank, 2), dirs, *args) for rank in range(2)]
    assert {name for _, name in full.linear} == {ATTN_Q_PROJ, ATTN_K_PROJ, ATTN_V_PROJ, ATTN_O_PROJ, ROUTER, LM_HEAD}
    for key, w in full.linear.items():
        a0, a1 = (s.linear[key].a for s in shards)
        b0, b1 = (s.linear[key].b for s in shards)
        if key[1] == ATTN_O_PROJ:  # row-parallel: A is split by input
            assert torch.equal(torch.cat([a0, a1]), w.a) and torch.equal(b0, w.b) and torch.equal(b1, w.b)
        elif key[1] == ROUTER:  # replicated
            assert all(torch.equal(x, y) for x, y in ((a0, w.a), (a1, w.a), (b0, w.b), (b1, w.b)))
        else:  # column-parallel: B is split by output (lm_head's vocab shards are padded to equal blocks)
            assert torch.equal(a0, w.a) and torch.equal(a1, w.a)
            assert torch.equal(torch.cat([b0, b1], dim=1)[:, :w.b.shape[1]], w.b)
    F_ = config.intermediate_size
    for key, w in full.experts.items():
        s0, s1 = (s.experts[key] for s in shards)
        if key[1] == "w2":
            assert torch.equal(torch.cat([s0.a, s1.a], dim=2), w.a) and torch.equal(s0.b, w.b)
        else:  # w13: each rank has its rows of the gate half, then of the up half
            half = F_ // 2
            rows = torch.cat([s0.b[:, :half], s1.b[:, :half], s0.b[:, half:], s1.b[:, half:]], dim=1)
            assert torch.equal(rows, w.b) and torch.equal(s0.a, w.a)


@pytest.fixture(scope="module")
def ours():
    return load_ours(DEFAULT_MODEL_DIR)


@pytest.mark.parametrize("strategy, weights, density, method", [
    ("ties", [1.0, 0.6, 1.4], 0.5, "frequency"),
    ("dare_ties", [0.8, 1.0, 1.2], 0.6, "total"),
    ("linear", [0.5, 1.0, 0.7], 0.0, "total"),
])
def test_served_merge_equals_the_model_with_the_merged_delta(hf, ours, adapters, config, tmp_path, strategy, weights,
                                                             density, method):
    dirs = [adapters / "attn", adapters / "attn_gate", adapters / "experts"]
    store = store_for(ours)
    store.load_merged(3, [str(d) for d in dirs], "merged", strategy, weights, density, method, seed=5)
    got = paged_logits(ours, SEQUENCES, PROMPT_LENS, adapters=store, adapter_indices=[3, 3])
    oracle = oracle_adapter(dirs, tmp_path / "oracle", config.intermediate_size, strategy, weights,
                            density if strategy != "linear" else 1.0, method, seed=5)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(hf), oracle).eval()
    for tokens, logits in zip(SEQUENCES, got):
        want = reference_logits(reference, tokens)
        assert relative_error(logits, want) <= 1e-4
        assert relative_error(want, reference_logits(hf, tokens)) > 1e-2  # the merge changes the output


def test_load_merged_takes_enum_numbers_and_one_adapter_loads_as_is(ours, adapters):
    store = store_for(ours)
    dirs = [adapters / "attn", adapters / "attn_gate"]
    by_number = store.load_merged(1, dirs, "m", 1, [1.0, 2.0], 0.5, 1)  # TIES, FREQUENCY
    loader = store.loader
    assert_same_weights(by_number, merges.merge_adapters(loader, dirs, "m", "ties", [1.0, 2.0], 0.5, "frequency"),
                        exact=True)
    single = store.load_merged(2, [adapters / "attn"], "one", "dare_ties", [3.0], 0.1)  # as LoRAX: no merge
    assert_same_weights(single, loader.load(adapters / "attn", "one"), exact=True)
    assert sorted(store.loaded) == [1, 2]


REFUSED = {
    "different ranks": (["attn", "rank8"], {}, r"different LoRA ranks: .*attn has r=4, .*rank8 has r=8"),
    "different module ranks": (["attn", "rank_pattern"], {},
                               r"cannot merge module model\.layers\.0\.self_attn\.v_proj: lora_A \[4, 128\]"),
    "base model": (["attn", "__base_model__"], {}, "__base_model__ is the base model, not an adapter"),
    "weights count": (["attn", "attn_gate"], dict(weights=[1.0]), "1 merge weights for 2 adapters"),
    "weight not finite": (["attn", "attn_gate"], dict(weights=[1.0, float("nan")]), "must be finite"),
    "unknown strategy": (["attn", "attn_gate"], dict(strategy="magnitude_prune"), "unknown merge strategy"),
    "unknown strategy number": (["attn", "attn_gate"], dict(strategy=4), "unknown merge strategy 4"),
    "unknown sign method": (["attn", "attn_gate"], dict(strategy="ties", density=0.5, majority_sign="median"),
                            "unknown majority sign method 'median'"),
    "ties density 0": (["attn", "attn_gate"], dict(strategy="ties", density=0.0), r"ties merge needs a density in"),
    "dare density above 1": (["attn", "attn_gate"], dict(strategy="dare_linear", density=1.5),
                             r"dare_linear merge needs a density in \(0, 1\] .*, got 1.5"),
    "expert formats": (["experts", "per_expert"], {},
                       r"cannot merge the expert LoRAs on layer 0 w13: .*stacked .* per-expert"),
    "not an adapter": (["attn", "missing"], {}, r"adapter .*missing: .*adapter_config.json does not exist"),
    "no adapters": ([], {}, "no adapters to merge"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_merges_name_the_problem_and_leave_nothing(ours, adapters, case):
    names, kwargs, message = REFUSED[case]
    store = store_for(ours)
    store.load(1, adapters / "attn")
    before = paged_logits(ours, SEQUENCES, PROMPT_LENS, adapters=store, adapter_indices=[1, 0])
    dirs = [n if n == "__base_model__" else str(adapters / n) for n in names]
    with pytest.raises(AdapterError, match=message):
        store.load_merged(2, dirs, "merged", **kwargs)
    assert sorted(store.loaded) == [1]
    after = paged_logits(ours, SEQUENCES, PROMPT_LENS, adapters=store, adapter_indices=[1, 0])
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_refused_indices(ours, adapters):
    store = store_for(ours)
    store.load(1, adapters / "attn")
    with pytest.raises(AdapterError, match="index 0 is the base model"):
        store.load_merged(0, [adapters / "attn", adapters / "attn_gate"], "m")
    with pytest.raises(AdapterError, match="index 1 already holds"):
        store.load_merged(1, [adapters / "attn", adapters / "attn_gate"], "m")
