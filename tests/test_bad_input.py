"""Bad checkpoints and configs are refused with a message that names the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorax_server.models import get_model
from lorax_server.models.custom_modeling.flash_mixtral_modeling import MixtralConfig
from lorax_server.engine.cache import CacheFull, PagedKVCache
from lorax_server.utils.dist import FakeGroup
from lorax_server.utils.weights import CheckpointError
from tests.tiny_mixtral import TINY, load_ours, save_tiny_mixtral

GATE = "model.layers.1.block_sparse_moe.gate.weight"


def rewrite_checkpoint(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    save_tiny_mixtral(tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.pop(GATE))
    with pytest.raises(CheckpointError, match=f"tensor {GATE} is missing"):
        load_ours(tmp_path)


def test_wrong_shape_names_expected_and_found(tmp_path):
    save_tiny_mixtral(tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.__setitem__(GATE, torch.zeros(3, 64)))
    with pytest.raises(CheckpointError, match=rf"tensor {GATE}: expected shape \[4, 64\], found \[3, 64\]"):
        load_ours(tmp_path)


def test_heads_not_divisible_by_world_size(tmp_path):
    save_tiny_mixtral(tmp_path)
    with pytest.raises(CheckpointError, match="num_attention_heads 4 is not divisible by the world size 3"):
        load_ours(tmp_path, group=FakeGroup(0, 3))


def test_expert_ffn_not_divisible_by_world_size(tmp_path):
    save_tiny_mixtral(tmp_path, intermediate_size=90)
    with pytest.raises(CheckpointError, match="intermediate_size of the experts 90 is not divisible by the world size 4"):
        load_ours(tmp_path, group=FakeGroup(0, 4))


def test_unknown_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"model_type 'llama' is not supported; supported: \['mixtral'\]"):
        get_model(str(tmp_path))
    with pytest.raises(ValueError, match="model_type 'llama' is not 'mixtral'"):
        MixtralConfig.from_dict({"model_type": "llama"})


def test_missing_model_directory_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="must be a local checkpoint directory"):
        get_model(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("window", [0, -4])
def test_non_positive_sliding_window_is_refused(window):
    with pytest.raises(ValueError, match=f"sliding_window must be a positive number of tokens or null, got {window}"):
        MixtralConfig(**{**TINY, "sliding_window": window})


@pytest.mark.parametrize("block_size", [0, -16])
def test_non_positive_block_size_is_refused(block_size):
    with pytest.raises(ValueError, match=f"block_size must be a positive number of tokens, got {block_size}"):
        PagedKVCache(1, 4, block_size, 2, 16, torch.float32, "cpu")


def test_cache_full_is_refused_and_leaves_the_free_list_intact():
    cache = PagedKVCache(1, 4, 16, 2, 16, torch.float32, "cpu")
    with pytest.raises(CacheFull, match="needs 5 cache blocks, 4 free of 4"):
        cache.allocate(5)
    assert len(cache.free_blocks) == 4


def test_unsupported_dtype_and_quantize_are_refused(tmp_path):
    save_tiny_mixtral(tmp_path)
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        get_model(str(tmp_path), dtype="int8")
    with pytest.raises(ValueError, match="quantization 'gptq' is not supported"):
        get_model(str(tmp_path), quantize="gptq")
