"""LoRAX router compatibility, scenarios (a), (b), (e), (f), (g): one shard started with the launcher's exact
command line and environment (launcher/src/main.rs:719-835), driven by the router emulation with the router's
defaults (tests/compat/router.py). Every expectation is upstream-visible behaviour of predibase/lorax @ a7394ba."""

from __future__ import annotations

import pytest

from lorax_server.pb import generate_pb2 as pb
from tests.compat.conftest import (
    SHOUT, ZEN, describe_failure, launch_shard, records_since, req, rpc_errors, start_router, wait_for,
)
from tests.compat.router import U64_MAX, GenerationError, InferError

P1, P2, P3, P4, P5 = "The for statement", "Beautiful is", "A list is", "Explicit is", "The import statement"


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    yield from launch_shard(tmp_path_factory, "compat")


@pytest.fixture(scope="module")
def router(shard):
    r = start_router(shard)
    yield r
    r.close()


def assert_same_as_alone(router, requests, results, shard):
    """Greedy decoding: a request's tokens must not depend on what it was batched with."""
    for request, got in zip(requests, results):
        alone = router.generate(request, timeout=60)
        assert got.token_ids == alone.token_ids, (
            f"{request.parameters.adapter_id or 'base'} {request.inputs!r}: in the mixed batch {got.text!r}, "
            f"alone {alone.text!r}\n{describe_failure(router, shard)}")


# ------------------------------------------------------------------------------------------------------------- (a)
def test_a_startup_with_warmup(shard, router):
    """router/src/main.rs:375-439: ServiceDiscovery -> ClearCache(None) -> Info -> Warmup (client.rs:107-193), the
    router exits unless Warmup succeeds and its answer holds max_total_tokens and max_batch_prefill_tokens; then the
    /startup probe's "Who?" generate with max_new_tokens 1 must give a non-empty text (server.rs:532-574)."""
    recs = router.log.snapshot()
    assert [r.method for r in recs[:4]] == ["ServiceDiscovery", "ClearCache", "Info", "Warmup"]
    assert shard.socket_path in [u.removeprefix("unix://") for u in recs[0].response.urls]  # client.rs:55-58
    assert not recs[1].request.HasField("id")  # main.rs:379-382 clear_cache(None)
    info = router.shard_info
    assert info.supports_generation and info.block_size > 0, info
    warmup = recs[3]
    a = router.args
    # The exact warmup batch: two requests, both id 0, truncates max_input_length then 50 (client.rs:117-173)
    assert [r.truncate for r in warmup.request.batch.requests] == [a.max_input_length,
                                                                   a.max_batch_prefill_tokens - a.max_input_length]
    assert warmup.request.max_new_tokens == a.max_total_tokens - a.max_input_length == 1
    # main.rs:397-403: without an answer the router would assume 16000 tokens, more than a CPU cache may hold
    assert router.max_supported_total_tokens is not None, "Warmup answered no max_supported_total_tokens"
    assert router.max_batch_total_tokens >= max(a.max_total_tokens, a.max_batch_prefill_tokens)
    assert router.startup_response is not None and router.startup_response.text != ""
    assert router.startup_response.generated_text.generated_tokens == 1
    assert not rpc_errors(router), rpc_errors(router)


# ------------------------------------------------------------------------------------------------------------- (b)
def test_b_mixed_adapter_traffic_over_time(shard, router):
    """Base model + both embedded adapters (local dirs, adapter source hub), arriving in two waves: new requests are
    prefilled as their own batch and concatenated into the running one with Decode([running, new]) (infer.rs:
    1142-1241); requests that finish are filtered out with FilterBatch (infer.rs:1447-1477). Every request finishes,
    and greedy outputs equal the same request run alone."""
    mark = len(router.log.snapshot())
    wave1 = [req(P1, None, 40), req(P2, ZEN, 30), req(P3, None, 20), req(P4, SHOUT, 30)]
    handles = router.submit_all(wave1)
    wait_for(lambda: len(records_since(router, mark, "Decode")) >= 4, 60, "decode steps of wave 1", router)
    wave2 = [req(P5, None, 12), req(P1, ZEN, 16), req(P3, SHOUT, 16), req(P4, None, 10)]
    handles += router.submit_all(wave2)
    requests = wave1 + wave2
    results = []
    for request, h in zip(requests, handles):
        try:
            results.append(h.result(120))
        except InferError as e:
            pytest.fail(f"{request.parameters.adapter_id or 'base'} {request.inputs!r} failed: {e}\n"
                        f"{describe_failure(router, shard)}")
    for request, res in zip(requests, results):
        assert res.generated_text.generated_tokens == len(res.tokens) <= request.parameters.max_new_tokens
    decodes = records_since(router, mark, "Decode")
    assert any(len(d.request.batches) >= 2 for d in decodes), "no Decode concatenated two batches (scenario)"
    assert records_since(router, mark, "FilterBatch"), "no FilterBatch was sent (scenario)"
    downloads = [tuple(d.request.adapter_parameters.adapter_ids) for d in router.log.of("DownloadAdapter")]
    assert downloads.count((ZEN,)) == 1 and downloads.count((SHOUT,)) == 1, downloads  # once, on first use
    # The adapters are applied per request: the same prompt differs across base / zen / shout
    by_key = {(r.inputs, r.parameters.adapter_id): res.token_ids for r, res in zip(requests, results)}
    assert by_key[(P1, None)] != by_key[(P1, ZEN)], "zen did not change the output of a mixed batch"
    assert by_key[(P3, None)] != by_key[(P3, SHOUT)], "shout did not change the output of a mixed batch"
    assert not rpc_errors(router, mark), rpc_errors(router, mark)
    assert_same_as_alone(router, requests, results, shard)


