"""`kv_cache_dtype="fp8"` (`--kv-cache-dtype fp8`) in the engine, on the embedded tiny Mixtral (fp32, CPU): the
cache holds float8_e4m3fn entries (twice the blocks in the same budget), scaled per layer by the checkpoint's
k_scale / v_scale, and the greedy output stays close to the float cache's."""

import shutil
from typing import List

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.models import get_model
from lorax_server.utils import quantization
from tests.engine.test_prefix_cache import SHARED, Outputs, blocks_for, request, run, tail

FP8 = torch.float8_e4m3fn
PROMPTS = [SHARED + tail(1, 5), tail(2, 30), tail(3, 12) + SHARED[:20], tail(4, 50)]
NEW = 16
# Python-docs text, which the tiny model was trained on (confident predictions, few near-ties).
TEXTS = ["The for statement", "The import statement", "def fibonacci(n):", "1, 2, 3, 4,", "A class definition",
         "The return statement", "Beautiful is", "The while statement"]
LONG_NEW = 24


@pytest.fixture(scope="module")
def fp8_engine():
    return get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=4 << 20, kv_cache_dtype="fp8")


@pytest.fixture(scope="module")
def float_engine():
    return get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=4 << 20)


@pytest.fixture(autouse=True)
def empty_caches(request):
    engines = [request.getfixturevalue(name) for name in ("fp8_engine", "float_engine") if name in request.fixturenames]
    for engine in engines:
        engine.clear()
        engine.max_prefill_tokens = None
    yield
    for engine in engines:
        engine.clear()
        assert engine.cache.all_free and not engine.batches


def attention_layers(engine):
    return [layer.self_attn for layer in engine.model.model.layers]


def greedy(engine, prompts, new=NEW, first_block=10) -> Outputs:
    requests, blocks, at = [], {}, first_block
    for i, ids in enumerate(prompts):
        requests.append(request(engine, i, ids, new))
        blocks[i] = blocks_for(engine, ids, new, at)
        at += len(blocks[i])
    return run(engine, 1, requests, blocks)


def test_the_fp8_cache_holds_e4m3_entries_and_twice_the_blocks(fp8_engine, float_engine):
    assert all(k.dtype == FP8 and v.dtype == FP8 for k, v in fp8_engine.cache.layers)
    assert float_engine.cache.layers[0][0].dtype == torch.float32
    # One byte an entry against four: the same budget holds four times the fp32 cache's blocks (2x a bf16 one).
    assert fp8_engine.cache.num_blocks == 4 * float_engine.cache.num_blocks
    assert fp8_engine.kv_cache_dtype == FP8 and fp8_engine.dtype == torch.float32
    assert all((a.k_scale, a.v_scale) == (1.0, 1.0) for a in attention_layers(fp8_engine))


def agreeing_prefixes(got, want) -> List[int]:
    """Per request, how many generated tokens agree before the first difference (after it, the continuations
    differ anyway)."""
    return [next((n for n, (a, b) in enumerate(zip(x.generated_ids, y.generated_ids)) if a != b),
                 len(x.generated_ids)) for x, y in zip(got, want)]


def test_greedy_generation_with_an_fp8_cache_agrees_with_the_float_cache(fp8_engine, float_engine):
    """Most greedy tokens are the float cache's. The tiny model's logits have near-ties, where e4m3's rounding
    of the cached K/V (6% at most) may pick the other token, so some requests part early; measured: 142 of 192
    tokens before the first difference, 5 of 8 requests identical."""
    got, want = fp8_engine.generate(TEXTS, LONG_NEW), float_engine.generate(TEXTS, LONG_NEW)
    agree = agreeing_prefixes(got, want)
    assert all(n >= 1 for n in agree), agree  # the first token's prefill reads no cache entry
    assert sum(agree) >= 0.6 * LONG_NEW * len(TEXTS), agree
    assert sum(n == LONG_NEW for n in agree) >= len(TEXTS) // 2, agree


