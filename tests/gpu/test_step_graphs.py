"""Prefill and mixed steps replayed from CUDA graphs between their attentions (engine.step_graphs) on the GPU:
the logits of the eager forward, the same greedy tokens through the engine (chunks beside decodes), and
nothing compiled or captured twice."""

import pytest
import torch

from tests.gpu.conftest import skip_without_gpu

skip_without_gpu()

from lorax_server.cli import DEFAULT_MODEL_DIR  # noqa: E402
from lorax_server.engine.step_graphs import StepGraphs  # noqa: E402
from lorax_server.models import get_model  # noqa: E402
from lorax_server.utils.tokens import SamplingParams  # noqa: E402
from tests.engine.test_step_graphs import both_ways, sequences  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replayed_pieces_give_the_eager_logits_and_cache(dtype):
    """Captured and replayed: a fresh ragged prefill, a chunk beside decodes; padding tokens write no slot."""
    engine = get_model(str(DEFAULT_MODEL_DIR), dtype=dtype, kv_cache_bytes=64 << 20)
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    # The cache holds k and v of every layer: a padded step multiplies other GEMM shapes (other cuBLAS kernels,
    # other MoE tiles), whose rounding differs by ~1e-6 and grows through the layers (2.7e-4 at most on an H200).
    cache_tolerance = 1e-3 if dtype == "float32" else 2e-2
    for specs, counts in [([(9, 0), (3, 0), (14, 0)], [9, 3, 14]), ([(300, 200), (25, 24), (12, 11)], [100, 1, 1]),
                          ([(30, 29), (25, 24), (60, 20), (12, 11)], [1, 1, 24, 1])]:
        seqs = sequences(engine, specs)
        eager, replayed, cache_eager, cache_replayed, graphs = both_ways(engine, seqs, counts, (32, 128, 256),
                                                                         capture=True)
        step = next(iter(graphs.steps.values()))
        assert not graphs.broken and len(step.graphs) == len(step.pieces) == len(engine.model.model.layers) + 1
        torch.testing.assert_close(replayed.float(), eager.float(), rtol=tolerance, atol=tolerance)
        for (k1, v1), (k2, v2) in zip(cache_eager, cache_replayed):
            torch.testing.assert_close(k2.float(), k1.float(), rtol=cache_tolerance, atol=cache_tolerance)
            torch.testing.assert_close(v2.float(), v1.float(), rtol=cache_tolerance, atol=cache_tolerance)


def test_chunked_prefill_through_the_engine_gives_the_same_greedy_tokens():
    """A 1000-token prompt in chunks beside three running requests, with the pieces replayed and without (in
    float32: padded steps run other GEMM shapes, and bf16 rounding could flip a random model's argmax)."""
    outputs = []
    for replayed in (False, True):
        model = get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=64 << 20)
        if replayed:
            model.runner.step_graphs = StepGraphs(model.model, model.cache.layers)
            assert model.runner.step_graphs.prepare(256) > 0 and not model.runner.step_graphs.broken

        def request(rid, ids, new):
            return model.new_request(rid, ids, SamplingParams(), new, ignore_eos=True,
                                     chunk_len=96 if len(ids) > 100 else None)

        def blocks(ids, new, first):
            return list(range(first, first + model.cache.blocks_for(len(ids) + new - 1)))

        model.max_prefill_tokens = 96
        _, running = model.prefill(1, [request(20 + i, [3 + i] * 50, 30) for i in range(3)],
                                   {20 + i: blocks([0] * 50, 30, 700 + 10 * i) for i in range(3)})
        long = [(7 * i) % 500 + 3 for i in range(1000)]
        results, batch = model.prefill(2, [request(30, long, 8)], {30: blocks(long, 8, 800)},
                                       cached_batch_id=running.id)
        tokens = {}
        while batch is not None:
            step, batch = model.decode([batch.id])
            for r in step:
                tokens.setdefault(r.request_id, []).append(r.token.id)
        outputs.append(tokens)
    assert outputs[0] == outputs[1]


def test_a_decode_batch_above_the_decode_graphs_runs_through_the_pieces(monkeypatch):
    """600 rows: more than the decode graphs' buckets (cut to 512 here; 1024 by default), so each decode step is
    replayed from the pieces (padded to 640) with the paged decode attention between them; the greedy tokens are
    those of eager steps (float32)."""
    import lorax_server.engine.graphs as decode_graphs

    monkeypatch.setattr(decode_graphs, "BATCH_BUCKETS", tuple(b for b in decode_graphs.BATCH_BUCKETS if b <= 512))
    outputs = []
    for replayed in (False, True):
        model = get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=256 << 20)
        replays = []
        if replayed:
            graphs = model.runner.step_graphs = StepGraphs(model.model, model.cache.layers)
            assert graphs.prepare() > 0 and not graphs.broken
            run = graphs.run

            def counted(batch):
                logits = run(batch)
                replays.append((batch.input_ids.shape[0], logits is not None))
                return logits
            graphs.run = counted
        else:
            model.runner.step_graphs = None
        prompts = {i: [3 + i % 400, 5 + i % 7, 9] for i in range(600)}
        requests = [model.new_request(i, ids, SamplingParams(), 4, ignore_eos=True) for i, ids in prompts.items()]
        _, batch = model.prefill(1, requests)
        tokens = {}
        while batch is not None:
            step, batch = model.decode([batch.id])
            for r in step:
                tokens.setdefault(r.request_id, []).append(r.token.id)
        if replayed:  # every decode step of the 600 rows came from the pieces
            assert replays.count((600, True)) >= 3 and all(done for n, done in replays if n <= 1024)
        outputs.append(tokens)
    assert outputs[0] == outputs[1]