def test_b_missing_adapter_fails_only_its_requests(shard, router, tmp_path):
    """loader.rs:143-173: a DownloadAdapter error marks that adapter Errored; its queued requests get the error when
    the scheduler terminates it (scheduler.rs:549-560, loader.rs:273-298), and nothing else is affected."""
    missing = str(tmp_path / "no-such-adapter")  # not a directory, and not a valid hub repo id: fails offline
    mark = len(router.log.snapshot())
    handles = router.submit_all([req(P1, None, 24), req(P2, missing, 8), req(P3, None, 12)])
    with pytest.raises(GenerationError):
        handles[1].result(60)
    for h in (handles[0], handles[2]):
        h.result(60)
    downloads = [r for r in records_since(router, mark, "DownloadAdapter")
                 if list(r.request.adapter_parameters.adapter_ids) == [missing]]
    assert downloads and downloads[0].error is not None, "DownloadAdapter of a missing adapter did not fail"
    assert [r for r in records_since(router, mark) if r.error is not None] == downloads[:1], rpc_errors(router, mark)
    assert router.generate(req(P4, None, 4), timeout=60).generated_text.generated_tokens == 4
    assert router.aborted is None


# ------------------------------------------------------------------------------------------------------------- (e)
def test_e_liveness_probe_while_batches_are_live(shard, router):
    """health.rs:39-87: the liveness Prefill (batch and request id u64::MAX, tokenized_inputs [75], truncate 10,
    max_new_tokens 1, blocks [0], slots 0..block_size-1) skips the queue and may arrive while other batches are
    live; it must succeed and not disturb them. Then the plain Health RPC (health.rs:150-153)."""
    mark = len(router.log.snapshot())
    requests = [req(P1, None, 40), req(P2, ZEN, 40), req(P4, SHOUT, 40), req(P3, None, 40)]
    handles = router.submit_all(requests)
    wait_for(lambda: len(records_since(router, mark, "Decode")) >= 3, 60, "live decode steps", router)
    assert router.check_generation(), f"liveness Prefill failed: {rpc_errors(router, mark)}"
    probe = [r for r in records_since(router, mark, "Prefill") if r.request.batch.id == U64_MAX][-1]
    assert list(probe.request.batch.requests[0].blocks) == [0]
    assert list(probe.request.batch.requests[0].slots) == list(range(router.shard_info.block_size))
    assert router.health_check()
    results = [h.result(120) for h in handles]
    later = [d for d in records_since(router, mark, "Decode") if d.t > probe.t_end]
    assert later, "the requests had finished before the probe (scenario): make them longer"
    assert not rpc_errors(router, mark), rpc_errors(router, mark)
    assert_same_as_alone(router, requests, results, shard)


# ------------------------------------------------------------------------------------------------------------- (f)
def test_f_stop_sequence_ends_the_text(shard, router):
    """validation.rs:318-323 (at most 4 stop sequences, passed through): the generation stops once the output ends
    with a stop sequence (upstream utils/tokens.py:150-158), finish reason STOP_SEQUENCE, text ending with it."""
    full = router.generate(req(P1, None, 24), timeout=60)
    assert len(full.tokens) >= 8, full.text
    stop = "".join(t.text for t in full.tokens[4:6])
    assert stop.strip(), f"pick another stop sequence than {stop!r}"
    res = router.generate(req(P1, None, 24, stop=[stop]), timeout=60)
    assert res.generated_text.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE, res.generated_text
    assert res.text.endswith(stop), (res.text, stop)
    assert full.text.startswith(res.text), (full.text, res.text)
    assert res.generated_text.generated_tokens <= 6


