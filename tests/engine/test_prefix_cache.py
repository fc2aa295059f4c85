"""Prefix caching in the engine, on the embedded tiny Mixtral (fp32, CPU), driven as LoRAX's router drives it with
`--prefix-caching`: the router hands each request its blocks, the first ones shared with an earlier request of the
same prompt prefix, and `cache_len`, the prompt tokens those blocks already hold (router/src/radix.rs:82-178,
scheduler.rs:369-418). The shard prefills only the rest; the output is the one of a full prefill."""

import math
from typing import Dict, List, Optional

import pytest
import torch

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.engine.cache import PagedKVCache
from lorax_server.engine.runner import PLAIN_WARM_UP
from lorax_server.models import get_model
from lorax_server.utils.tokens import SamplingParams

BS = 16
SHARED = [(7 * i + 3) % 2000 + 5 for i in range(40)]  # 40 prompt tokens two requests share: 2 full blocks of 16


@pytest.fixture(scope="module")
def engine():
    return get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=4 << 20)


@pytest.fixture(autouse=True)
def empty_cache(engine):
    engine.clear()
    engine.max_prefill_tokens = None
    yield
    engine.clear()
    assert engine.cache.all_free and not engine.batches


def tail(seed: int, n: int) -> List[int]:
    return [(seed * 31 + 17 * i) % 2000 + 5 for i in range(n)]


def request(engine, rid: int, ids: List[int], new: int = 8, cache_len: int = 0, chunk_len: Optional[int] = None,
            prefill_logprobs: bool = False):
    return engine.new_request(rid, ids, SamplingParams(), new, ignore_eos=True, prefill_logprobs=prefill_logprobs,
                              cache_len=cache_len, chunk_len=chunk_len)


def blocks_for(engine, ids: List[int], new: int, first: int, reuse: List[int] = ()) -> List[int]:
    """Router-style blocks: `reuse` (a cached prefix's blocks), then fresh ones numbered from `first`."""
    needed = engine.cache.blocks_for(len(ids) + new - 1)
    return list(reuse) + list(range(first, first + needed - len(reuse)))


class Outputs:
    """Every result of a run, per request: tokens, logprobs, prompt logprobs, and the steps that produced them."""

    def __init__(self):
        self.tokens: Dict[int, List[int]] = {}
        self.logprobs: Dict[int, List[float]] = {}
        self.prompt: Dict[int, List[float]] = {}
        self.steps: List[List[int]] = []  # the request ids with a result at each step

    def add(self, results):
        self.steps.append([r.request_id for r in results])
        for r in results:
            assert r.error is None, r.error
            self.tokens.setdefault(r.request_id, []).append(r.token.id)
            self.logprobs.setdefault(r.request_id, []).append(r.token.logprob)
            if r.prompt_tokens is not None:
                self.prompt[r.request_id] = [t.logprob for t in r.prompt_tokens]


def run(engine, batch_id: int, requests, blocks: Dict[int, List[int]], out: Optional[Outputs] = None,
        steps: Optional[int] = None) -> Outputs:
    """Prefill, then decode until every request ends (or `steps` decode steps)."""
    out = out or Outputs()
    results, batch = engine.prefill(batch_id, requests, blocks)
    out.add(results)
    while batch is not None and (steps is None or steps > 0):
        results, batch = engine.decode([batch.id])
        out.add(results)
        steps = None if steps is None else steps - 1
    return out


def assert_same(got: Outputs, want: Outputs, rid: int, want_rid: Optional[int] = None):
    want_rid = rid if want_rid is None else want_rid
    assert got.tokens[rid] == want.tokens[want_rid]
    assert got.logprobs[rid] == pytest.approx(want.logprobs[want_rid], abs=1e-4)


def forward_counts(engine, monkeypatch) -> List[List[int]]:
    """Records the new-token counts of every prefill forward pass of the engine's runner."""
    seen, forward = [], engine.runner.forward

    def spy(seqs, counts, prefill, **kwargs):
        if prefill:
            seen.append(list(counts))
        return forward(seqs, counts, prefill, **kwargs)

    monkeypatch.setattr(engine.runner, "forward", spy)
    return seen


def full_prefill(engine, ids: List[int], new: int = 8, prefill_logprobs: bool = False) -> Outputs:
    out = run(engine, 900, [request(engine, 9, ids, new, prefill_logprobs=prefill_logprobs)],
              {9: blocks_for(engine, ids, new, 100)})
    engine.clear()
    return out


