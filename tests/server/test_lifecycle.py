"""A server's life: one per socket, a graceful stop on SIGTERM, bounded messages, unique request ids."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from lorax_server.client import ShardClient, make_request
from lorax_server.pb import generate_pb2 as pb
from lorax_server.server import SocketInUse, start_server, stop_server


def prefill(client, batch_id, requests):
    return client.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests, size=len(requests))))


def greedy(client, batch_id, prompt="The for statement"):
    response = prefill(client, batch_id, [make_request(0, prompt, max_new_tokens=6, ignore_eos_token=True)])
    ids = list(response.generations[0].next_tokens.ids)
    while response.HasField("batch"):
        response = client.stub.Decode(pb.DecodeRequest(batches=[response.batch]))
        ids += response.generations[0].next_tokens.ids
    return ids


def test_a_live_socket_is_refused_and_a_stale_one_replaced(served, tmp_path):
    client, model = served
    path = str(tmp_path / "shard")
    first, _ = start_server(model, path)
    try:
        with pytest.raises(SocketInUse, match="another server is listening on .*shard-0"):
            start_server(model, path)
        ShardClient(f"unix://{path}-0").stub.Health(pb.HealthRequest())  # the first still answers
    finally:
        stop_server(first, f"{path}-0", grace=0)
    assert not os.path.exists(f"{path}-0")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(f"{path}-0")  # a socket file nobody listens on: what a killed server leaves
    stale.close()
    second, _ = start_server(model, path)
    assert ShardClient(f"unix://{path}-0").stub.Info(pb.InfoRequest()).block_size == 16
    stop_server(second, f"{path}-0", grace=0)
    (tmp_path / "file-0").write_text("not a socket")
    with pytest.raises(SocketInUse, match="is not a socket"):
        start_server(model, str(tmp_path / "file"))


def test_status_messages_are_bounded(served):
    client, model = served
    long_path = "/nonexistent/" + "x" * 100_000
    with pytest.raises(grpc.RpcError) as error:
        client.stub.LoadAdapter(pb.LoadAdapterRequest(adapter_parameters=pb.AdapterParameters(adapter_ids=[long_path]),
                                                      adapter_source=pb.LOCAL, adapter_index=7))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "File name too long" in error.value.details()
    assert len(error.value.details()) < 1100 and "more characters cut" in error.value.details()
    assert greedy(client, 500) == greedy(client, 501)


def test_request_ids_are_unique_across_live_batches(served):
    client, model = served
    live = prefill(client, 510, [make_request(5, "A list is", max_new_tokens=8, ignore_eos_token=True)])
    again = prefill(client, 511, [make_request(5, "Exceptions", max_new_tokens=8), make_request(6, "Exceptions")])
    by_id = {g.request_id: g for g in again.generations}
    assert "request id 5 is already live in another batch" in by_id[5].generated_text.text
    assert list(again.batch.request_ids) == [6]
    merged = client.stub.Decode(pb.DecodeRequest(batches=[live.batch, again.batch]))
    assert sorted(merged.batch.request_ids) == [5, 6]
    client.stub.ClearCache(pb.ClearCacheRequest())
    assert model.cache.all_free


def test_sigterm_lets_the_call_in_flight_finish_then_removes_the_socket(tmp_path):
    path = str(tmp_path / "shard")
    process = subprocess.Popen([sys.executable, "-m", "lorax_server.cli", "serve", "--uds-path", path,
                                "--json-output", "--kv-cache-mib", "64"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not os.path.exists(f"{path}-0") and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        client = ShardClient(f"unix://{path}-0")
        client.wait_ready()
        results = {}
        big = [make_request(i, ids=list(range(10, 1000)), max_new_tokens=2) for i in range(24)]
        call = threading.Thread(target=lambda: results.setdefault("prefill", prefill(client, 1, big)))
        call.start()
        time.sleep(0.3)  # the prefill is running
        process.send_signal(signal.SIGTERM)
        call.join(60)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert len(results["prefill"].generations) == 24  # the call in flight finished
    assert process.returncode == 0 and not os.path.exists(f"{path}-0")
    messages = [json.loads(line)["record"]["message"] for line in output.splitlines() if line.startswith("{")]
    assert any("SIGTERM received" in m for m in messages) and any(m.startswith("stopped;") for m in messages)
