"""Weights: sharded checkpoints with an index, tensor-parallel slices, uneven vocabulary splits."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lorax_server.layers.linear import load_vocab_shard
from lorax_server.utils.dist import FakeGroup
from lorax_server.utils.weights import CheckpointError, Weights, weight_files


@pytest.fixture
def sharded_checkpoint(tmp_path):
    a, b = torch.arange(24.0).view(6, 4), torch.arange(10.0).view(5, 2)
    save_file({"a.weight": a}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b.weight": b}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path, a, b


def test_index_routes_each_tensor_to_its_file(sharded_checkpoint):
    directory, a, b = sharded_checkpoint
    weights = Weights(weight_files(directory), "cpu", torch.float64, FakeGroup(0, 1))
    assert torch.equal(weights.get_tensor("a.weight"), a.double())
    assert weights.get_tensor("b.weight").dtype == torch.float64


@pytest.mark.parametrize("rank", [0, 1])
def test_column_and_row_shards(sharded_checkpoint, rank):
    directory, a, _ = sharded_checkpoint
    weights = Weights(weight_files(directory), "cpu", torch.float32, FakeGroup(rank, 2))
    assert torch.equal(weights.get_sharded("a.weight", 0), a.chunk(2, 0)[rank])
    assert torch.equal(weights.get_multi_weights_row("a"), a.chunk(2, 1)[rank])


def test_unshardable_size_names_both_numbers(sharded_checkpoint):
    directory, _, _ = sharded_checkpoint
    weights = Weights(weight_files(directory), "cpu", torch.float32, FakeGroup(0, 2))
    with pytest.raises(CheckpointError, match="tensor b.weight dim 0: size 5 is not divisible by the world size 2"):
        weights.get_sharded("b.weight", 0)


def test_vocabulary_split_pads_the_last_shard(sharded_checkpoint):
    directory, _, b = sharded_checkpoint
    shards = [load_vocab_shard(Weights(weight_files(directory), "cpu", torch.float32, FakeGroup(r, 2)), "b.weight", (5, 2))
              for r in range(2)]
    assert torch.equal(torch.cat(shards)[:5], b) and torch.equal(shards[1][2], torch.zeros(2))


def test_index_naming_a_missing_file_is_refused(sharded_checkpoint):
    directory, _, _ = sharded_checkpoint
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names files that do not exist"):
        weight_files(directory)


def test_directory_without_weights_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        weight_files(tmp_path)


def test_aliases_resolve(sharded_checkpoint):
    directory, a, _ = sharded_checkpoint
    weights = Weights(weight_files(directory), "cpu", torch.float32, FakeGroup(0, 1), aliases={"c.weight": ["a.weight"]})
    assert torch.equal(weights.get_tensor("c.weight"), a)


# -- FP8 scales, views, and reads that touch no data ------------------------------------------------------

FP8 = torch.float8_e4m3fn


@pytest.fixture
def fp8_checkpoint(tmp_path):
    """a: per-channel scales [6, 1]; b and c: one per-tensor scale each (0-d and [1])."""
    from lorax_server.utils.quantization import Fp8Checkpoint

    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(6, 4).to(FP8), "a.weight_scale": torch.rand(6, 1) + 0.5,
               "b.weight": torch.randn(6, 4).to(FP8), "b.weight_scale": torch.tensor(0.25),
               "c.weight": torch.randn(6, 4).to(FP8), "c.weight_scale": torch.tensor([4.0])}
    save_file(tensors, tmp_path / "model.safetensors")
    dequantized = {p: tensors[f"{p}.weight"].float() * tensors[f"{p}.weight_scale"] for p in "abc"}
    return tmp_path, dequantized, Fp8Checkpoint("compressed-tensors", "test")


@pytest.mark.parametrize("rank", [0, 1])
def test_fp8_shards_take_their_scales_rows(fp8_checkpoint, rank):
    directory, dq, fp8 = fp8_checkpoint
    weights = Weights(weight_files(directory), "cpu", torch.float32, FakeGroup(rank, 2), quantization=fp8)
    for p in "abc":
        assert torch.equal(weights.get_sharded(f"{p}.weight", 0), dq[p].chunk(2, 0)[rank])  # column: scale rows too
        assert torch.equal(weights.get_multi_weights_row(p), dq[p].chunk(2, 1)[rank])  # row: every scale row
    fused = weights.get_multi_weights_col(["a", "b", "c"])  # each scaled by its own scale before joining
    assert torch.equal(fused, torch.cat([dq[p].chunk(2, 0)[rank] for p in "abc"]))
    assert weights.unused() == []


def test_fp8_weight_without_a_quantization_is_refused(fp8_checkpoint):
    directory, _, _ = fp8_checkpoint
    weights = Weights(weight_files(directory), "cpu", torch.float32, FakeGroup(0, 1))
    with pytest.raises(CheckpointError, match="tensor a.weight is FP8, but config.json has no quantization_config"):
        weights.get_tensor("a.weight")


def test_views_read_slices_of_a_stored_tensor(tmp_path):
    fused = torch.arange(2 * 6 * 4.0).view(2, 6, 4)
    save_file({"fused": fused}, tmp_path / "model.safetensors")
    weights = Weights(weight_files(tmp_path), "cpu", torch.float32, FakeGroup(1, 2))
    weights.add_view("e1.up.weight", "fused", (1, slice(3, 6)))
    assert weights.has("e1.up.weight") and weights.get_shape("e1.up.weight") == [3, 4]
    assert torch.equal(weights.get_tensor("e1.up.weight"), fused[1, 3:6])
    assert torch.equal(weights.get_sharded("e1.up.weight", 1), fused[1, 3:6, 2:4])
    assert weights.unused() == []


def test_a_weights_on_the_meta_device_reads_no_data(sharded_checkpoint, monkeypatch):
    directory, _, _ = sharded_checkpoint
    plan = Weights(weight_files(directory), "meta", torch.float32, FakeGroup(1, 2))
    monkeypatch.setattr(Weights, "get_slice", lambda *args: pytest.fail("data was read"))
    shard = plan.get_sharded("a.weight", 0, shape=(6, 4))
    assert shard.device.type == "meta" and shard.shape == (3, 4)
    assert plan.unused() == ["b.weight"]