def test_a_prefix_hit_prefills_only_the_rest_and_gives_the_full_prefills_output(engine, monkeypatch):
    """The second request names the first one's two full prefix blocks and cache_len 32, while the first is still
    decoding (the blocks are shared by both) and again after it finished (the blocks were given back, and the
    router's trie still holds them): its forward pass runs only its 8 uncached prompt tokens, and its greedy
    tokens and logprobs are those of a full prefill."""
    a_ids, b_ids = SHARED + tail(1, 5), SHARED[:32] + tail(2, 8)
    want = full_prefill(engine, b_ids)
    a_blocks = blocks_for(engine, a_ids, 8, 10)
    counts = forward_counts(engine, monkeypatch)

    live = run(engine, 1, [request(engine, 1, a_ids)], {1: a_blocks}, steps=2)  # A keeps decoding
    b = request(engine, 2, b_ids, cache_len=32)
    got = run(engine, 2, [b], {2: blocks_for(engine, b_ids, 8, 30, reuse=a_blocks[:2])})
    assert counts == [[45], [8]]  # A's prefill, then B's: its 8 uncached tokens
    assert_same(got, want, 2, 9)
    assert [engine.cache.refs[b] for b in a_blocks[:2]] == [1, 1]  # B left; A still holds its blocks
    assert engine.batches and live.tokens[1]
    engine.clear()

    again = run(engine, 3, [request(engine, 3, b_ids, cache_len=32)],
                {3: blocks_for(engine, b_ids, 8, 50, reuse=a_blocks[:2])})
    assert counts[-1] == [8]
    assert_same(again, want, 3, 9)


def test_shared_blocks_go_back_only_when_the_last_holder_leaves(engine):
    """Blocks held by two live requests stay out of the free list until both have left; a block outside the
    cached prefix that another request holds is refused (that request alone ends, with the reason)."""
    ids = SHARED + tail(3, 4)
    first = blocks_for(engine, ids, 4, 10)
    run(engine, 1, [request(engine, 1, ids, new=4)], {1: first}, steps=0)
    second = blocks_for(engine, ids, 4, 30, reuse=first[:2])
    run(engine, 2, [request(engine, 2, ids, new=4, cache_len=32)], {2: second}, steps=0)
    assert [engine.cache.refs[b] for b in first[:2]] == [2, 2]
    engine.filter(1, [])
    assert [engine.cache.refs[b] for b in first[:2]] == [1, 1]
    assert not set(first[:2]) & set(engine.cache.free_blocks) and set(first[2:]) <= set(engine.cache.free_blocks)

    clash = request(engine, 3, ids, new=4, cache_len=16)  # only its first block may be shared
    results, batch = engine.prefill(3, [clash], {3: first[:1] + second[1:2] + [70, 71]})
    assert batch is None and results[0].finish_reason == "error" and "in use" in results[0].error
    assert [engine.cache.refs[b] for b in first[:2]] == [1, 1]  # the refused request gave its claim back
    engine.filter(2, [])
    assert engine.cache.all_free


def test_a_prefix_its_blocks_do_not_hold_is_prefilled_again(engine, monkeypatch):
    """The router's trie takes a request's prompt blocks as cached when it frees them, even when the shard never
    wrote them (a request refused before its prefill). The shard prefills from the first block that does not
    hold the prefix's tokens, and the output is still the full prefill's."""
    ids = SHARED[:32] + tail(4, 6)
    want = full_prefill(engine, ids)
    counts = forward_counts(engine, monkeypatch)

    never_written = run(engine, 1, [request(engine, 1, ids, cache_len=32)], {1: blocks_for(engine, ids, 8, 40)})
    assert counts[0] == [38] and never_written.tokens[1] == want.tokens[9]

    other = SHARED[:16] + tail(5, 20)  # its second block holds other tokens
    run(engine, 2, [request(engine, 2, other, new=2)], {2: blocks_for(engine, other, 2, 60)})
    half = run(engine, 3, [request(engine, 3, ids, cache_len=32)], {3: blocks_for(engine, ids, 8, 80, [60, 61])})
    assert counts[-1] == [22]  # its first block holds the prefix, its second does not
    assert_same(half, want, 3, 9)


