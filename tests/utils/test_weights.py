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
