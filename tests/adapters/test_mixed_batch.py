"""One batch mixing the base model and three adapters of different ranks gives each request what it gets alone."""

import pytest
import torch

from lorax_server.utils.dist import FakeGroup
from tests.adapters.peft_adapters import ATTENTION_AND_HEAD, make_peft_adapter, store_for, write_per_expert_adapter
from tests.tiny_mixtral import load_ours, paged_logits, relative_error, save_tiny_mixtral

SEQUENCES = [list(range(2, 17)), list(range(40, 50)), list(range(60, 80)), list(range(10, 22))]
PROMPT_LENS = [9, 4, 14, 6]


def make_three_adapters(tmp_path, hf):
    make_peft_adapter(hf, tmp_path / "a1", seed=1, r=2, target_modules=ATTENTION_AND_HEAD)
    make_peft_adapter(hf, tmp_path / "a2", seed=2, r=8, target_modules=["w1", "w2", "w3", "gate"])
    write_per_expert_adapter(hf, tmp_path / "a3", seed=3, r=5)
    return {1: tmp_path / "a1", 2: tmp_path / "a2", 3: tmp_path / "a3"}


@pytest.fixture
def served_adapters(tmp_path):
    """(model, store with adapters 1-3 loaded, {index: adapter dir})."""
    hf = save_tiny_mixtral(tmp_path / "base")
    paths = make_three_adapters(tmp_path, hf)
    model = load_ours(tmp_path / "base")
    store = store_for(model)
    for index, path in paths.items():
        store.load(index, path)
    return model, store, paths


def test_mixed_batch_equals_each_request_alone(served_adapters):
    model, store, _ = served_adapters
    mixed = paged_logits(model, SEQUENCES, PROMPT_LENS, adapters=store, adapter_indices=[0, 1, 2, 3])
    for i, adapter in enumerate([0, 1, 2, 3]):
        alone = paged_logits(model, [SEQUENCES[i]], [PROMPT_LENS[i]], adapters=store, adapter_indices=[adapter])[0]
        assert relative_error(mixed[i], alone) <= 1e-5
    base = paged_logits(model, SEQUENCES, PROMPT_LENS)
    assert relative_error(mixed[0], base[0]) <= 1e-6
    assert all(relative_error(mixed[i], base[i]) > 1e-2 for i in (1, 2, 3))


def test_offload_while_serving_others_and_report_memory(served_adapters):
    model, store, paths = served_adapters
    before = paged_logits(model, SEQUENCES[:2], PROMPT_LENS[:2], adapters=store, adapter_indices=[0, 1])
    assert store.memory_bytes(2) > store.memory_bytes(1) > 0
    store.offload(2)
    after = paged_logits(model, SEQUENCES[:2], PROMPT_LENS[:2], adapters=store, adapter_indices=[0, 1])
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    store.load(2, paths[1])  # the slot is free again and can take another adapter
    assert store.loaded[2].targets == store.loaded[1].targets


def test_tp_shards_of_an_adapter_add_up(tmp_path):
    """Each rank's shard holds its slice: the column-parallel B and row-parallel A slices tile the whole."""
    hf = save_tiny_mixtral(tmp_path / "base")
    make_peft_adapter(hf, tmp_path / "a", seed=4, target_modules=ATTENTION_AND_HEAD + ["w1", "w2", "w3"])
    model = load_ours(tmp_path / "base")
    whole = store_for(model).loader.load(tmp_path / "a")
    shards = [store_for(model, FakeGroup(r, 2)).loader.load(tmp_path / "a") for r in range(2)]
    q, o = (0, "self_attn.q_proj"), (0, "self_attn.o_proj")
    torch.testing.assert_close(torch.cat([s.linear[q].b for s in shards], 1), whole.linear[q].b)
    torch.testing.assert_close(torch.cat([s.linear[o].a for s in shards], 0), whole.linear[o].a)
    torch.testing.assert_close(torch.cat([s.experts[(0, "w2")].a for s in shards], 2), whole.experts[(0, "w2")].a)


def test_merging_an_adapter_makes_the_base_model_give_its_outputs(served_adapters):
    from lorax_server.models.merge_adapter import merge_into

    model, store, _ = served_adapters
    for index in (1, 2, 3):  # attention + lm_head, experts + router, per-expert experts
        want = paged_logits(model, SEQUENCES[:2], PROMPT_LENS[:2], adapters=store, adapter_indices=[index] * 2)
        merge_into(model, store.offload(index))
        got = paged_logits(model, SEQUENCES[:2], PROMPT_LENS[:2])
        for g, w in zip(got, want):
            assert relative_error(g, w) <= 1e-5


def test_stacked_adapters_give_the_loops_logits(served_adapters):
    """The path a GPU takes (every adapter stacked per target, each token's slot, the kernels' arithmetic: here
    their torch stand-ins) gives the per-adapter loop's logits through the whole model: fused q/k/v, o_proj,
    lm_head, the router, and expert LoRA of full and per-expert adapters, in one mixed batch."""
    from lorax_server.adapters.stacked import build_stacks
    from tests.adapters.torch_lora_kernels import KERNELS

    model, store, _ = served_adapters
    loop = paged_logits(model, SEQUENCES, PROMPT_LENS, adapters=store, adapter_indices=[0, 1, 2, 3])
    store.stacks = build_stacks(store.loaded, store.num_experts, "cpu", kernels=KERNELS)
    assert store.stacks.expert_slot.tolist() == [-1, 0, 1]  # adapter 1 adapts no expert
    stacked = paged_logits(model, SEQUENCES, PROMPT_LENS, adapters=store, adapter_indices=[0, 1, 2, 3])
    for got, want in zip(stacked, loop):
        assert relative_error(got, want) <= 1e-5