def test_a_stale_prefix_in_blocks_a_live_request_reads_is_refused_not_overwritten(engine):
    """Blocks named as a cached prefix that hold other tokens, while another live request reads them: prefilling
    the new request there would corrupt the live one's K/V, so the new request alone is refused, and the live
    request's tokens are those it makes alone."""
    other = SHARED[:16] + tail(11, 20)
    want = full_prefill(engine, other, new=4)
    live = blocks_for(engine, other, 4, 10)
    out = Outputs()
    results, batch = engine.prefill(1, [request(engine, 1, other, new=4)], {1: live})
    out.add(results)
    ids = SHARED[:32] + tail(12, 6)  # its first block matches the live request's, its second does not
    results, _ = engine.prefill(2, [request(engine, 2, ids, cache_len=32)], {2: blocks_for(engine, ids, 8, 40, live[:2])})
    assert results[0].finish_reason == "error" and "another live request holds them" in results[0].error
    assert [engine.cache.refs[b] for b in live[:2]] == [1, 1]  # the refused request gave its claim back
    while batch is not None:
        results, batch = engine.decode([batch.id])
        out.add(results)
    assert_same(out, want, 1, 9)


def test_a_whole_prompt_in_the_cache_still_prefills_its_last_token(engine, monkeypatch):
    """A prompt found whole in the trie comes with cache_len = its length - 1 (scheduler.rs:409-414): the shard
    rewrites the last token's K/V (the same values) into the shared block and chooses the same first token."""
    ids = SHARED[:32]
    want = full_prefill(engine, ids)
    first = blocks_for(engine, ids, 8, 10)
    run(engine, 1, [request(engine, 1, ids)], {1: first}, steps=1)
    counts = forward_counts(engine, monkeypatch)
    got = run(engine, 2, [request(engine, 2, ids, cache_len=31)], {2: blocks_for(engine, ids, 8, 40, first[:2])})
    assert counts[0] == [1]
    assert_same(got, want, 2, 9)


def test_prompt_logprobs_after_a_prefix_hit_are_nan_for_the_cached_tokens(engine):
    """As upstream (server/lorax_server/models/flash_causal_lm.py:1924-1926): the cached tokens (and the first
    one) have no logprob; the others are the full prefill's."""
    ids = SHARED[:32] + tail(6, 7)
    want = full_prefill(engine, ids, prefill_logprobs=True)
    first = blocks_for(engine, ids, 8, 10)
    run(engine, 1, [request(engine, 1, ids)], {1: first})
    got = run(engine, 2, [request(engine, 2, ids, cache_len=32, prefill_logprobs=True)],
              {2: blocks_for(engine, ids, 8, 40, first[:2])})
    assert len(got.prompt[2]) == len(ids)
    assert all(math.isnan(x) for x in got.prompt[2][:33])
    assert got.prompt[2][33:] == pytest.approx(want.prompt[9][33:], abs=1e-4)
    assert_same(got, want, 2, 9)


def test_block_contents_follow_the_writes():
    """The cache's record of what each block holds: full blocks only, forgotten when a block is written again or
    handed out afresh, never for a reserved block."""
    from lorax_server.engine.cache import PagedSequence

    cache = PagedKVCache(1, 8, 4, 1, 2, torch.float32, "cpu", reserved=(0,))
    seq = PagedSequence(list(range(10, 21)), blocks=cache.allocate(3))
    cache.record(seq, 11)
    assert len(cache.contents) == 2  # two full blocks of 4 tokens, not the partial third
    twin = PagedSequence(list(range(10, 18)) + [99], blocks=list(seq.blocks[:2]))
    assert cache.cached_prefix(twin, 8) == 8 and cache.cached_prefix(twin, 7) == 7
    assert cache.cached_prefix(PagedSequence(twin.tokens, adapter_index=1, blocks=twin.blocks), 8) == 0
    cache.forget(seq.blocks[1:2])
    assert cache.cached_prefix(twin, 8) == 4
    cache.free(seq.blocks)
    assert cache.cached_prefix(twin, 4) == 4  # given back, the block still holds its tokens
    cache.allocate(cache.num_blocks - 1)
    assert cache.cached_prefix(twin, 4) == 0  # handed out again: no longer


