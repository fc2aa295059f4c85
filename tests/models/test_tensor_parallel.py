"""Tensor parallelism: two processes under gloo give the logits of one (relative error <= 1e-5),
for both MoE classes, and with a batch mixing the base model and adapters on every target."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lorax_server.models.custom_modeling.flash_mixtral_modeling import DenseMoE, ExpertParallelMoE
from lorax_server.utils.dist import initialize_torch_distributed
from tests.adapters.peft_adapters import ATTENTION_AND_HEAD, make_peft_adapter, store_for, write_per_expert_adapter
from tests.tiny_mixtral import load_ours, paged_logits, relative_error, save_tiny_mixtral

SEQUENCES = [list(range(3, 20)), list(range(50, 58)), list(range(20, 43))]
PROMPT_LENS = [11, 3, 17]
ADAPTER_INDICES = [1, 0, 2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MOE_CLASSES = {"dense": DenseMoE, "expert_parallel": ExpertParallelMoE}


def logits_of(directory, moe, with_adapters, group=None):
    model = load_ours(directory / "base", group=group, **({"moe_cls": MOE_CLASSES[moe]} if moe in MOE_CLASSES else {}))
    if not with_adapters:
        return paged_logits(model, SEQUENCES, PROMPT_LENS, block_size=4)
    store = store_for(model, group)
    store.load(1, directory / "a1")
    store.load(2, directory / "a2")
    return paged_logits(model, SEQUENCES, PROMPT_LENS, block_size=4, adapters=store, adapter_indices=ADAPTER_INDICES)


def run_rank(rank, world_size, port, directory, moe, with_adapters):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    group, _, _ = initialize_torch_distributed()
    logits = logits_of(directory, moe, with_adapters, group)
    torch.save(logits, directory / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("moe, with_adapters", [("sparse", False), ("dense", False), ("expert_parallel", False),
                                                ("sparse", True)])
def test_two_ranks_match_one(tmp_path, moe, with_adapters):
    # vocab 97 does not split evenly: the last rank's vocabulary block is padded.
    hf = save_tiny_mixtral(tmp_path / "base", vocab_size=97, sliding_window=9)
    if with_adapters:
        make_peft_adapter(hf, tmp_path / "a1", seed=1, target_modules=ATTENTION_AND_HEAD + ["gate", "w1", "w2", "w3"])
        write_per_expert_adapter(hf, tmp_path / "a2", seed=2)
    single = logits_of(tmp_path, moe, with_adapters)
    if moe == "expert_parallel":  # on one rank it is the ordinary MoE
        for got, want in zip(single, logits_of(tmp_path, "sparse", False)):
            assert relative_error(got, want) <= 1e-6
    mp.start_processes(run_rank, args=(2, free_port(), tmp_path, moe, with_adapters), nprocs=2, start_method="spawn")
    for rank in range(2):  # every rank ends with the same, complete logits
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), single):
            assert relative_error(got, want) <= 1e-5
            assert torch.equal(got.argmax(-1), want.argmax(-1))
