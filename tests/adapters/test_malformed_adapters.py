"""Malformed adapter files and configs: each one an AdapterError naming the adapter, the file or field, and
what is wrong (the server answers it INVALID_ARGUMENT); nothing of it is kept. `.bin` files stay weights-only."""

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorax_server.adapters import AdapterError
from tests.adapters.peft_adapters import make_peft_adapter, store_for
from tests.tiny_mixtral import load_ours, paged_logits, save_tiny_mixtral

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SAFETENSORS, BIN, CONFIG = "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(our model, a good PEFT adapter on q_proj, lm_head and the experts)."""
    root = tmp_path_factory.mktemp("malformed")
    hf = save_tiny_mixtral(root / "base")
    make_peft_adapter(hf, root / "good", seed=1, target_modules=["q_proj", "lm_head", "w1", "w2", "w3"])
    return load_ours(root / "base"), root / "good"


# -- how each case spoils a copy of the good adapter ----------------------------------------------------


def write_bytes(name, data):
    return lambda d: (d / name).write_bytes(data)


def cut_weights(fraction):
    def spoil(d):
        data = (d / SAFETENSORS).read_bytes()
        (d / SAFETENSORS).write_bytes(data[:int(len(data) * fraction)])
    return spoil


def as_bin(transform=None, cut=None):
    """The weights as adapter_model.bin (torch.save), optionally transformed, or cut to `cut` of its bytes."""
    def spoil(d):
        tensors = load_file(d / SAFETENSORS)
        (d / SAFETENSORS).unlink()
        torch.save(transform(tensors) if transform else tensors, d / BIN)
        if cut is not None:
            (d / BIN).write_bytes((d / BIN).read_bytes()[:int((d / BIN).stat().st_size * cut)])
    return spoil


def edit_tensors(edit):
    def spoil(d):
        tensors = load_file(d / SAFETENSORS)
        edit(tensors)
        save_file(tensors, d / SAFETENSORS)
    return spoil


def edit_config(**changes):
    def spoil(d):
        config = json.loads((d / CONFIG).read_text())
        config.update(changes)
        (d / CONFIG).write_text(json.dumps(config))  # json writes NaN / Infinity as Python reads them
    return spoil


def add_pattern(field, key, value):
    def spoil(d):
        config = json.loads((d / CONFIG).read_text())
        config[field] = {**config.get(field, {}), key: value}
        (d / CONFIG).write_text(json.dumps(config))
    return spoil


def drop_config(field):
    def spoil(d):
        config = json.loads((d / CONFIG).read_text())
        del config[field]
        (d / CONFIG).write_text(json.dumps(config))
    return spoil


def set_q_b(value):
    def edit(t):
        t[Q_B][0, 0] = value
    return edit


