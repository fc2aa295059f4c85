"""Chunked prefill in the engine, on the embedded tiny Mixtral (fp32, CPU), as LoRAX's router drives it with
Info.chunked_prefill: a request's first Prefill carries `chunk_len`; the shard runs the rest of the prompt in the
batch's following steps (Decode, or Prefill with `cached_batch`), each chunk sized from Warmup's
max_prefill_tokens as upstream's shard sizes it (server/lorax_server/models/flash_causal_lm.py:1648-1675), the
batch's other requests decoding in the same steps. The output equals a one-piece prefill."""

import pytest

from tests.engine.test_prefix_cache import (
    SHARED, Outputs, assert_same, blocks_for, forward_counts, full_prefill, request, run, tail,
)
from tests.engine.test_prefix_cache import empty_cache, engine  # noqa: F401 (fixtures)

LONG = tail(7, 100)
SHORT = {1: tail(8, 6), 2: tail(9, 11)}  # two requests decoding when a longer prompt arrives


def two_decoding(engine, out: Outputs):
    """SHORT prefilled (12 new tokens each) and decoded once, their results in `out`: the running batch."""
    results, running = engine.prefill(1, [request(engine, i, ids, new=12) for i, ids in SHORT.items()],
                                      {i: blocks_for(engine, ids, 12, 10 * i) for i, ids in SHORT.items()})
    out.add(results)
    results, running = engine.decode([running.id])
    out.add(results)
    return running


def test_a_long_prompt_prefilled_in_chunks_equals_one_piece(engine, monkeypatch):
    """chunk_len 24, then chunks of max_prefill_tokens (24) over the following Decode calls; no result until the
    prompt is complete, then the one-piece prefill's tokens and logprobs, prompt logprobs included."""
    want = full_prefill(engine, LONG, prefill_logprobs=True)
    engine.max_prefill_tokens = 24
    counts = forward_counts(engine, monkeypatch)
    got = run(engine, 1, [request(engine, 1, LONG, chunk_len=24, prefill_logprobs=True)],
              {1: blocks_for(engine, LONG, 8, 10)})
    assert counts[:5] == [[24], [24], [24], [24], [4]]
    assert got.steps[:4] == [[], [], [], []] and got.steps[4] == [1]
    assert_same(got, want, 1, 9)
    assert got.prompt[1][1:] == pytest.approx(want.prompt[9][1:], abs=1e-4)


@pytest.mark.parametrize("ahead", [True, False], ids=["decode-ahead", "in-turn"])
def test_chunks_run_alongside_running_decodes(engine, monkeypatch, ahead):
    """A batch of two requests is decoding when a Prefill brings a 100-token prompt with chunk_len 20 and the
    running batch as cached_batch: every step from then on gives the two running requests a token each (their
    decodes are never held up for more than one chunk), the long one gets none until its prompt is complete, and
    every output equals the request's output alone. Each step is ONE forward pass over the chunk and the two
    decode tokens."""
    monkeypatch.setattr(engine, "decode_ahead", ahead)
    alone = {i: full_prefill(engine, ids, new=12) for i, ids in SHORT.items()}
    want = full_prefill(engine, LONG)
    engine.max_prefill_tokens = 24
    counts = forward_counts(engine, monkeypatch)

    out = Outputs()
    running = two_decoding(engine, out)
    long = request(engine, 3, LONG, chunk_len=20)
    results, batch = engine.prefill(2, [long], {3: blocks_for(engine, LONG, 8, 40)}, cached_batch_id=running.id)
    out.add(results)
    assert batch.id == running.id and [r.id for r in batch.requests] == [1, 2, 3]
    while batch is not None:
        results, batch = engine.decode([batch.id])
        out.add(results)

    # One forward pass for the decodes and each chunk, the running requests first, as they are in the batch.
    # With steps launched ahead, the Prefill found the running requests' next token in flight already: it
    # returns those and the chunks start at the next call, in its pass (a chunk alone would be a pass of its
    # own); no step is launched ahead while a request still prefills (that would make every step two passes).
    assert counts[1:] == [[1, 1, 20], [1, 1, 22], [1, 1, 22], [1, 1, 22], [1, 1, 14]]
    chunk_calls = 5 if ahead else 4  # calls that give the running requests a token while the long one prefills
    assert out.steps[2:2 + chunk_calls] == [[1, 2]] * chunk_calls and out.steps[2 + chunk_calls] == [1, 2, 3]
    for i in SHORT:
        assert_same(out, alone[i], i, 9)
    assert_same(out, want, 3, 9)


def test_back_to_back_prefills_with_a_deferred_chunk_take_one_budget_a_pass(engine, monkeypatch):
    """The router's eager prefill keeps one prefill budget for back-to-back Prefills with cached_batch. With steps
    launched ahead the first Prefill's prompt waits for the next pass (its running requests already have their
    token), so the second Prefill's pass would run both prompts: it is planned to one budget instead (the newest
    request first, the other continuing in the next step), and every output equals the request's alone."""
    monkeypatch.setattr(engine, "decode_ahead", True)
    a_ids, b_ids = tail(11, 20), tail(12, 20)
    want = {i: full_prefill(engine, ids, new=12 if i < 3 else 4) for i, ids in [*SHORT.items(), (3, a_ids), (4, b_ids)]}
    engine.max_prefill_tokens = 24
    counts = forward_counts(engine, monkeypatch)
    out = Outputs()
    running = two_decoding(engine, out)
    for rid, ids, first in ((3, a_ids, 40), (4, b_ids, 60)):  # each within the router's budget: 24 - 2 decodes
        results, running = engine.prefill(rid, [request(engine, rid, ids, new=4)],
                                          {rid: blocks_for(engine, ids, 4, first)}, cached_batch_id=running.id)
        out.add(results)
    while running is not None:
        results, running = engine.decode([running.id])
        out.add(results)
    assert max(sum(c) for c in counts[1:]) <= 24, counts
    for rid, alone in want.items():
        assert_same(out, alone, rid, 9)


def test_a_chunked_prompt_after_a_prefix_hit(engine, monkeypatch):
    """cache_len and chunk_len together (the router sends both, scheduler.rs:420-442): the chunks start after
    the cached prefix."""
    ids = SHARED[:32] + tail(10, 50)
    want = full_prefill(engine, ids)
    first = blocks_for(engine, ids, 8, 10)
    run(engine, 1, [request(engine, 1, ids)], {1: first})
    engine.max_prefill_tokens = 30
    counts = forward_counts(engine, monkeypatch)
    got = run(engine, 2, [request(engine, 2, ids, cache_len=32, chunk_len=10)],
              {2: blocks_for(engine, ids, 8, 40, first[:2])})
    assert counts[:3] == [[10], [30], [10]]
    assert_same(got, want, 2, 9)


def test_a_request_filtered_out_mid_prefill_gives_its_blocks_back(engine):
    engine.max_prefill_tokens = 16
    _, batch = engine.prefill(1, [request(engine, 1, LONG, chunk_len=16), request(engine, 2, tail(11, 5))],
                              {1: blocks_for(engine, LONG, 8, 10), 2: blocks_for(engine, tail(11, 5), 8, 30)})
    assert [r.id for r in batch.requests] == [1, 2] and batch.requests[0].prefilling
    assert batch.next_step_tokens == 15 + 1  # its next chunk (16 less one for the other request) and one token
    engine.filter(batch.id, [2])
    results, batch = engine.decode([batch.id])
    assert [r.request_id for r in results] == [2]
    engine.clear()
    assert engine.cache.all_free
