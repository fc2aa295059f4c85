"""The engine on the GPU: decode steps replayed from CUDA graphs give the tokens of eager decode steps."""

import pytest

from tests.gpu.conftest import skip_without_gpu

skip_without_gpu()

from lorax_server.cli import DEFAULT_MODEL_DIR  # noqa: E402
from lorax_server.models import get_model  # noqa: E402
from lorax_server.engine.graphs import BATCH_BUCKETS  # noqa: E402

pytestmark = pytest.mark.gpu
PROMPTS = ["The for statement", "A list is", "Exceptions are", "def f(x):", "Beautiful is"]


def test_cuda_graph_decode_equals_eager():
    model = get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=64 << 20)
    assert model.graphs is not None
    with_graphs = [r.generated_ids for r in model.generate(PROMPTS, 20)]
    assert model.graphs.steps and not model.graphs.broken
    model.graphs = None
    eager = [r.generated_ids for r in model.generate(PROMPTS, 20)]
    assert with_graphs == eager
    assert model.cache.all_free


def test_warmup_captures_every_batch_bucket():
    model = get_model(str(DEFAULT_MODEL_DIR), dtype="bfloat16", kv_cache_bytes=64 << 20)
    assert model.graphs.prepare(300) == len(BATCH_BUCKETS) and not model.graphs.broken  # every bucket x context 512
    assert [r.generated_ids for r in model.generate(PROMPTS, 5)]


def test_cuda_graph_decode_with_adapters_equals_eager():
    """Base, `zen` (attention and experts) and `shout` (attention and lm_head) in one batch; then an
    offload and a load, which rebuild the stacks and must drop the graphs that read the old ones."""
    ASSETS = DEFAULT_MODEL_DIR.parent  # lorax_server/assets (no gRPC import)

    model = get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=64 << 20)
    for index, name in ((1, "zen"), (2, "shout")):
        model.adapters.load(index, ASSETS / "adapters" / name)
    mix = [0, 1, 2, 1, 2]
    with_graphs = [r.generated_ids for r in model.generate(PROMPTS, 12, adapter_indices=mix)]
    lora_steps = [key for key in model.graphs.steps if key[2] is not None]
    assert lora_steps and not model.graphs.broken
    model.adapters.offload(2)
    model.adapters.load(3, ASSETS / "adapters" / "shout")
    moved = [0, 1, 3, 1, 3]
    after_reload = [r.generated_ids for r in model.generate(PROMPTS, 12, adapter_indices=moved)]
    assert model.graphs.stacks is model.adapters.stacks
    model.graphs = None
    eager = [r.generated_ids for r in model.generate(PROMPTS, 12, adapter_indices=moved)]
    assert with_graphs == after_reload == eager
    assert model.cache.all_free


def test_decode_steps_launched_ahead_equal_steps_launched_in_turn():
    """Sampled with seeds and penalties: the step launched ahead (async copy, pinned memory, graphs) draws
    what the step launched at its Decode call draws."""
    from lorax_server.utils.tokens import SamplingParams

    model = get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=64 << 20)
    params = SamplingParams(do_sample=True, seed=5, temperature=0.8, top_k=20, repetition_penalty=1.2)
    assert model.decode_ahead
    ahead = [r.generated_ids for r in model.generate(PROMPTS, 16, params)]
    model.decode_ahead = False
    in_turn = [r.generated_ids for r in model.generate(PROMPTS, 16, params)]
    assert ahead == in_turn and model.cache.all_free