def test_teacher_forced_logprobs_over_an_fp8_cache_stay_close(fp8_engine, float_engine):
    """A 100-token prompt prefilled in chunks of 10 with prompt logprobs: every chunk after the first attends to
    the earlier ones through the cache, so each prompt token's logprob (teacher-forced: no divergence) measures
    what the FP8 cache changes. The first chunk reads no cache entry and is exact; the others differ by 0.05 on
    average (measured 0.049, at most 0.27, on logprobs around -13)."""
    ids = tail(7, 100)
    logprobs = []
    for engine in (fp8_engine, float_engine):
        engine.max_prefill_tokens = 10
        out = run(engine, 1, [request(engine, 1, ids, 4, chunk_len=10, prefill_logprobs=True)],
                  {1: blocks_for(engine, ids, 4, 10)})
        logprobs.append(out.prompt[1][1:])
        engine.clear()
    got, want = logprobs
    assert got[:9] == pytest.approx(want[:9], abs=1e-5)
    diffs = [abs(a - b) for a, b in zip(got, want)]
    assert 0 < sum(diffs) / len(diffs) < 0.1 and max(diffs) < 0.6, diffs


def test_a_prefix_hit_equals_a_chunked_prefill_and_stays_close_to_a_full_one(fp8_engine):
    """A prefix hit reads the prefix's K/V from the FP8 cache, as the second chunk of a chunked prefill at the same
    boundary does: the two give the same tokens and logprobs. A full prefill uses the prefix's K/V unquantized,
    so against it only closeness holds."""
    engine = fp8_engine
    ids = SHARED[:32] + tail(8, 8)
    full = run(engine, 1, [request(engine, 1, ids)], {1: blocks_for(engine, ids, 8, 10)})
    engine.clear()
    first = blocks_for(engine, SHARED + tail(9, 5), 8, 30)
    run(engine, 2, [request(engine, 2, SHARED + tail(9, 5))], {2: first}, steps=1)
    hit = run(engine, 3, [request(engine, 3, ids, cache_len=32)], {3: blocks_for(engine, ids, 8, 60, first[:2])})
    engine.clear()
    engine.max_prefill_tokens = 8
    chunked = run(engine, 4, [request(engine, 4, ids, chunk_len=32)], {4: blocks_for(engine, ids, 8, 90)})
    assert hit.tokens[3] == chunked.tokens[4]
    assert hit.logprobs[3] == pytest.approx(chunked.logprobs[4], abs=1e-4)
    assert hit.logprobs[3][0] == pytest.approx(full.logprobs[1][0], abs=0.1)
    same = next((n for n, (x, y) in enumerate(zip(hit.tokens[3], full.tokens[1])) if x != y), 8)
    assert same >= 4, (hit.tokens[3], full.tokens[1])


