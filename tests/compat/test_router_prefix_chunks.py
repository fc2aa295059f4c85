"""LoRAX router compatibility with `--prefix-caching` and `--chunked-prefill`: the shard is started as the launcher
starts it with both flags (launcher/src/main.rs:843-852 set PREFIX_CACHING=1 and CHUNKED_PREFILL=1 in its
environment; :1563-1565 pass --prefix-caching to the router), and the router emulation runs its radix allocator
(router/src/radix.rs) and chunks prompts longer than its prefill budget (scheduler.rs:420-456, infer.rs:1101-1212).
max_batch_prefill_tokens is lowered to 48 (a router option, launcher/src/main.rs:473) so that chunking happens on
prompts of a hundred tokens; the shard reports chunked_prefill, so the router allows max_input_length above it
(router/src/main.rs:429-433)."""

from __future__ import annotations

import pytest

from tests.compat.conftest import (
    describe_failure, launch_shard, records_since, req, rpc_errors, start_router, wait_for,
)
from tests.compat.test_router_cache_pressure import prompt_of_length

MAX_PREFILL = 48


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    yield from launch_shard(tmp_path_factory, "prefix", prefix_caching=True, chunked_prefill=True)


@pytest.fixture(scope="module")
def router(shard):
    r = start_router(shard, prefix_caching=True, max_batch_prefill_tokens=MAX_PREFILL)
    yield r
    r.close()


def prefill_requests(router, mark):
    return [r for rec in records_since(router, mark, "Prefill") for r in rec.request.batch.requests]


def test_info_and_startup(router):
    info = router.shard_info
    assert info.chunked_prefill and info.requires_block_allocator
    assert type(router.block_allocator).__name__ == "RadixAllocator"
    assert router.startup_response is not None and router.startup_response.text != ""


def test_a_shared_prefix_is_served_from_the_cache_with_the_same_output(shard, router):
    """A request's prompt blocks enter the router's trie when it finishes (radix.rs:197-235); the next request
    with the same 32-token prefix gets those blocks and cache_len 32, and the same prompt again gets cache_len =
    its length - 1 when its length is whole blocks (scheduler.rs:409-414). Each output equals the output of the
    same request with decoder_input_details, which the router never serves from the cache (scheduler.rs:370-376)."""
    tok = router.tokenizer
    prefix = prompt_of_length(tok, 32)
    first, second = prefix + " The first question", prefix + " A second one, longer than the first"
    mark = len(router.log.snapshot())
    outputs = {p: router.generate(req(p, max_new_tokens=12, ignore_eos_token=True)) for p in (first, second, first)}
    sent = prefill_requests(router, mark)
    assert [r.cache_len for r in sent][1:] == [32, 32], sent
    whole = prompt_of_length(tok, 48)
    router.generate(req(whole, max_new_tokens=4, ignore_eos_token=True))
    again = router.generate(req(whole, max_new_tokens=4, ignore_eos_token=True))
    assert prefill_requests(router, mark)[-1].cache_len == 47
    for prompt, got in list(outputs.items()) + [(whole, again)]:
        uncached = router.generate(req(prompt, max_new_tokens=len(got.token_ids), ignore_eos_token=True,
                                       decoder_input_details=True))
        assert prefill_requests(router, mark)[-1].cache_len == 0
        assert got.token_ids == uncached.token_ids, describe_failure(router, shard)
    assert not rpc_errors(router, mark), rpc_errors(router, mark)


def test_a_long_prompt_is_prefilled_in_chunks_alongside_running_decodes(shard, router):
    """Two short requests are decoding when a 130-token prompt arrives: the router sends it with chunk_len (its
    prefill budget less the running batch's current_tokens) in a Prefill whose cached_batch is the running batch;
    the shard runs the rest over the next steps. Every output, and the long prompt's logprobs, equal the same
    request alone."""
    tok = router.tokenizer
    short = [req(prompt_of_length(tok, n), max_new_tokens=30, ignore_eos_token=True) for n in (7, 11)]
    # decoder_input_details: never from the prefix cache (scheduler.rs:370-376), so it is chunked every time
    long = req(prompt_of_length(tok, 130), max_new_tokens=10, ignore_eos_token=True, decoder_input_details=True)
    alone = [router.generate(r) for r in short + [long]]
    mark = len(router.log.snapshot())
    handles = router.submit_all(short)
    wait_for(lambda: len(records_since(router, mark, "Decode")) >= 3, what="the short requests decoding", router=router)
    handles.append(router.submit(long))
    results = [h.result(timeout=120) for h in handles]
    for got, want in zip(results, alone):
        assert got.token_ids == want.token_ids, describe_failure(router, shard)
    got_prompt, want_prompt = results[-1].prefill, alone[-1].prefill
    assert [t[0] for t in got_prompt] == [t[0] for t in want_prompt] and len(got_prompt) == 130
    assert [t[2] for t in got_prompt[1:]] == pytest.approx([t[2] for t in want_prompt[1:]], abs=1e-4)
    prefills = records_since(router, mark, "Prefill")
    chunked = [rec for rec in prefills if any(r.HasField("chunk_len") for r in rec.request.batch.requests)]
    assert chunked and chunked[0].request.HasField("cached_batch"), [rec.request for rec in prefills]
    assert not rpc_errors(router, mark), rpc_errors(router, mark)
