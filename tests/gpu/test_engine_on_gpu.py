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
