"""Info, field by field, as the router reads it: without a window, with one, and with adapters preloaded.

Upstream's flash models answer requires_padding false, their block size, speculate 0 (no speculation),
generation only (no embeddings, no classification), chunked_prefill off; this shard asks for the
router's block allocator unless the model has a sliding window (the allocator's ring of blocks is not
what our kernels read), and then also reports window_size. Preloaded adapters are listed with their id,
source and index, which seed the router's adapter map.
"""

import json
import shutil

import pytest

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.client import ShardClient
from lorax_server.models import get_model
from lorax_server.pb import generate_pb2 as pb
from lorax_server.server import start_server

KV_CACHE_BYTES = 1 << 20
WINDOW = 24
FIELDS = {"requires_padding", "dtype", "device_type", "window_size", "block_size", "speculate", "preloaded_adapters",
          "supports_generation", "supports_embeddings", "supports_classification", "chunked_prefill",
          "requires_block_allocator"}


def serve(model, socket, preloaded=()):
    server, _ = start_server(model, str(socket), 0, 1, preloaded)
    client = ShardClient(f"unix://{socket}-0")
    client.wait_ready()
    return server, client


def info_of(model, socket, preloaded=()):
    server, client = serve(model, socket, preloaded)
    try:
        return client.stub.Info(pb.InfoRequest())
    finally:
        client.close()
        server.stop(grace=None)


@pytest.fixture(scope="module")
def model():
    return get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=KV_CACHE_BYTES)


@pytest.fixture(scope="module")
def windowed_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("windowed") / "tiny_mixtral"
    shutil.copytree(DEFAULT_MODEL_DIR, directory)
    config = json.loads((directory / "config.json").read_text())
    config["sliding_window"] = WINDOW
    (directory / "config.json").write_text(json.dumps(config))
    return get_model(str(directory), dtype="float32", kv_cache_bytes=KV_CACHE_BYTES)


@pytest.fixture(scope="module")
def plain_info(model, tmp_path_factory):
    return info_of(model, tmp_path_factory.mktemp("uds") / "plain")


def test_the_wire_message_has_exactly_the_fields_asserted_here():
    assert {f.name for f in pb.InfoResponse.DESCRIPTOR.fields} == FIELDS


def test_info_without_a_window(plain_info):
    info = plain_info
    assert info.requires_padding is False
    assert info.dtype == "torch.float32"
    assert info.device_type == "cpu"
    assert not info.HasField("window_size") and info.window_size == 0
    assert info.block_size == 16
    assert info.speculate == 0
    assert list(info.preloaded_adapters) == []
    assert info.supports_generation is True
    assert info.supports_embeddings is False
    assert info.supports_classification is False
    assert info.chunked_prefill is False
    assert info.requires_block_allocator is True


def test_dtype_is_spelled_as_upstream_spells_it(plain_info):
    """Upstream's Model.info sends str(self.dtype); the router shows it as model_dtype."""
    assert plain_info.dtype == "torch.float32"


def test_info_with_a_window(windowed_model, tmp_path):
    info = info_of(windowed_model, tmp_path / "windowed")
    assert info.HasField("window_size") and info.window_size == WINDOW
    assert info.requires_block_allocator is False  # the shard allocates: the router's ring is not ours
    assert info.requires_padding is False
    assert info.dtype == "torch.float32" and info.device_type == "cpu"
    assert info.block_size == 16 and info.speculate == 0
    assert info.supports_generation is True and info.supports_embeddings is False
    assert info.supports_classification is False and info.chunked_prefill is False
    assert list(info.preloaded_adapters) == []


def test_info_lists_preloaded_adapters(model, tmp_path):
    preloaded = [(1, "some/id", "hub"), (2, "/models/adapter-b", "local"), (7, "org/other", "hub")]
    info = info_of(model, tmp_path / "preloaded", preloaded)
    got = [(list(p.adapter_parameters.adapter_ids), p.adapter_source, p.adapter_index) for p in info.preloaded_adapters]
    assert got == [(["some/id"], pb.HUB, 1), (["/models/adapter-b"], pb.LOCAL, 2), (["org/other"], pb.HUB, 7)]
    for p in info.preloaded_adapters:  # one plain adapter each: nothing merged
        assert list(p.adapter_parameters.weights) == [] and p.adapter_parameters.merge_strategy == pb.LINEAR
    # the rest is as without adapters
    assert info.requires_block_allocator is True and not info.HasField("window_size")
    assert info.supports_generation is True and info.speculate == 0 and info.block_size == 16
