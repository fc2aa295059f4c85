"""Process groups for tensor parallelism.

Layers only ever ask a group for `rank()` and `size()` and hand it to torch.distributed collectives
when `size() > 1`, so one process can run with `FakeGroup(0, 1)` and tests can build the shard of any
rank with `FakeGroup(rank, size)` without starting a process group.
"""

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict

import torch
import torch.distributed as dist

from lorax_server.utils.backends import CHOSEN, Backend, choose

logger = logging.getLogger(__name__)

# group name -> the one-shot all-reduce that sums small tensors on that group (utils/one_shot_all_reduce.py)
SMALL_ALL_REDUCE: Dict[str, object] = {}


@dataclass(frozen=True)
class FakeGroup:
    """A stand-in for a ProcessGroup of one process (or of one rank, for building shards in tests)."""

    _rank: int
    _size: int

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def initialize_torch_distributed(timeout_s: int = 600):
    """Returns (process_group, rank, world_size) from the RANK / WORLD_SIZE environment of torchrun.

    gloo on CPU, NCCL on CUDA (each rank takes the GPU of its LOCAL_RANK). One process gets a
    FakeGroup and starts no backend at all.
    """
    rank = int(os.getenv("RANK", "0"))
    world_size = int(os.getenv("WORLD_SIZE", "1"))
    if world_size == 1:
        return FakeGroup(rank, world_size), rank, world_size
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.getenv("LOCAL_RANK", str(rank))) % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    if backend == "nccl":
        setup_small_all_reduce(dist.group.WORLD, torch.device("cuda", torch.cuda.current_device()))
    return dist.group.WORLD, rank, world_size


def setup_small_all_reduce(group, device: torch.device) -> None:
    """Chooses how small tensors are summed over `group` ("allreduce" backend family): the one-shot
    all-reduce over NVLink peer memory when every rank can run it and it passes its self-check on every
    rank, else NCCL. Collective: every rank of the group calls it, and all take the same branch (the
    buffers' rendezvous and the one-shot calls themselves wait for every rank)."""
    from lorax_server.utils import one_shot_all_reduce as one_shot

    local = one_shot.why_unavailable(device)
    reason = None if agreed(local is None, group, device) else local or "unavailable on another rank"
    backends = (
        Backend("one_shot", lambda: one_shot.OneShotAllReduce(group, device), lambda d: reason, lazy=True),
        Backend("nccl", None),
    )
    reduce = choose("allreduce", backends, device)
    if reduce is None:
        return
    failure = one_shot.self_check(reduce, group, device)
    if not agreed(failure is None, group, device):
        logger.warning("one-shot all-reduce disabled, NCCL sums every tensor: %s", failure or "failed on a peer")
        CHOSEN["allreduce"] = "nccl"
        return
    SMALL_ALL_REDUCE[group.group_name] = reduce


def agreed(ok: bool, group, device: torch.device) -> bool:
    """Whether `ok` holds on every rank of `group` (one NCCL all-reduce)."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sums `x` over the ranks of `group` in place (a no-op for one rank)."""
    if group.size() > 1:
        small = SMALL_ALL_REDUCE.get(getattr(group, "group_name", None))
        if small is not None and small.fits(x):
            return small(x)
        dist.all_reduce(x, group=group)
    return x


def all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenates every rank's `x` along its last dimension (each rank's shard has the same shape)."""
    if group.size() == 1:
        return x
    shards = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(shards, x.contiguous(), group=group)
    return torch.cat(shards, dim=-1)
