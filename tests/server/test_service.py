"""The other RPCs, and bad input: each refused with a clear status, and the next request is served."""

import grpc
import pytest

from lorax_server.client import make_request
from lorax_server.engine.sampler import BatchSampler
from lorax_server.pb import generate_pb2 as pb
from lorax_server.utils.tokens import NextTokenChooser, SamplingParams
from tests.adapters.peft_adapters import make_peft_adapter


def prefill(client, batch_id, requests):
    return client.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests, size=len(requests))))


def assert_status(call, code, message):
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == code
    assert message in error.value.details()


def assert_still_serves(client, model):
    response = prefill(client, 999, [make_request(0, "The for statement", max_new_tokens=1)])
    assert len(response.generations) == 1 and not response.HasField("batch")
    assert model.cache.all_free and not model.batches


def test_info_health_discovery(served):
    client, _ = served
    info, call = client.stub.Info.with_call(pb.InfoRequest())
    assert info.dtype == "torch.float32" and info.device_type == "cpu" and info.block_size == 16
    assert info.supports_generation and not info.supports_embeddings
    assert info.requires_block_allocator  # no window: the router allocates blocks, as for upstream's flash models
    assert not info.HasField("window_size")  # the embedded model has no sliding window
    backends = dict(call.trailing_metadata())["lorax-backends"]
    assert "moe=" in backends and "attention=torch" in backends
    client.stub.Health(pb.HealthRequest())
    assert list(client.stub.ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls)[0].startswith("unix://")


def test_warmup_reports_the_cache_size(served):
    client, model = served
    batch = pb.Batch(id=50, requests=[make_request(0, "A list is", max_new_tokens=4)], size=1)
    response = client.stub.Warmup(pb.WarmupRequest(batch=batch, max_input_length=16, max_prefill_tokens=32,
                                                   max_new_tokens=4))
    assert response.max_supported_total_tokens == model.cache.num_blocks * model.cache.block_size
    assert not model.batches


def test_warmup_beside_a_live_batch_answers_and_a_refused_one_changes_nothing(served):
    """A client that warms up with a batch alive (the router clears first) is answered, the kernel warm-up
    left for later (it writes free blocks); a Warmup that is refused leaves the prefill budget as it was."""
    client, model = served
    live = prefill(client, 51, [make_request(1, "Exceptions", max_new_tokens=4)])
    before = model.max_prefill_tokens
    warm = pb.Batch(id=52, requests=[make_request(0, "A list is", max_new_tokens=4)], size=1)
    response = client.stub.Warmup(pb.WarmupRequest(batch=warm, max_input_length=16, max_prefill_tokens=32,
                                                   max_new_tokens=4))
    assert response.max_supported_total_tokens > 0 and list(model.batches) == [live.batch.id]
    model.max_prefill_tokens = before
    too_much = pb.WarmupRequest(batch=warm, max_input_length=16, max_prefill_tokens=10**7, max_new_tokens=4)
    assert_status(lambda: client.stub.Warmup(too_much), grpc.StatusCode.RESOURCE_EXHAUSTED, "fewer than")
    assert model.max_prefill_tokens == before
    client.stub.ClearCache(pb.ClearCacheRequest(id=live.batch.id))
    assert_still_serves(client, model)


def test_adapter_ids_and_sources_that_name_nothing_are_refused(served, tmp_path, monkeypatch):
    """An adapter source the enum does not have, and an empty id (Path("") is the working directory, which
    may hold an adapter), are bad input: INVALID_ARGUMENT, nothing loaded."""
    client, model = served
    monkeypatch.chdir(tmp_path)
    for ids, source, message in (([str(tmp_path)], 99, "adapter_source 99 is not an AdapterSource"),
                                 ([""], pb.LOCAL, "an adapter id is empty"), ([" "], pb.HUB, "an adapter id is empty")):
        load = pb.LoadAdapterRequest(adapter_parameters=pb.AdapterParameters(adapter_ids=ids), adapter_source=source,
                                     adapter_index=40)
        assert_status(lambda: client.stub.LoadAdapter(load), grpc.StatusCode.INVALID_ARGUMENT, message)
    assert 40 not in model.adapters.loaded
    assert_still_serves(client, model)