@pytest.fixture(scope="module")
def scaled_checkpoint(tmp_path_factory):
    """The tiny Mixtral with vLLM's KV-cache scales: k_scale / v_scale on layers 0-1, kv_scale on layer 2,
    none on layer 3 (F32 scalars, as vLLM's FP8 checkpoints store them)."""
    directory = tmp_path_factory.mktemp("scaled")
    for file in DEFAULT_MODEL_DIR.iterdir():
        if file.is_file():
            shutil.copy(file, directory / file.name)
    tensors = load_file(directory / "model.safetensors")
    prefix = "model.layers.{}.self_attn."
    tensors[prefix.format(0) + "k_scale"] = torch.tensor(0.0123, dtype=torch.float32)
    tensors[prefix.format(0) + "v_scale"] = torch.tensor(0.02, dtype=torch.float32)
    tensors[prefix.format(1) + "k_scale"] = torch.tensor([0.5], dtype=torch.float32)
    tensors[prefix.format(1) + "v_scale"] = torch.tensor(0.25, dtype=torch.float32)
    tensors[prefix.format(2) + "kv_scale"] = torch.tensor(0.03, dtype=torch.float32)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_scales_are_loaded_from_the_checkpoint(scaled_checkpoint, float_engine):
    engine = get_model(str(scaled_checkpoint), dtype="bfloat16", kv_cache_bytes=1 << 20, kv_cache_dtype="fp8")
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731 (stored as F32, read exactly)
    assert [(a.k_scale, a.v_scale) for a in attention_layers(engine)] == [
        (f32(0.0123), f32(0.02)), (0.5, 0.25), (f32(0.03), f32(0.03)), (1.0, 1.0)]
    # A float cache loads them too (the checkpoint's tensors are all read) and ignores them.
    plain = get_model(str(scaled_checkpoint), dtype="float32", kv_cache_bytes=4 << 20)
    assert [(a.k_scale, a.v_scale) for a in attention_layers(plain)][2] == (f32(0.03), f32(0.03))
    assert greedy(plain, PROMPTS[:2], new=6).tokens == greedy(float_engine, PROMPTS[:2], new=6).tokens


def test_generation_with_checkpoint_scales(scaled_checkpoint, float_engine):
    """Scales that fit the keys' range (the tiny model's |k| stays within a few units, |k / 0.0123| within 448)
    give the same closeness to the float cache as scale 1."""
    engine = get_model(str(scaled_checkpoint), dtype="float32", kv_cache_bytes=4 << 20, kv_cache_dtype="fp8")
    agree = agreeing_prefixes(engine.generate(TEXTS, LONG_NEW), float_engine.generate(TEXTS, LONG_NEW))
    assert sum(agree) >= 0.6 * LONG_NEW * len(TEXTS), agree


def test_a_bad_kv_cache_dtype_or_a_gpu_without_fp8_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8' is not supported"):
        get_model(str(DEFAULT_MODEL_DIR), kv_cache_dtype="int8")
    monkeypatch.setattr(quantization, "fp8_unsupported", lambda device: "this GPU (T4, compute capability 7.5) has "
                        "no FP8 tensor cores")
    with pytest.raises(ValueError, match="kv cache dtype 'fp8' is not supported on this machine: this GPU \\(T4"):
        quantization.check_fp8_device(torch.device("cuda"), what="kv cache dtype 'fp8'")


def test_serve_passes_kv_cache_dtype_to_the_model(monkeypatch, tmp_path):
    """`serve --kv-cache-dtype fp8` reaches get_model (through load_and_serve); the default is "auto"; any other
    value is a usage error naming the option."""
    from typer.testing import CliRunner

    from lorax_server import launch
    from lorax_server.cli import app

    calls = []
    monkeypatch.setattr(launch, "load_and_serve", lambda *args, **kwargs: calls.append(kwargs))
    base = ["serve", str(DEFAULT_MODEL_DIR), "--uds-path", str(tmp_path / "s")]
    runner = CliRunner()
    assert runner.invoke(app, base + ["--kv-cache-dtype", "fp8"]).exit_code == 0
    assert runner.invoke(app, base).exit_code == 0
    assert [c["kv_cache_dtype"] for c in calls] == ["fp8", "auto"]
    bad = runner.invoke(app, base + ["--kv-cache-dtype", "int8"])
    assert bad.exit_code != 0 and "--kv-cache-dtype" in bad.output


def test_load_and_serve_hands_kv_cache_dtype_to_get_model(monkeypatch):
    import lorax_server.models as models
    from lorax_server import launch

    seen = {}

    class Stop(Exception):
        pass

    def fake_get_model(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(models, "get_model", fake_get_model)
    with pytest.raises(Stop):
        launch.load_and_serve(str(DEFAULT_MODEL_DIR), "/tmp/unused", wait=False, kv_cache_dtype="fp8")
    assert seen["kv_cache_dtype"] == "fp8"
