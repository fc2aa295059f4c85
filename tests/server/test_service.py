"""The other RPCs, and bad input: each refused with a clear status, and the next request is served."""

import grpc
import pytest

from lorax_server.client import make_request
from lorax_server.pb import generate_pb2 as pb


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
    assert len(model.cache.free_blocks) == model.cache.num_blocks and not model.batches


def test_info_health_discovery(served):
    client, _ = served
    info, call = client.stub.Info.with_call(pb.InfoRequest())
    assert info.dtype == "float32" and info.device_type == "cpu" and info.block_size == 16
    assert info.supports_generation and not info.supports_embeddings and not info.requires_block_allocator
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


BAD_REQUESTS = {
    "empty input": (dict(inputs=""), grpc.StatusCode.INVALID_ARGUMENT, "has no input"),
    "truncate longer than the input": (dict(inputs="A list is", truncate=50), grpc.StatusCode.INVALID_ARGUMENT,
                                       "truncate 50 is longer than the input"),
    "adapter never loaded": (dict(inputs="A list is", adapter_index=42), grpc.StatusCode.INVALID_ARGUMENT,
                             "adapter index 42 is not loaded"),
    "more positions than the model has": (dict(inputs="A list is", max_new_tokens=1030, ignore_eos_token=True),
                                   grpc.StatusCode.INVALID_ARGUMENT, "exceed the model's 1024 positions"),
    "zero new tokens": (dict(inputs="A list is", max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT,
                        "max_new_tokens must be positive"),
    "token outside the vocabulary": (dict(ids=[1, 99999]), grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    "bad top_p": (dict(inputs="A list is", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in"),
    "watermark": (dict(inputs="A list is", watermark=True), grpc.StatusCode.UNIMPLEMENTED, "watermark"),
    "blocks in use": (dict(inputs="A list is", blocks=[5, 5]), grpc.StatusCode.INVALID_ARGUMENT, "already in use"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_a_status_and_the_server_goes_on(served, case):
    client, model = served
    fields, code, message = BAD_REQUESTS[case]
    fields = {"max_new_tokens": 4, **fields}
    good = make_request(1, "Exceptions", max_new_tokens=4)
    assert_status(lambda: prefill(client, 60, [good, make_request(2, **fields)]), code, message)
    assert_still_serves(client, model)


def test_batch_larger_than_the_cache_is_resource_exhausted(served):
    client, model = served
    requests = [make_request(i, "The for statement", max_new_tokens=1000 - 8, ignore_eos_token=True) for i in range(3)]
    assert_status(lambda: prefill(client, 61, requests), grpc.StatusCode.RESOURCE_EXHAUSTED, "cache blocks")
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
                                                                                 adapter_source=pb.HUB)),
                  grpc.StatusCode.UNIMPLEMENTED, "adapter source HUB is not reachable")
    download = client.stub.DownloadAdapter(pb.DownloadAdapterRequest(adapter_parameters=params, adapter_source=pb.LOCAL))
    assert download.downloaded and 0 < download.memory_fraction < 1
    missing = pb.AdapterParameters(adapter_ids=[str(tmp_path / "nope")])
    assert_status(lambda: client.stub.LoadAdapter(pb.LoadAdapterRequest(adapter_parameters=missing,
                                                                         adapter_source=pb.LOCAL, adapter_index=31)),
                  grpc.StatusCode.NOT_FOUND, "not a local PEFT adapter directory")
    assert client.load_adapter(31, path)
    batch = prefill(client, 63, [make_request(0, "A list is", max_new_tokens=6, adapter_index=31)]).batch
    offload = pb.OffloadAdapterRequest(adapter_index=31)
    assert_status(lambda: client.stub.OffloadAdapter(offload), grpc.StatusCode.INVALID_ARGUMENT, "in use by requests [0]")
    client.stub.ClearCache(pb.ClearCacheRequest(id=batch.id))
    assert client.stub.OffloadAdapter(offload).offloaded
    assert_status(lambda: client.stub.OffloadAdapter(offload), grpc.StatusCode.INVALID_ARGUMENT, "not loaded")
    assert_still_serves(client, model)


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


def test_a_failure_mid_step_frees_the_batch_and_the_server_goes_on(served, monkeypatch):
    client, model = served
    batch = prefill(client, 67, [make_request(i, "A list is", max_new_tokens=8) for i in range(3)]).batch

    def broken(self, logits, previous):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr("lorax_server.utils.tokens.NextTokenChooser.__call__", broken)
    assert_status(lambda: client.stub.Decode(pb.DecodeRequest(batches=[batch])), grpc.StatusCode.INTERNAL,
                  "sampler exploded")
    assert_status(lambda: prefill(client, 68, [make_request(0, "A list is")]), grpc.StatusCode.INTERNAL,
                  "sampler exploded")
    monkeypatch.undo()
    assert_still_serves(client, model)  # both batches are gone and every block is free again