# Requests this shard cannot serve: each ends alone, its batch-mates are served, and Prefill itself never
# fails for one request (the router would then fail its running batch too, and panic at the next Decode).
BAD_REQUESTS = {
    "empty input": (dict(inputs=""), "has no input"),
    "more positions than the model has": (dict(inputs="A list is", max_new_tokens=1030, ignore_eos_token=True),
                                          "exceed the model's 1024 positions"),
    "zero new tokens": (dict(inputs="A list is", max_new_tokens=0), "max_new_tokens must be positive"),
    "token outside the vocabulary": (dict(ids=[1, 99999]), "outside the vocabulary"),
    "bad top_p": (dict(inputs="A list is", top_p=1.5), "top_p must be in"),
    "NaN temperature": (dict(inputs="A list is", temperature=float("nan")), "temperature must be >= 0, got nan"),
    "NaN repetition penalty": (dict(inputs="A list is", repetition_penalty=float("nan")), "repetition_penalty"),
    "infinite presence penalty": (dict(inputs="A list is", presence_penalty=float("inf")), "presence_penalty"),
    "huge frequency penalty": (dict(inputs="A list is", frequency_penalty=-1e38, do_sample=True),
                               "frequency_penalty must be in [-2, 2]"),
    "schema that is not JSON": (dict(inputs="A list is", schema='{"type": '), "schema"),
    "schema nested too deeply": (dict(inputs="A list is", schema="[" * 5000 + "]" * 5000), "nests too deeply"),
    "schema keyword not enforced": (dict(inputs="A list is", schema='{"type": "array", "uniqueItems": true}'),
                                    "uniqueItems"),
    "adapter never loaded": (dict(inputs="A list is", adapter_index=42), "adapter index 42 is not loaded"),
    "blocks in use": (dict(inputs="A list is", blocks=[5, 5]), "already in use"),
}


def ended_alone(generation, request_id, message):
    text = generation.generated_text.text
    assert generation.request_id == request_id and text.startswith(f"[error] request {request_id}:"), text
    assert message in text and generation.next_tokens.ids  # one token: the router ends a request on its last


def test_an_unforeseen_failure_setting_up_one_request_ends_it_alone(served, monkeypatch):
    """Whatever one request's set-up raises (not only a RequestError), its batch-mate and the running batch the
    Prefill carries go on: a failed Prefill would make the router fail them all."""
    client, model = served
    running = prefill(client, 70, [make_request(1, "Exceptions", max_new_tokens=4)])
    real = model.new_request

    def new_request(request_id, *args, **kwargs):
        if request_id == 3:
            raise RecursionError("set-up of request 3, for this test")
        return real(request_id, *args, **kwargs)

    monkeypatch.setattr(model, "new_request", new_request)
    response = client.stub.Prefill(pb.PrefillRequest(
        batch=pb.Batch(id=71, requests=[make_request(2, "A list is", max_new_tokens=4),
                                        make_request(3, "A list is", max_new_tokens=4)], size=2),
        cached_batch=running.batch))
    by_id = {g.request_id: g for g in response.generations}
    ended_alone(by_id[3], 3, "RecursionError: set-up of request 3")
    assert sorted(response.batch.request_ids) == [1, 2]
    monkeypatch.setattr(model, "new_request", real)
    while response.HasField("batch"):
        response = client.stub.Decode(pb.DecodeRequest(batches=[response.batch]))
    assert_still_serves(client, model)


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_ends_alone_and_its_batch_mate_is_served(served, case):
    client, model = served
    fields, message = BAD_REQUESTS[case]
    fields = {"max_new_tokens": 4, **fields}
    response = prefill(client, 60, [make_request(1, "Exceptions", max_new_tokens=4), make_request(2, **fields)])
    by_id = {g.request_id: g for g in response.generations}
    ended_alone(by_id[2], 2, message)
    assert not by_id[1].HasField("generated_text") and list(response.batch.request_ids) == [1]
    while response.HasField("batch"):
        response = client.stub.Decode(pb.DecodeRequest(batches=[response.batch]))
    assert response.generations[0].generated_text.generated_tokens == 4
    alone = prefill(client, 61, [make_request(2, **fields)])
    ended_alone(alone.generations[0], 2, message)
    assert not alone.HasField("batch")
    assert_still_serves(client, model)


