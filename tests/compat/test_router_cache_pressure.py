"""LoRAX router compatibility, scenario (d) cache pressure at the router's own budget, and a preloaded adapter.

The shard is started with the launcher's command line plus `--preloaded-adapter-ids <zen dir>` (a launcher option,
launcher/src/main.rs:769-774, which also sets ADAPTER_MEMORY_FRACTION=0, :833-841) and `--kv-cache-mib 5`, which
is NOT a launcher option: it is this project's way to make the CPU cache small enough that the router's budget
(Warmup's max_supported_total_tokens) can be filled by a test in a few seconds. Nothing else differs."""

from __future__ import annotations

import pytest

from tests.compat.conftest import ZEN, describe_failure, launch_shard, req, rpc_errors, start_router, wait_for
from tests.compat.router import InferError

# NOT a launcher option (see the module docstring); cache-pressure module only. The router's Warmup batch with the
# defaults needs ceil((1023 + 1 - 1) / 16) + ceil((50 + 974 - 1) / 16) = 128 blocks (client.rs:117-173; upstream
# flash_causal_lm.py from_pb sizes a request's blocks by input + max_new_tokens - 1), plus block 0: 3 MiB (96 blocks
# of fp32 KV for this model) fails Warmup, 5 MiB (160 blocks) holds it.
KV_CACHE_MIB = 5


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    yield from launch_shard(tmp_path_factory, "pressure", preloaded_adapter_ids=[ZEN],
                            extra_args=["--kv-cache-mib", str(KV_CACHE_MIB)])


@pytest.fixture(scope="module")
def router(shard):
    r = start_router(shard)
    yield r
    r.close()


def prompt_of_length(tokenizer, n: int) -> str:
    """A prompt of exactly n tokens (BOS included, as the router counts them: validation.rs:128)."""
    words = ["The", "for", "statement", "is", "executed", "once", "for", "each", "item"]
    text = ""
    i = 0
    while len(tokenizer.encode(text + " " + words[i % len(words)]).ids) <= n:
        text = (text + " " + words[i % len(words)]).strip()
        i += 1
    assert len(tokenizer.encode(text).ids) == n, (text, tokenizer.encode(text).ids)
    return text


def test_d_cache_pressure_at_the_routers_budget(shard, router):
    """Requests whose total reaches max_batch_total_tokens (= Warmup's max_supported_total_tokens, main.rs:405-430)
    are all admitted in ONE batch by the router's own accounting and must all finish:
    * with block allocation (!requires_padding && requires_block_allocator, scheduler.rs:229) the router hands out
      max_batch_total_tokens / block_size blocks minus block 0 (block_allocator.rs:45, :156-157), each request
      taking ceil((input + max_new_tokens - 1) / block_size) blocks (scheduler.rs:378-381): the requests below use
      every block;
    * otherwise it counts n * longest input + sum(max_new_tokens) (scheduler.rs:348-368) against the budget left by
      the running batch's CachedBatch.max_tokens (infer.rs:1100), with no rounding to blocks: the requests below
      keep input + max_new_tokens - 1 = 1 (mod block_size) tokens of KV, so the shard's Warmup answer and its
      CachedBatch.max_tokens must absorb its rounding to blocks.
    Three more requests wait for room and are admitted as the first ones finish."""
    info = router.shard_info
    total = router.max_batch_total_tokens
    bs = info.block_size
    input_len = 17
    prompt = prompt_of_length(router.tokenizer, input_len)
    if router.block_allocator is not None:
        free_blocks = total // bs - 1
        per_request_blocks = 5
        max_new = per_request_blocks * bs + 1 - input_len  # input + max_new - 1 = 5 blocks exactly
        n = free_blocks // per_request_blocks
        accounted = n * per_request_blocks * bs
    else:
        max_new = 6 * bs + 2 - input_len  # the KV of input + max_new - 1 tokens: 6 blocks + 1 token
        n = total // (input_len + max_new)
        accounted = n * (input_len + max_new)
    assert 2 <= n <= 64, f"max_batch_total_tokens {total} does not fit this scenario (n={n}): --kv-cache-mib?"
    assert n * input_len <= router.args.max_batch_prefill_tokens
    mark = len(router.log.snapshot())
    first_batch = len(router.batches_formed)
    requests = [req(prompt, None, max_new, ignore_eos_token=True) for _ in range(n + 3)]
    handles = router.submit_all(requests)
    failures = []
    for i, h in enumerate(handles):
        try:
            res = h.result(120)
            assert res.generated_text.generated_tokens == max_new, res.generated_text
        except (InferError, TimeoutError) as e:
            failures.append(f"request {i}: {e}")
    assert not failures, (f"{len(failures)}/{len(handles)} failed at {accounted}/{total} accounted tokens:\n"
                          + "\n".join(failures[:5]) + f"\n{describe_failure(router, shard)}")
    assert router.batches_formed[first_batch].size == n, "the router did not admit n requests at once (scenario)"
    assert not rpc_errors(router, mark), rpc_errors(router, mark)
    print(f"cache pressure: {n} + 3 requests of {input_len} + {max_new} tokens, {accounted}/{total} tokens "
          f"accounted ({'router block allocation' if router.block_allocator else 'CachedBatch.max_tokens'})")


def test_preloaded_adapter(shard, router):
    """A preloaded adapter (--preloaded-adapter-ids) is announced in Info.preloaded_adapters and seeds the router's
    adapter index map (infer.rs:222-233); on first use the router still sends DownloadAdapter, which upstream answers
    downloaded=true with its memory fraction (server.py:186-197); a cost above the router's memory budget would
    keep it from ever loading (queue.rs:423-428); then LoadAdapter with the preloaded index."""
    pre = [p for p in router.shard_info.preloaded_adapters if list(p.adapter_parameters.adapter_ids) == [ZEN]]
    assert pre, f"Info.preloaded_adapters: {list(router.shard_info.preloaded_adapters)}"
    index = pre[0].adapter_index
    assert index >= 1  # 0 is the base model (infer.rs:213-220)
    mark = len(router.log.snapshot())
    handles = router.submit_all([req("Beautiful is", ZEN, 20), req("Beautiful is", None, 20)])

    def zen_downloads():
        return [r for r in router.log.of("DownloadAdapter")
                if list(r.request.adapter_parameters.adapter_ids) == [ZEN] and r.t_end is not None]

    wait_for(lambda: zen_downloads(), 30, "DownloadAdapter of the preloaded adapter", router)
    download = zen_downloads()[0]
    assert download.error is None, download.error
    assert download.response.downloaded, download.response
    # queue.rs:418-428: the cost (memory_fraction) must fit the router's budget of 1.0, else the adapter is never
    # loaded, its requests wait forever, and every adapter queued behind it in `pending_adapters` waits too
    assert 0.0 <= download.response.memory_fraction <= 1.0, (
        f"DownloadAdapter answered memory_fraction={download.response.memory_fraction}; the router will never load "
        f"it: {router.describe()}")
    zen, base = [h.result(30) for h in handles]
    assert zen.adapter_index == index
    assert len(router.log.of("DownloadAdapter")) == len(set(
        tuple(r.request.adapter_parameters.adapter_ids) for r in router.log.of("DownloadAdapter")))  # once each
    loads = [r for r in router.log.of("LoadAdapter") if list(r.request.adapter_parameters.adapter_ids) == [ZEN]]
    assert loads and loads[0].request.adapter_index == index
    assert zen.token_ids != base.token_ids, "the preloaded adapter does not change the output"
    assert not rpc_errors(router, mark), rpc_errors(router, mark)
