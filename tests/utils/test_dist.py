"""Choosing the all-reduce of small tensors is collective: every rank must take the same branch, or the
ranks wait for each other forever. Two gloo processes on the CPU (where the one-shot all-reduce cannot run)."""

import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.models.test_tensor_parallel import free_port


def choose_on_rank(rank, port, requested, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if requested:
        os.environ["LORAX_ALLREDUCE_BACKEND"] = requested
    import torch

    from lorax_server.utils.backends import CHOSEN, BackendUnavailable
    from lorax_server.utils.dist import SMALL_ALL_REDUCE, setup_small_all_reduce

    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        setup_small_all_reduce(dist.group.WORLD, torch.device("cpu"))
        results[rank] = (CHOSEN.get("allreduce"), len(SMALL_ALL_REDUCE))
    except BackendUnavailable as error:
        results[rank] = ("refused", str(error))
    dist.destroy_process_group()


@pytest.mark.parametrize("requested", [None, "one_shot"])
def test_every_rank_makes_the_same_choice(requested):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(choose_on_rank, args=(free_port(), requested, results), nprocs=2, start_method="spawn")
        results = dict(results)
    if requested is None:
        assert results == {0: ("nccl", 0), 1: ("nccl", 0)}
    else:  # asking for it where it cannot run: a clear error on every rank, no hang
        assert all(kind == "refused" and "one_shot is not available" in message and "CUDA" in message
                   for kind, message in results.values()), results