def test_truncate_keeps_the_last_tokens_and_longer_is_a_no_op(served):
    client, model = served
    ids = model.tokenizer("The for statement repeats a block")["input_ids"]
    runs = {}
    for truncate in (0, len(ids) + 50, 3):
        response = prefill(client, 70, [make_request(0, ids=ids, max_new_tokens=1, truncate=truncate)])
        runs[truncate] = (response.generations[0].prefill_tokens_length, response.generations[0].next_tokens.ids[0])
    assert runs[0] == runs[len(ids) + 50] and runs[0][0] == len(ids)
    alone = prefill(client, 71, [make_request(0, ids=ids[-3:], max_new_tokens=1)]).generations[0]
    assert runs[3] == (3, alone.next_tokens.ids[0])


def test_requests_past_the_cache_end_alone_and_the_rest_are_served(served):
    client, model = served
    requests = [make_request(i, "The for statement", max_new_tokens=1000 - 8, ignore_eos_token=True) for i in range(3)]
    response = prefill(client, 61, requests)  # 63 blocks each, 127 free: the first two fit
    ended_alone(response.generations[0], 2, "needs 63 cache blocks of 16 tokens, 1 are free of 128")
    assert list(response.batch.request_ids) == [0, 1]
    client.stub.ClearCache(pb.ClearCacheRequest(id=61))
    assert_still_serves(client, model)


def test_unknown_batch_and_filter_errors(served):
    client, model = served
    assert_status(lambda: client.stub.Decode(pb.DecodeRequest(batches=[pb.CachedBatch(id=12345)])),
                  grpc.StatusCode.NOT_FOUND, "batch 12345 is not in the cache")
    assert_status(lambda: client.stub.FilterBatch(pb.FilterBatchRequest(batch_id=12345, request_ids=[1])),
                  grpc.StatusCode.NOT_FOUND, "batch 12345")
    batch = prefill(client, 62, [make_request(0, "A list is", max_new_tokens=5)]).batch
    assert_status(lambda: client.stub.FilterBatch(pb.FilterBatchRequest(batch_id=62, request_ids=[7])),
                  grpc.StatusCode.INVALID_ARGUMENT, "requests [7] are not in batch 62")
    client.stub.Decode(pb.DecodeRequest(batches=[batch]))  # the batch survived the refused filter
    client.stub.ClearCache(pb.ClearCacheRequest())
    assert_still_serves(client, model)


def test_embed_and_classify_are_unimplemented(served):
    client, _ = served
    assert_status(lambda: client.stub.Embed(pb.EmbedRequest()), grpc.StatusCode.UNIMPLEMENTED, "Embed")
    assert_status(lambda: client.stub.Classify(pb.ClassifyRequest()), grpc.StatusCode.UNIMPLEMENTED, "Classify")


def test_adapter_lifecycle_over_grpc(served, adapters, tmp_path):
    client, model = served
    path = str(adapters["attn"][0])
    params = pb.AdapterParameters(adapter_ids=[path])
    assert_status(lambda: client.stub.DownloadAdapter(pb.DownloadAdapterRequest(adapter_parameters=params,
                                                                                 adapter_source=pb.S3)),
                  grpc.StatusCode.INVALID_ARGUMENT, "source 's3' is not reachable")
    for source in (pb.HUB, pb.LOCAL):  # a hub id that is a local directory is that directory, as upstream
        download = client.stub.DownloadAdapter(pb.DownloadAdapterRequest(adapter_parameters=params,
                                                                          adapter_source=source))
        assert download.downloaded and 0 < download.memory_fraction < 1
    missing = pb.AdapterParameters(adapter_ids=[str(tmp_path / "nope")])
    assert_status(lambda: client.stub.LoadAdapter(pb.LoadAdapterRequest(adapter_parameters=missing,
                                                                         adapter_source=pb.LOCAL, adapter_index=31)),
                  grpc.StatusCode.NOT_FOUND, "nope")
    assert client.load_adapter(31, path, pb.HUB)
    assert client.load_adapter(31, path)  # already loaded at that index: loaded, as upstream answers
    batch = prefill(client, 63, [make_request(0, "A list is", max_new_tokens=6, adapter_index=31)]).batch
    offload = pb.OffloadAdapterRequest(adapter_index=31)
    assert_status(lambda: client.stub.OffloadAdapter(offload), grpc.StatusCode.INVALID_ARGUMENT, "in use by requests [0]")
    client.stub.ClearCache(pb.ClearCacheRequest(id=batch.id))
    assert client.stub.OffloadAdapter(offload).offloaded
    assert not client.stub.OffloadAdapter(offload).offloaded  # nothing left to offload: no error upstream
    assert_still_serves(client, model)


