"""Prefill and mixed steps cut at each attention (engine.step_graphs), run eagerly over the static buffers on the
CPU: the same logits and the same cache as the whole forward, padding tokens writing nothing. (The CUDA graph
capture and replay of the pieces: tests/gpu/test_step_graphs.py.)"""

import pytest
import torch

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.engine.cache import PagedSequence
from lorax_server.engine.runner import pack
from lorax_server.engine.step_graphs import StepGraphs, enabled_by_env
from lorax_server.models import get_model


@pytest.fixture(scope="module")
def engine():
    return get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=8 << 20)


def sequences(engine, specs, seed=0):
    """PagedSequences of (tokens, cached) with their prefixes written by one plain forward first."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.config.vocab_size
    seqs = [PagedSequence(torch.randint(3, vocab, (length,), generator=g).tolist()) for length, _ in specs]
    prefixes = [(s, cached) for s, (_, cached) in zip(seqs, specs) if cached]
    if prefixes:
        engine.runner.forward([s for s, _ in prefixes], [c for _, c in prefixes], prefill=True)
    return seqs


def both_ways(engine, seqs, counts, buckets, capture=False):
    """Logits and caches of one step through the whole forward, then (from the same cache) through the pieces
    (replayed from CUDA graphs with `capture`); and the StepGraphs that ran them."""
    runner = engine.runner
    start = [s.cached for s in seqs]
    before = [(k.clone(), v.clone()) for k, v in engine.cache.layers]
    whole = runner.forward(seqs, counts, prefill=True)
    after_whole = [(k.clone(), v.clone()) for k, v in engine.cache.layers]
    for (k, v), (k0, v0) in zip(engine.cache.layers, before):
        k.copy_(k0)
        v.copy_(v0)
    for s, c in zip(seqs, start):
        s.cached = c
    graphs = runner.step_graphs = StepGraphs(engine.model, engine.cache.layers, capture=capture, buckets=buckets)
    try:
        pieces = runner.forward(seqs, counts, prefill=True)
    finally:
        runner.step_graphs = None
    assert list(graphs.steps) == [next(b for b in buckets if b >= sum(counts))]  # the pieces ran, padded
    return whole, pieces, after_whole, engine.cache.layers, graphs


@pytest.mark.parametrize("specs, counts", [
    ([(9, 0), (3, 0), (14, 0)], [9, 3, 14]),  # a fresh ragged prefill: 26 tokens padded to 32
    ([(40, 31), (6, 0)], [9, 6]),  # new tokens on a cached prefix beside a fresh prompt: 15 tokens padded to 16
    ([(30, 29), (25, 24), (60, 20), (12, 11)], [1, 1, 24, 1]),  # a chunk beside decodes
])
def test_the_pieces_give_the_whole_forwards_logits_and_cache(engine, specs, counts):
    engine.clear()
    seqs = sequences(engine, specs)
    whole, pieces, cache_whole, cache_pieces, _ = both_ways(engine, seqs, counts, buckets=(8, 16, 32, 64))
    assert pieces.shape == whole.shape
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-4)
    for (k1, v1), (k2, v2) in zip(cache_whole, cache_pieces):
        torch.testing.assert_close(k2, k1, rtol=1e-5, atol=1e-5)  # padding tokens wrote no slot
        torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-5)
    engine.clear()


def test_a_step_beyond_the_largest_bucket_or_wanting_every_tokens_logits_runs_whole(engine):
    engine.clear()
    graphs = StepGraphs(engine.model, engine.cache.layers, capture=False, buckets=(8,))
    seqs = sequences(engine, [(12, 0)])
    big = pack(seqs, [12], engine.cache, True, "cpu")
    assert graphs.run(big) is None  # 12 tokens > 8
    every = pack(seqs, [6], engine.cache, True, "cpu", all_logits=True)
    assert graphs.run(every) is None  # lm_head_indices None: every token's logits
    assert graphs.steps == {}
    engine.clear()


def test_buckets_share_one_set_of_buffers_and_a_new_one_starts_with_no_slot(engine):
    """A bucket captured after others served (its warm-up and capture run the pieces) must write no cache slot."""
    engine.clear()
    graphs = StepGraphs(engine.model, engine.cache.layers, capture=False, buckets=(8, 16))
    seqs = sequences(engine, [(7, 0)])
    graphs.run(pack(seqs, [7], engine.cache, True, "cpu"))
    small = graphs.steps[8]
    assert (small.slots[:7] >= 0).all()
    large = graphs.build(16)
    assert large.q_and_k.data_ptr() == small.q_and_k.data_ptr()
    assert (large.slots == -1).all()
    engine.clear()


def test_on_by_default_on_one_gpu_and_sharded_only_when_asked(monkeypatch):
    """The runner builds them with CUDA graphs (never on the CPU); sharded runs capture all-reduces in the
    pieces, which has not run on two GPUs, so there they wait for LORAX_STEP_GRAPHS=1."""
    monkeypatch.delenv("LORAX_STEP_GRAPHS", raising=False)
    assert enabled_by_env(1) and not enabled_by_env(2)
    monkeypatch.setenv("LORAX_STEP_GRAPHS", "1")
    assert enabled_by_env(1) and enabled_by_env(2)
    monkeypatch.setenv("LORAX_STEP_GRAPHS", "0")
    assert not enabled_by_env(1) and not enabled_by_env(2)


def test_a_decode_step_through_the_pieces_gives_the_whole_forwards_logits_and_cache(engine):
    """Decode steps above the decode graphs' buckets go through the pieces (runner.forward): one new token per
    sequence, the paged decode attention between the pieces, padded to the bucket."""
    from lorax_server.engine.runner import BlockTables, pack_decode

    engine.clear()
    seqs = sequences(engine, [(30, 29), (25, 24), (61, 60), (12, 11), (40, 39)])
    batch = pack_decode(seqs, engine.cache, "cpu", BlockTables())
    before = [(k.clone(), v.clone()) for k, v in engine.cache.layers]
    whole, _ = engine.model(**batch.model_inputs(engine.cache.layers))
    after_whole = [(k.clone(), v.clone()) for k, v in engine.cache.layers]
    for (k, v), (k0, v0) in zip(engine.cache.layers, before):
        k.copy_(k0)
        v.copy_(v0)
    graphs = StepGraphs(engine.model, engine.cache.layers, capture=False, buckets=(8, 16))
    pieces = graphs.run(batch)
    assert list(graphs.steps) == [8] and pieces.shape == whole.shape
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-4)
    for (k1, v1), (k2, v2) in zip(after_whole, engine.cache.layers):
        torch.testing.assert_close(k2, k1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-5)
    engine.clear()