FILES = {
    "empty safetensors": (write_bytes(SAFETENSORS, b""), rf"{SAFETENSORS} is empty"),
    "truncated safetensors": (cut_weights(0.6), rf"{SAFETENSORS} is truncated or corrupt \(SafetensorError: "
                                                r".*incomplete metadata"),
    "header cut": (cut_weights(0.0005), rf"{SAFETENSORS} is truncated or corrupt \(SafetensorError"),
    "garbage safetensors": (write_bytes(SAFETENSORS, b"\x00" * 64), rf"{SAFETENSORS} is truncated or corrupt"),
    "text as safetensors": (write_bytes(SAFETENSORS, b"not a tensor file at all " * 4),
                            rf"{SAFETENSORS} is truncated or corrupt \(SafetensorError: .*header too large"),
    "no weights": (lambda d: (d / SAFETENSORS).unlink(), f"has neither {SAFETENSORS} nor {BIN}"),
    "empty bin": (as_bin(cut=0), rf"{BIN} is empty"),
    "truncated bin": (as_bin(cut=0.5), rf"{BIN} is truncated or corrupt \((OSError|RuntimeError): "),
    "bin without its end": (as_bin(cut=0.99), rf"{BIN} is truncated or corrupt \(RuntimeError: PytorchStreamReader "
                                              r"failed reading zip archive"),
    "garbage bin": (lambda d: ((d / SAFETENSORS).unlink(), (d / BIN).write_bytes(b"\x00" * 64)),
                    rf"{BIN} is corrupt or not a PyTorch tensor file \(Unsupported operand"),
    "bin holds a list": (as_bin(lambda t: list(t.values())), rf"{BIN} holds a list, not a dict of named tensors"),
    "bin holds a number": (as_bin(lambda t: {**t, "step": 3}),
                           rf"{BIN}: entry 'step' is not a named tensor \(it is int\)"),
    "int tensor": (edit_tensors(lambda t: t.__setitem__(Q_A, t[Q_A].to(torch.int32))),
                   rf"{SAFETENSORS}: tensor {Q_A} has dtype torch.int32; LoRA weights are float32"),
    "bool tensor in a bin": (as_bin(lambda t: {**t, Q_B: t[Q_B] > 0}), rf"tensor {Q_B} has dtype torch.bool"),
    "NaN": (edit_tensors(set_q_b(float("nan"))), "q_proj: lora_B holds NaN or infinite values"),
    "Inf": (edit_tensors(set_q_b(float("inf"))), "q_proj: lora_B holds NaN or infinite values"),
    "duplicate key": (edit_tensors(lambda t: t.__setitem__(Q_A.removeprefix("base_model.model."), t[Q_A].clone())),
                      r"q_proj: lora_A is given twice"),
}

CONFIGS = {
    "empty": (write_bytes(CONFIG, b" \n"), rf"{CONFIG} is empty"),
    "not JSON": (write_bytes(CONFIG, b'{"r": 4,'), rf"{CONFIG} is not valid JSON \(Expecting property name"),
    "not text": (write_bytes(CONFIG, b"\x80\x81\x82"), rf"{CONFIG} is not valid JSON"),
    "a list": (write_bytes(CONFIG, b'[{"r": 4}]'), rf"{CONFIG} holds a JSON list, not an object of LoRA settings"),
    "a string": (write_bytes(CONFIG, b'"LORA"'), rf"{CONFIG} holds a JSON string"),
    "r 0": (edit_config(r=0), "r must be a positive integer \\(a LoRA rank\\), got 0"),
    "r negative": (edit_config(r=-4), "r must be a positive integer .*, got -4"),
    "r fractional": (edit_config(r=4.5), "r must be a positive integer .*, got 4.5"),
    "r a string": (edit_config(r="4"), "r must be a positive integer .*, got '4'"),
    "r true": (edit_config(r=True), "r must be a positive integer .*, got True"),
    "r missing": (drop_config("r"), rf"{CONFIG} has no 'r' \(the LoRA rank\)"),
    "lora_alpha missing": (drop_config("lora_alpha"), rf"{CONFIG} has no 'lora_alpha'"),
    "lora_alpha NaN": (edit_config(lora_alpha=float("nan")), "lora_alpha must be a finite number .*, got nan"),
    "lora_alpha Infinity": (edit_config(lora_alpha=float("inf")), "lora_alpha must be a finite number .*, got inf"),
    "lora_alpha beyond floats": (write_bytes(CONFIG, json.dumps({"r": 4, "lora_alpha": 10**400}).encode()),
                                 "lora_alpha must be a finite number"),
    "lora_alpha a string": (edit_config(lora_alpha="16"), "lora_alpha must be a finite number .*, got '16'"),
    "r not the tensors' rank": (edit_config(r=8), r"lora_A / lora_B have rank 4 but adapter_config.json gives r=8"),
    "rank_pattern not the tensors' rank": (add_pattern("rank_pattern", "q_proj", 2),
                                           r"layers.0.self_attn.q_proj: lora_A / lora_B have rank 4 but .* gives r=2"),
    "bad regex in target_modules": (edit_config(target_modules="(q_proj|lm_head"),
                                    r"target_modules '\(q_proj\|lm_head' is not a valid regular expression"),
    "bad regex in rank_pattern": (edit_config(rank_pattern={"layers.[0": 4}),
                                  r"rank_pattern key 'layers.\[0' is not a valid regular expression"),
    "bad regex in alpha_pattern": (edit_config(alpha_pattern={"*_proj": 8}),
                                   r"alpha_pattern key '\*_proj' is not a valid regular expression \(nothing to "
                                   r"repeat at position 0\)"),
    "rank_pattern value 0": (edit_config(rank_pattern={"q_proj": 0}),
                             r"rank_pattern\['q_proj'\] must be a positive integer .*, got 0"),
    "alpha_pattern value NaN": (edit_config(alpha_pattern={"q_proj": float("nan")}),
                                r"alpha_pattern\['q_proj'\] must be a finite number"),
    "rank_pattern a list": (edit_config(rank_pattern=["q_proj"]), "rank_pattern must be an object .*got a list"),
    "target_modules of numbers": (edit_config(target_modules=["q_proj", 3]),
                                  r"target_modules must be a list of module names .*got \['q_proj', 3\]"),
    "use_rslora a string": (edit_config(use_rslora="yes"), "use_rslora must be true or false, got 'yes'"),
    "embedding in target_modules": (edit_config(target_modules=["q_proj", "embed_tokens"]),
                                    "target_modules names embed_tokens: LoRA on the token embedding "
                                    r"\(embed_tokens\) is not supported"),
    "trainable tokens": (edit_config(trainable_token_indices=[3, 4]),
                         r"trainable tokens \(trainable_token_indices\) is not supported"),
}