def test_base_model_goes_through_the_adapter_rpcs_as_upstream(served):
    client, _ = served
    base = pb.AdapterParameters(adapter_ids=["__base_model__"])
    download = client.stub.DownloadAdapter(pb.DownloadAdapterRequest(adapter_parameters=base, adapter_source=pb.HUB))
    assert not download.downloaded and download.memory_fraction == 0
    load = pb.LoadAdapterRequest(adapter_parameters=base, adapter_source=pb.HUB, adapter_index=0)
    assert not client.stub.LoadAdapter(load).loaded
    offload = pb.OffloadAdapterRequest(adapter_parameters=base, adapter_source=pb.HUB, adapter_index=0)
    assert not client.stub.OffloadAdapter(offload).offloaded


def test_empty_batch_duplicate_decode_and_unknown_cached_batch_are_refused(served):
    client, model = served
    assert_status(lambda: prefill(client, 64, []), grpc.StatusCode.INVALID_ARGUMENT, "at least one request")
    batch = prefill(client, 65, [make_request(0, "A list is", max_new_tokens=5)]).batch
    assert_status(lambda: client.stub.Decode(pb.DecodeRequest(batches=[batch, batch])),
                  grpc.StatusCode.INVALID_ARGUMENT, "given once each")
    unknown = pb.PrefillRequest(batch=pb.Batch(id=66, requests=[make_request(0, "A list is")], size=1),
                                cached_batch=pb.CachedBatch(id=4242))
    assert_status(lambda: client.stub.Prefill(unknown), grpc.StatusCode.NOT_FOUND, "batch 4242")
    assert list(model.batches) == [65]  # neither refusal touched the live batch or added one
    client.stub.ClearCache(pb.ClearCacheRequest())
    assert_still_serves(client, model)


def test_a_request_failing_mid_generation_ends_alone(served, monkeypatch):
    client, model = served
    batch = prefill(client, 67, [make_request(i, "A list is", max_new_tokens=8, ignore_eos_token=True)
                                 for i in range(3)]).batch
    real = NextTokenChooser.__call__

    def broken_for_request_1(self, logits, previous):
        if self.params.top_k == 7:
            raise RuntimeError("sampler exploded")
        return real(self, logits, previous)

    def batch_refused(self, logits, rows):  # the batched sampler fails: each request samples alone
        raise RuntimeError("batched sampling exploded")

    model.batches[67].requests[1].chooser.params = SamplingParams(top_k=7)
    monkeypatch.setattr(NextTokenChooser, "__call__", broken_for_request_1)
    monkeypatch.setattr(BatchSampler, "launch", batch_refused)
    # The next token of each request was already chosen by the step launched ahead at the prefill: the
    # failure comes with the step after it.
    for _ in range(2 if model.decode_ahead else 1):
        response = client.stub.Decode(pb.DecodeRequest(batches=[batch]))
        batch = response.batch
    failed = {g.request_id: g.generated_text.text for g in response.generations if g.HasField("generated_text")}
    assert list(failed) == [1] and "sampler exploded" in failed[1]
    assert list(response.batch.request_ids) == [0, 2]  # its batch-mates go on
    while response.HasField("batch"):
        response = client.stub.Decode(pb.DecodeRequest(batches=[response.batch]))
    assert sorted(g.request_id for g in response.generations) == [0, 2]
    assert_still_serves(client, model)  # the failed request's blocks came back too


