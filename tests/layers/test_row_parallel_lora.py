"""The row-parallel LoRA order, in one process and in seconds: o_proj and the experts' w2 with LoRA.

A row-parallel linear keeps its rank's input columns, so each rank computes a partial sum; its LoRA A is
sliced the same way, so the rank's delta B (x_r A_r) is a partial sum too, and it must be added BEFORE the
one all-reduce: sum_r (x_r W_r^T + x_r A_r B) = x W^T + (x A) B. Adding each rank's delta after the
all-reduce (or the full delta on every rank before it) double-counts or drops the other ranks' part.

Two ranks are built with FakeGroup(rank, 2) and run in two threads of this process; torch.distributed's
all_reduce / all_gather are replaced by a collective that really sums (gathers) the two threads' tensors
at that point, as NCCL would. Every rank must end with the unsharded output, and the partials the ranks
hand to the all-reduce must sum to it.
"""

import json
import threading

import pytest
import torch
import torch.distributed
from safetensors.torch import save_file

from lorax_server.models.custom_modeling.flash_mixtral_modeling import BlockSparseMoE, DenseMoE
from lorax_server.utils.dist import FakeGroup
from tests.adapters.peft_adapters import ATTENTION_AND_HEAD, make_peft_adapter, store_for
from tests.tiny_mixtral import load_ours, paged_logits, relative_error, save_tiny_mixtral

WORLD = 2
TOKEN_ADAPTERS = [1, 0, 2, 1, 0, 2, 2, 1, 0]  # base rows between adapter rows
TOLERANCE = 1e-5


class ThreadCollectives:
    """all_reduce (sum) and all_gather over WORLD threads, each calling with its FakeGroup(rank, WORLD)."""

    def __init__(self):
        self.barrier = threading.Barrier(WORLD, timeout=60)
        self.slots = [None] * WORLD
        self.reduced = []  # per all-reduce: what each rank contributed

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        rank = group.rank()
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for part in self.slots[1:]:
            total += part  # the same order on every rank: every rank gets the same bits
        if rank == 0:
            self.reduced.append(list(self.slots))
        self.barrier.wait()
        tensor.copy_(total)

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        rank = group.rank()
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        for out, part in zip(tensor_list, self.slots):
            out.copy_(part)
        self.barrier.wait()

    def run(self, fn):
        """[fn(0), fn(1)], each rank in its own thread (grad mode is per thread: no_grad inside)."""
        results, errors = [None] * WORLD, []

        def target(rank):
            try:
                with torch.no_grad():
                    results[rank] = fn(rank)
            except BaseException as error:  # noqa: BLE001 - reported below; the peer must not wait forever
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(WORLD)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return results


@pytest.fixture
def collectives(monkeypatch):
    c = ThreadCollectives()
    monkeypatch.setattr(torch.distributed, "all_reduce", c.all_reduce)
    monkeypatch.setattr(torch.distributed, "all_gather", c.all_gather)
    return c


def write_w2_adapter(hf_model, directory, seed: int, r: int = 4, alpha: int = 8):
    """A LoRA on the experts' w2 only (the transformers-4 per-expert layout), large enough to matter."""
    g = torch.Generator().manual_seed(seed)
    config = hf_model.config
    H, F = config.hidden_size, config.intermediate_size
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for e in range(config.num_local_experts):
            prefix = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{e}.w2"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, F, generator=g) / F**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(H, r, generator=g)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["w2"], "bias": "none"}))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("row_parallel")
    hf = save_tiny_mixtral(root / "base")
    make_peft_adapter(hf, root / "o_proj", seed=1, target_modules=["o_proj"])
    write_w2_adapter(hf, root / "w2", seed=2)
    make_peft_adapter(hf, root / "everything", seed=3, target_modules=ATTENTION_AND_HEAD + ["gate", "w1", "w2", "w3"])
    return root


def build(checkpoint, rank=None, moe_cls=BlockSparseMoE, adapters=("o_proj", "w2")):
    """(model, adapter store) of one rank of two, or unsharded when rank is None; adapters at 1, 2, ..."""
    group = FakeGroup(rank, WORLD) if rank is not None else None
    model = load_ours(checkpoint / "base", group=group, moe_cls=moe_cls)
    store = store_for(model, group)
    for index, name in enumerate(adapters, start=1):
        store.load(index, checkpoint / name)
    return model, store


def batch_data(store):
    return store.batch_data(torch.tensor(TOKEN_ADAPTERS))


