"""A malformed adapter over gRPC: INVALID_ARGUMENT naming the file and the problem, and the server serves on."""

import shutil

import grpc
import pytest
import torch

from lorax_server.client import make_request
from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.pb import generate_pb2 as pb

SHOUT = DEFAULT_MODEL_DIR.parent / "adapters" / "shout"  # an embedded adapter (q/k/v/o_proj and lm_head)


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def truncate_weights(d):
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def pickle_payload(d):
    (d / "adapter_model.safetensors").unlink()
    torch.save({"payload": Payload(d / "marker")}, d / "adapter_model.bin")


SPOILED = {
    "truncated": (truncate_weights, "adapter_model.safetensors is truncated or corrupt"),
    "list config": (lambda d: (d / "adapter_config.json").write_text("[4, 8]"),
                    "adapter_config.json holds a JSON list, not an object of LoRA settings"),
    "pickle payload": (pickle_payload, "adapter_model.bin is refused: its pickle calls"),
}


def greedy(client, batch_id, adapter_index):
    request = make_request(0, "The for statement", max_new_tokens=8, adapter_index=adapter_index)
    return client.run_to_completion(batch_id, [request])[0].text


def test_a_malformed_adapter_is_invalid_argument_and_serving_goes_on(served, tmp_path):
    client, model = served
    assert client.load_adapter(5, str(SHOUT))
    before = greedy(client, 1, 0), greedy(client, 2, 5)
    for case, (spoil, message) in SPOILED.items():
        bad = tmp_path / case.replace(" ", "_")
        shutil.copytree(SHOUT, bad)
        spoil(bad)
        with pytest.raises(grpc.RpcError) as refused:
            client.load_adapter(6, str(bad))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"adapter {bad}: {bad}/{message}" in refused.value.details()
        assert not (bad / "marker").exists()
    assert 6 not in model.adapters.loaded
    assert (greedy(client, 3, 0), greedy(client, 4, 5)) == before
    assert before[0] != before[1]  # the adapter served really is another model
    assert client.stub.OffloadAdapter(pb.OffloadAdapterRequest(adapter_index=5)).offloaded
