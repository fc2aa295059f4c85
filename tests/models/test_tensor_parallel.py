"""Tensor parallelism: two processes under gloo give the logits of one (relative error <= 1e-5)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lorax_server.models.custom_modeling.flash_mixtral_modeling import DenseMoE
from lorax_server.utils.dist import initialize_torch_distributed
from tests.tiny_mixtral import load_ours, paged_logits, relative_error, save_tiny_mixtral

SEQUENCES = [list(range(3, 20)), list(range(50, 58)), list(range(20, 43))]
PROMPT_LENS = [11, 3, 17]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank, world_size, port, directory, moe, out_file):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    group, _, _ = initialize_torch_distributed()
    kwargs = {"moe_cls": DenseMoE} if moe == "dense" else {}
    logits = paged_logits(load_ours(directory, group=group, **kwargs), SEQUENCES, PROMPT_LENS, block_size=4)
    if rank == 0:
        torch.save(logits, out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("moe", ["sparse", "dense"])
def test_two_ranks_match_one(tmp_path, moe):
    # vocab 97 does not split evenly: the last rank's vocabulary block is padded.
    save_tiny_mixtral(tmp_path, vocab_size=97, sliding_window=9)
    kwargs = {"moe_cls": DenseMoE} if moe == "dense" else {}
    single = paged_logits(load_ours(tmp_path, **kwargs), SEQUENCES, PROMPT_LENS, block_size=4)
    out_file = tmp_path / "tp_logits.pt"
    mp.start_processes(run_rank, args=(2, free_port(), tmp_path, moe, out_file), nprocs=2, start_method="spawn")
    for got, want in zip(torch.load(out_file), single):
        assert relative_error(got, want) <= 1e-5
        assert torch.equal(got.argmax(-1), want.argmax(-1))