def test_f_seeds_reproduce_including_zero(shard, router):
    """validation.rs:326-334: the seed is the user's (0 included) or a random u64 (the whole range); a sampled
    request with a given seed gives the same tokens alone and in a batch with other requests; the seed comes back
    in GeneratedText.seed when sampling (upstream flash_causal_lm.py:2039-2044)."""
    sampled = dict(do_sample=True, temperature=1.0)
    first = router.generate(req(P1, None, 16, seed=0, **sampled), timeout=60)
    batch = router.submit_all([req(P2, None, 16, seed=5, **sampled), req(P1, None, 16, seed=0, **sampled),
                               req(P3, None, 16, seed=7, **sampled)])
    in_batch = [h.result(60) for h in batch][1]
    again = router.generate(req(P1, None, 16, seed=0, **sampled), timeout=60)
    assert first.token_ids == in_batch.token_ids == again.token_ids, (first.text, in_batch.text, again.text)
    # ignore_eos: a random draw may end early on EOS, and these two must run their 8 tokens
    top = router.generate(req(P1, None, 8, seed=U64_MAX, ignore_eos_token=True, **sampled), timeout=60)  # u64's top
    unset = router.generate(req(P1, None, 8, ignore_eos_token=True, **sampled), timeout=60)  # validation.rs:327
    assert top.generated_text.generated_tokens == 8 and unset.generated_text.generated_tokens == 8
    assert first.generated_text.HasField("seed") and first.generated_text.seed == 0, first.generated_text
    assert top.generated_text.seed == U64_MAX, top.generated_text


def test_f_truncate_defaults_to_max_input_length(shard, router):
    """validation.rs:405: truncate = the user's value or max_input_length, almost always longer than the prompt;
    the shard keeps the last `truncate` tokens (upstream flash_causal_lm.py:235) and nothing else changes."""
    mark = len(router.log.snapshot())
    res = router.generate(req("Who is", None, 8), timeout=60)
    sent = [r for r in records_since(router, mark, "Prefill")][0].request.batch.requests[0]
    assert sent.truncate == router.args.max_input_length > len(sent.tokenized_inputs.ids)
    assert res.generated_text.generated_tokens >= 1
    # An explicit, shorter truncate keeps the last tokens: two prompts sharing their last 4 tokens agree
    a, b = "Beautiful is better.\nThe for statement", "A list is.\nThe for statement"
    ids_a, ids_b = router.tokenizer.encode(a).ids, router.tokenizer.encode(b).ids
    assert ids_a[-4:] == ids_b[-4:] and ids_a[:-4] != ids_b[:-4], (ids_a, ids_b)
    ra = router.generate(req(a, None, 8, truncate=4), timeout=60)
    rb = router.generate(req(b, None, 8, truncate=4), timeout=60)
    assert ra.token_ids == rb.token_ids, (ra.text, rb.text)
    assert not rpc_errors(router, mark), rpc_errors(router, mark)


# ------------------------------------------------------------------------------------------------------------- (g)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name"]}


def _schema_outcome(handle):
    try:
        return f"ok: {handle.result(60).text!r}"
    except InferError as e:
        return f"error: {e}"


def test_g_schema_request_in_a_batch(shard, router):
    """validation.rs:353-358: `response_format` sets NextTokenChooserParameters.schema. Whatever happens to that
    request, the other requests of its batch must finish: a failed Prefill fails EVERY request of the batch
    (infer.rs:1283-1290, send_errors :1648-1662)."""
    mark = len(router.log.snapshot())
    requests = [req(P1, None, 16), req(P2, None, 16, response_format={"type": "json_object", "schema": SCHEMA}),
                req(P3, None, 16)]
    handles = router.submit_all(requests)
    others = []
    for i in (0, 2):
        try:
            others.append(handles[i].result(60))
        except InferError as e:
            pytest.fail(f"request {requests[i].inputs!r} batched with a schema request failed: {e} "
                        f"(schema request: {_schema_outcome(handles[1])})\n{describe_failure(router, shard)}")
    outcome = _schema_outcome(handles[1])
    prefill = records_since(router, mark, "Prefill")[0]
    assert prefill.request.batch.requests[1].parameters.HasField("schema")
    assert len(prefill.request.batch.requests) == 3, "the schema request was not batched with the others (scenario)"
    assert router.aborted is None, router.aborted
    assert_same_as_alone(router, [requests[0], requests[2]], others, shard)
    print(f"schema request: {outcome}")


def test_g_schema_request_joining_a_running_batch(shard, router):
    """The same request concatenated into a running batch: upstream adds the new entries to the running batch's
    BEFORE the Prefill (infer.rs:1189-1200), so a failed Prefill errors the running requests too, and the next
    Decode of the running batch then finds ids missing from its entries and panics (infer.rs:1488-1490)."""
    mark = len(router.log.snapshot())
    running = router.submit_all([req(P1, None, 40), req(P3, None, 40)])
    wait_for(lambda: len(records_since(router, mark, "Decode")) >= 2, 60, "running batch", router)
    joining = router.submit_all([req(P2, None, 16, response_format={"type": "json_object", "schema": SCHEMA}),
                                 req(P4, None, 16)])
    outcome = _schema_outcome(joining[0])
    for h, request in zip(running + joining[1:], [P1, P3, P4]):
        try:
            h.result(60)
        except InferError as e:
            pytest.fail(f"{request!r} failed when a schema request joined the running batch: {e} "
                        f"(schema request: {outcome})\n{describe_failure(router, shard)}")
    assert any(len(d.request.batches) >= 2 for d in records_since(router, mark, "Decode")), \
        "the schema request's batch was never concatenated (scenario)"
    assert router.aborted is None, router.aborted
    print(f"schema request: {outcome}")