def assert_every_rank_has(results, want, collectives=None):
    for rank, got in enumerate(results):
        assert relative_error(got, want) <= TOLERANCE, f"rank {rank}: relative error {relative_error(got, want):.2e}"
    if collectives is not None:  # the partials handed to the (last) all-reduce sum to the unsharded output
        partials = collectives.reduced[-1]
        assert relative_error(sum(partials), want) <= TOLERANCE


def test_o_proj_lora_is_added_to_each_rank_partial_before_the_all_reduce(checkpoint, collectives):
    full_model, full_store = build(checkpoint)
    in_size = full_model.config.num_attention_heads * full_model.config.head_dim
    x = torch.randn(len(TOKEN_ADAPTERS), in_size, generator=torch.Generator().manual_seed(0))
    layer = 1
    with torch.no_grad():
        o_proj = full_model.model.layers[layer].self_attn.o_proj
        want = o_proj(x, batch_data(full_store))
        base = o_proj(x, None)
    lora_rows = torch.tensor([a == 1 for a in TOKEN_ADAPTERS])
    assert relative_error(want[lora_rows], base[lora_rows]) > 0.05  # the LoRA matters here...
    torch.testing.assert_close(want[~lora_rows], base[~lora_rows], rtol=0, atol=0)  # ...and only on its rows

    ranks = [build(checkpoint, rank) for rank in range(WORLD)]
    columns = [slice(rank * in_size // WORLD, (rank + 1) * in_size // WORLD) for rank in range(WORLD)]
    for (model, _), cols in zip(ranks, columns):  # row-parallel: each rank holds its input columns
        shard = model.model.layers[layer].self_attn.o_proj.base.weight
        torch.testing.assert_close(shard, o_proj.base.weight[:, cols], rtol=0, atol=0)

    def rank_output(rank):
        model, store = ranks[rank]
        return model.model.layers[layer].self_attn.o_proj(x[:, columns[rank]].contiguous(), batch_data(store))

    results = collectives.run(rank_output)
    assert len(collectives.reduced) == 1  # one all-reduce, LoRA included
    assert_every_rank_has(results, want, collectives)


@pytest.mark.parametrize("moe_cls", [BlockSparseMoE, DenseMoE], ids=["stacked", "per_expert"])
def test_expert_w2_lora_is_added_to_each_rank_partial_before_the_all_reduce(checkpoint, collectives, moe_cls):
    full_model, full_store = build(checkpoint, moe_cls=moe_cls)
    hidden = full_model.config.hidden_size
    x = torch.randn(len(TOKEN_ADAPTERS), hidden, generator=torch.Generator().manual_seed(1))
    layer = 0
    with torch.no_grad():
        moe = full_model.model.layers[layer].moe
        want = moe(x, batch_data(full_store))
        base = moe(x, None)
    w2_rows = torch.tensor([a == 2 for a in TOKEN_ADAPTERS])
    assert relative_error(want[w2_rows], base[w2_rows]) > 0.05
    torch.testing.assert_close(want[~w2_rows], base[~w2_rows], rtol=0, atol=0)

    ranks = [build(checkpoint, rank, moe_cls=moe_cls) for rank in range(WORLD)]

    def rank_output(rank):
        model, store = ranks[rank]
        return model.model.layers[layer].moe(x, batch_data(store))

    results = collectives.run(rank_output)
    assert len(collectives.reduced) == 1  # the block's one all-reduce
    assert_every_rank_has(results, want, collectives)


def test_two_ranks_in_one_process_give_the_logits_of_one(checkpoint, collectives):
    """The whole model with adapters on every target (attention, head, router, experts) and on w2 alone,
    mixed with base rows: what tests/models/test_tensor_parallel.py checks with two processes."""
    sequences = [list(range(3, 20)), list(range(50, 58)), list(range(20, 33))]
    prompt_lens, indices = [11, 3, 9], [1, 0, 2]
    names = ("everything", "w2")
    model, store = build(checkpoint, adapters=names)
    want = paged_logits(model, sequences, prompt_lens, block_size=4, adapters=store, adapter_indices=indices)
    ranks = [build(checkpoint, rank, adapters=names) for rank in range(WORLD)]
    results = collectives.run(lambda rank: paged_logits(ranks[rank][0], sequences, prompt_lens, block_size=4,
                                                        adapters=ranks[rank][1], adapter_indices=indices))
    for rank, logits in enumerate(results):
        for got, expected in zip(logits, want):
            assert relative_error(got, expected) <= TOLERANCE, rank
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
