"""The bookkeeping of decode CUDA graphs (captures themselves need a GPU: tests/gpu/test_engine_on_gpu.py)."""

from lorax_server.engine.graphs import DecodeGraphs


def graphs_with_steps():
    graphs = DecodeGraphs(model=None, kv_cache=None, block_size=16, max_positions=4096)
    graphs.steps = {(8, 256, None): "base", (8, 256, frozenset()): "lora", (8, 256, frozenset({0, 1})): "experts"}
    return graphs


def test_changed_stacks_drop_only_the_lora_graphs():
    graphs, old, new = graphs_with_steps(), object(), object()
    graphs.stacks = old
    graphs.use_stacks(old)
    assert len(graphs.steps) == 3
    graphs.use_stacks(new)  # an adapter was loaded or offloaded
    assert graphs.steps == {(8, 256, None): "base"} and graphs.stacks is new
    graphs.steps[(8, 256, frozenset())] = "lora"
    graphs.use_stacks(None)  # every adapter offloaded
    assert graphs.steps == {(8, 256, None): "base"}


def test_buckets_round_up_and_stop_at_the_largest():
    graphs = DecodeGraphs(model=None, kv_cache=None, block_size=16, max_positions=4096)
    assert graphs.bucket(5, 300) == (8, 512)
    assert graphs.bucket(1, 10) == (1, 256)
    assert graphs.bucket(3, 5000) == (4, 4096)  # never past the model's positions
    assert graphs.bucket(129, 300) == (160, 512) and graphs.bucket(500, 300) == (512, 512)
    assert graphs.bucket(418, 300) == (448, 512)  # a large batch pads by a few rows, not up to the next 128
    assert graphs.bucket(513, 300) == (640, 512) and graphs.bucket(1024, 300) == (1024, 512)
    assert graphs.bucket(1025, 300) is None  # larger than the largest batch bucket: the step graphs' pieces, or eager


def test_batch_buckets_come_from_the_environment(monkeypatch):
    import pytest

    from lorax_server.engine.graphs import DEFAULT_BATCH_BUCKETS, batch_buckets_from_env

    assert batch_buckets_from_env() == DEFAULT_BATCH_BUCKETS and DEFAULT_BATCH_BUCKETS[-1] == 1024
    monkeypatch.setenv("LORAX_CUDA_GRAPH_BATCHES", "8, 1,64")
    assert batch_buckets_from_env() == (1, 8, 64)
    monkeypatch.setenv("LORAX_CUDA_GRAPH_BATCHES", "1,x")
    with pytest.raises(ValueError, match="LORAX_CUDA_GRAPH_BATCHES"):
        batch_buckets_from_env()