@pytest.mark.parametrize("case", sorted(FILES) + sorted(CONFIGS))
def test_malformed_adapter_is_refused_by_name(base, tmp_path, case):
    model, good = base
    spoil, message = FILES.get(case) or CONFIGS[case]
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    spoil(bad)
    store = store_for(model)
    with pytest.raises(AdapterError, match=message) as refused:
        store.load(3, bad)
    assert str(refused.value).startswith(f"adapter {bad}: ")
    assert not store.loaded and store.stacks is None


class Payload:
    """Unpickled without restrictions, this creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "bare pickle"])
def test_pickle_payload_is_refused_and_never_runs(base, tmp_path, how):
    model, good = base
    pickle.loads(pickle.dumps(Payload(tmp_path / "proof"))).close()  # the payload works where pickles are trusted
    assert (tmp_path / "proof").exists()
    bad, marker = tmp_path / "bad", tmp_path / "marker"
    shutil.copytree(good, bad)
    tensors = load_file(bad / SAFETENSORS)
    (bad / SAFETENSORS).unlink()
    payload = {**tensors, "extra": Payload(marker)}
    if how == "torch.save":
        torch.save(payload, bad / BIN)
        message = rf"{BIN} is refused: its pickle calls .*open, which weights-only loading never runs"
    else:
        (bad / BIN).write_bytes(pickle.dumps(payload))
        message = rf"{BIN} is corrupt or not a PyTorch tensor file"
    store = store_for(model)
    with pytest.raises(AdapterError, match=message):
        store.load(1, bad)
    assert not marker.exists() and not store.loaded


def test_the_model_serves_as_before_after_refusals(base, tmp_path):
    model, good = base
    store = store_for(model)
    store.load(1, good)
    sequences = [list(range(3, 12)), list(range(30, 36))]
    before = paged_logits(model, sequences, [5, 3], adapters=store, adapter_indices=[1, 0])
    for case in ("truncated safetensors", "not JSON", "lora_alpha NaN"):
        bad = tmp_path / case.replace(" ", "_")
        shutil.copytree(good, bad)
        (FILES.get(case) or CONFIGS[case])[0](bad)
        with pytest.raises(AdapterError):
            store.load(2, bad)
    assert sorted(store.loaded) == [1]
    after = paged_logits(model, sequences, [5, 3], adapters=store, adapter_indices=[1, 0])
    assert all(torch.equal(a, b) for a, b in zip(before, after))