def test_constrained_steps_sampled_after_their_forward_pass_equal_steps_launched_in_turn():
    """Two JSON-schema requests beside three free ones, sampled with seeds: each step's forward pass is launched
    from the device's tokens before they are read, its sampling once the grammars took them (pinned copies,
    graphs); the tokens and ends are those of steps launched at their Decode call."""
    import json

    from lorax_server.utils.tokens import SamplingParams

    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                                          "ok": {"type": "boolean"}},
                         "required": ["n", "ok"], "additionalProperties": False})
    model = get_model(str(DEFAULT_MODEL_DIR), dtype="bfloat16", kv_cache_bytes=64 << 20)

    def run():
        requests = [model.new_request(i, model.tokenize(p, [], 0), SamplingParams(do_sample=True, seed=i), 24,
                                      ignore_eos=i >= 2, schema=schema if i < 2 else None)
                    for i, p in enumerate(PROMPTS)]
        results, batch = model.prefill(1, requests)
        out = {}
        while True:
            for r in results:
                out.setdefault(r.request_id, []).append((r.token.id, r.finish_reason))
            if batch is None:
                return out
            results, batch = model.decode([batch.id])

    assert model.decode_ahead
    ahead = run()
    model.decode_ahead = False
    assert run() == ahead and model.cache.all_free
    assert all(ahead[i][-1][1] == "eos" for i in (0, 1))  # both JSON outputs completed


def test_after_the_warm_up_serving_compiles_no_kernel():
    """Warmup's kernel warm-up (and the decode graphs) leave nothing for Triton to compile when requests arrive:
    prompts of odd lengths, batches of new sizes, a prefix-cache hit and a prompt prefilled in chunks beside
    running decodes. Each new specialisation would stall its batch (seconds, where the disk cache is cold)."""
    import triton

    from lorax_server.utils.tokens import SamplingParams

    model = get_model(str(DEFAULT_MODEL_DIR), dtype="bfloat16", kv_cache_bytes=64 << 20)
    model.warm_up_kernels(max_prefill_tokens=4096)
    if model.graphs is not None:  # as Warmup: the decode graphs of the longest context
        model.graphs.prepare(1024)
    compiled = []

    def hook(*, repr, **kwargs):
        compiled.append(repr)

    triton.knobs.runtime.jit_post_compile_hook = hook
    try:
        def request(rid, ids, new=4, **kwargs):
            return model.new_request(rid, ids, SamplingParams(), new, ignore_eos=True, **kwargs)

        def blocks(ids, new, first, reuse=()):
            return list(reuse) + list(range(first, first + model.cache.blocks_for(len(ids) + new - 1) - len(reuse)))

        prompts = {1: list(range(5, 42)), 2: list(range(7, 12)), 3: [9] * 700}  # 37, 5 and 700 tokens
        _, batch = model.prefill(1, [request(i, ids) for i, ids in prompts.items()],
                                 {i: blocks(ids, 4, 100 * i) for i, ids in prompts.items()})
        while batch is not None:
            batch = model.decode([batch.id])[1]
        shared = list(range(100, 164))  # 4 full blocks, then a prefix-cache hit on them
        _, first = model.prefill(2, [request(10, shared + [7] * 9)], {10: blocks(shared + [7] * 9, 4, 500)})
        prefix = model.batches[first.id].requests[0].seq.blocks[:4]
        hit = shared + [8] * 23
        _, second = model.prefill(3, [request(11, hit, cache_len=64)], {11: blocks(hit, 4, 600, prefix)})
        model.clear()
        model.max_prefill_tokens = 96  # chunks of a 1000-token prompt beside three running requests
        _, running = model.prefill(4, [request(20 + i, [3 + i] * 50, new=40) for i in range(3)],
                                   {20 + i: blocks([0] * 50, 40, 700 + 10 * i) for i in range(3)})
        long = [11] * 1000
        _, batch = model.prefill(5, [request(30, long, chunk_len=96)], {30: blocks(long, 4, 800)},
                                 cached_batch_id=running.id)
        while batch is not None:
            batch = model.decode([batch.id])[1]
    finally:
        triton.knobs.runtime.jit_post_compile_hook = None
        model.max_prefill_tokens = None
        model.clear()
    print("compiled after the warm-up:", *compiled, sep="\n")  # shown in full when the test fails
    assert compiled == []