def test_several_adapter_ids_load_as_one_merged_adapter(served, hf_model, tmp_path):
    client, model = served
    ids = [str(tmp_path / "attn"), str(tmp_path / "experts")]
    make_peft_adapter(hf_model, tmp_path / "attn", seed=3, r=4, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(hf_model, tmp_path / "experts", seed=4, r=4, target_modules=["w1", "w2", "w3", "k_proj"])
    params = pb.AdapterParameters(adapter_ids=ids, weights=[0.7, 0.3], merge_strategy=pb.TIES, density=0.5,
                                  majority_sign_method=pb.FREQUENCY)
    assert client.stub.DownloadAdapter(pb.DownloadAdapterRequest(adapter_parameters=params,
                                                                  adapter_source=pb.HUB)).downloaded
    assert client.stub.LoadAdapter(pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=pb.HUB,
                                                          adapter_index=41)).loaded
    merged = model.adapters.loaded[41]
    assert {name for _, name in merged.linear} >= {"self_attn.q_proj", "self_attn.k_proj"} and merged.experts
    response = prefill(client, 90, [make_request(0, "A list is", max_new_tokens=3, adapter_index=41)])
    assert response.generations[0].next_tokens.ids
    client.stub.ClearCache(pb.ClearCacheRequest(id=90))
    assert client.stub.OffloadAdapter(pb.OffloadAdapterRequest(adapter_parameters=params, adapter_index=41)).offloaded


def test_a_schema_request_gets_json_valid_against_it_beside_a_free_one(served):
    """Structured output over the wire: the schema's request ends with JSON its schema accepts (finish reason
    EOS, as soon as the JSON is complete); its batch-mate is served as without it."""
    import json

    import jsonschema

    client, model = served
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "size": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["name", "size"], "additionalProperties": False}
    free = make_request(1, "A list is", max_new_tokens=6, ignore_eos_token=True)
    alone = prefill(client, 80, [free])
    while alone.HasField("batch"):
        alone = client.stub.Decode(pb.DecodeRequest(batches=[alone.batch]))
    response = prefill(client, 81, [make_request(1, "A list is", max_new_tokens=6, ignore_eos_token=True),
                                    make_request(2, "A person:", max_new_tokens=60, schema=json.dumps(schema))])
    finished = {g.request_id: g.generated_text for g in response.generations if g.HasField("generated_text")}
    while response.HasField("batch"):
        response = client.stub.Decode(pb.DecodeRequest(batches=[response.batch]))
        finished.update({g.request_id: g.generated_text for g in response.generations if g.HasField("generated_text")})
    jsonschema.validate(json.loads(finished[2].text), schema)
    assert finished[2].finish_reason == pb.FINISH_REASON_EOS_TOKEN
    assert finished[1].text == alone.generations[0].generated_text.text
    assert_still_serves(client, model)


def test_a_prefill_whose_client_gave_up_before_it_ran_makes_no_batch(tmp_path):
    """A Prefill that waited for the service lock past its client's deadline does not run: the batch would hold
    blocks nobody knows of."""
    import threading
    import time

    from lorax_server.cli import DEFAULT_MODEL_DIR
    from lorax_server.client import ShardClient
    from lorax_server.models import get_model
    from lorax_server.server import start_server

    model = get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=4 << 20)
    server, service = start_server(model, str(tmp_path / "lorax"))
    client = ShardClient(f"unix://{tmp_path / 'lorax'}-0")
    try:
        client.wait_ready()
        service.lock.acquire()
        releaser = threading.Timer(1.0, service.lock.release)
        releaser.start()
        request = pb.PrefillRequest(batch=pb.Batch(id=1, requests=[make_request(1, "Exceptions")], size=1))
        with pytest.raises(grpc.RpcError) as gave_up:
            client.stub.Prefill(request, timeout=0.3)
        assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        releaser.join()
        time.sleep(0.5)  # the abandoned call's thread takes the lock and answers
        with service.lock:
            pass
        assert not model.batches and model.cache.all_free
        assert_still_serves(client, model)
    finally:
        client.close()
        server.stop(None)