def test_recording_chunk_by_chunk_hashes_each_block_once_and_records_what_one_call_would():
    """A prompt prefilled in chunks is recorded after every chunk: the blocks hashed before are not hashed again
    (a 16k-token prompt rehashed 1024 blocks a step), and the record is the one a single call makes."""
    from lorax_server.engine import cache as cache_module
    from lorax_server.engine.cache import PagedSequence

    tokens = list(range(10, 60))
    one = PagedKVCache(1, 16, 4, 1, 2, torch.float32, "cpu")
    seq = PagedSequence(list(tokens), blocks=one.allocate(13))
    one.record(seq, 50)
    chunked = PagedKVCache(1, 16, 4, 1, 2, torch.float32, "cpu")
    seq = PagedSequence(list(tokens), blocks=list(seq.blocks))
    chunked.allocate(13)
    hashed = []
    real = cache_module.block_hashes

    def counting(tokens, adapter_index, block_size, num_blocks, known=()):
        hashed.append(num_blocks - len(known))
        return real(tokens, adapter_index, block_size, num_blocks, known)
    cache_module.block_hashes = counting
    try:
        for upto in (9, 9, 22, 37, 50):
            chunked.record(seq, upto)
    finally:
        cache_module.block_hashes = real
    assert chunked.contents == one.contents and len(one.contents) == 12
    assert sum(hashed) == 12  # each full block once


def test_kernel_warm_up_runs_every_prefill_tile_once_and_gives_the_blocks_back(engine, monkeypatch):
    """Warmup compiles the prefill kernels of short prompts and cached prefixes, up to the router's prefill
    budget (on a GPU the first such request would otherwise stall its batch on a Triton compile); it runs once
    per engine, since it writes free blocks a cached prefix may later be recorded in, and the output after it
    is the output before it."""
    ids = SHARED + tail(1, 9)
    before = run(engine, 1, [request(engine, 1, ids)], {1: blocks_for(engine, ids, 8, 1)}).tokens[1]
    engine.clear()
    engine.cache.contents.clear()  # as at start-up: no prefix cached yet
    runs = []
    forward = engine.runner.forward

    def spy(seqs, counts, prefill, **kw):
        runs.append(tuple((s.cached, n) for s, n in zip(seqs, counts)))
        return forward(seqs, counts, prefill, **kw)

    monkeypatch.setattr(engine.runner, "forward", spy)
    monkeypatch.setattr(engine, "kernels_warm", False)
    room = min(len(engine.cache.free_blocks) * engine.cache.block_size, engine.config.max_position_embeddings)
    engine.warm_up_kernels(max_prefill_tokens=256)
    prefixes = [p for p in (512, 1024) if p + 128 <= room]
    assert prefixes, "the test engine's cache holds a 512-token prefix"
    alone = [run[0] for run in runs if len(run) == 1]
    assert sorted({n for n in PLAIN_WARM_UP if n <= 256} | set(prefixes)) == [n for cached, n in alone if cached == 0]
    # new tokens on each prefix at every row tile; 128 rows on 512 cached: the long-prefix tile; on 1024: split-KV
    assert [(p, n) for p in prefixes for n in (16, 32, 64, 128)] == [r for r in alone if r[0] > 0]
    # then a 128-token chunk beside a decode-sized run (the attention's short-row launch), where two fit
    beside = [run for run in runs if len(run) == 2]
    fits = len(engine.cache.free_blocks) >= 2 * engine.cache.blocks_for(max(prefixes) + 128)
    assert beside == ([((p, 128), (p, n)) for p in prefixes for n in (1, 8, 16)] if fits else [])
    assert engine.cache.all_free and not engine.cache.contents and engine.kernels_warm
    runs.clear()
    engine.warm_up_kernels()  # a second Warmup: nothing to compile, and nothing written
    assert runs == []
    assert run(engine, 2, [request(engine, 2, ids)], {2: blocks_for(engine, ids, 8, 1)}).tokens[2] == before


def test_a_failed_kernel_warm_up_is_logged_and_the_server_goes_on(engine, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "kernels_warm", False)
    with monkeypatch.context() as patch:
        patch.setattr(engine.runner, "forward", fail)
        engine.warm_up_kernels()
    assert "kernel warm-up failed" in caplog.text and engine.kernels_warm
    assert engine.cache.all_free
    engine.prefill(3, [request(engine, 3, SHARED)], {3: blocks_for(engine, SHARED, 8, 1)})
    monkeypatch.setattr(engine, "kernels_warm", False)
    with pytest.raises(Exception, match="no batch alive"):
        engine.warm_up_kernels()
