"""One-shot all-reduce of small tensors through NVLink peer memory (PyTorch symmetric memory).

A decode step of a tensor-parallel model makes two all-reduces per layer of a few hundred KB each, a
size at which NCCL's ring protocol is bound by its latency. In a one-shot all-reduce each rank copies
its input into a buffer every rank can read, waits at a barrier, and sums all ranks' buffers itself:
one NVLink read of the data and one barrier. It uses peer-to-peer loads only, never NVLink multicast
(which is off on the lent machines and must stay off).

Two buffers alternate: a rank may start the next all-reduce (copy into its buffer) while a slower peer
still reads the previous one from the other buffer. Two calls on the same buffer are therefore
separated by a call on the other buffer, whose barrier every rank passes only after finishing the
first: except where a CUDA graph ends with an odd number of calls and the next replay starts on the
same buffer. There the NCCL all-gather of the logits, which ends every sharded forward pass, orders
them. Which buffer a call uses is host state fixed at capture, so every rank must make the same calls
in the same order (as for any collective). Messages above `ONE_SHOT_MAX_BYTES` go to NCCL, which is
faster for bulk data.
"""

from typing import Optional

import torch

# A decode batch of 128 tokens at hidden size 4096 in bf16; prefill chunks are larger and go to NCCL.
ONE_SHOT_MAX_BYTES = 1 << 20
ALIGNMENT_BYTES = 16  # the kernel moves 16-byte vectors


class OneShotAllReduce:
    def __init__(self, group, device: torch.device, max_bytes: int = ONE_SHOT_MAX_BYTES):
        from torch.distributed import _symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.max_bytes = max_bytes
        self.buffers = [symm_mem.empty(max_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        for buffer in self.buffers:
            symm_mem.rendezvous(buffer, self.group_name)
        self.calls = 0

    def fits(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and x.is_contiguous() and x.nbytes <= self.max_bytes and x.nbytes % ALIGNMENT_BYTES == 0
                and x.dtype in (torch.bfloat16, torch.float16, torch.float32))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sums `x` over the group, in place (x must `fit`)."""
        buffer = self.buffers[self.calls % 2].view(x.dtype)[: x.numel()]
        self.calls += 1
        flat = x.view(-1)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(buffer, flat, "sum", self.group_name, flat)
        return x


def why_unavailable(device: torch.device) -> Optional[str]:
    """None when this rank can run one-shot all-reduces, else why not. A local check (peer access to every
    GPU this process sees): the caller agrees on the answer across ranks."""
    if device.type != "cuda":
        return "needs CUDA devices"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
        return "this PyTorch has no symm_mem.one_shot_all_reduce_copy_out"
    peers = [d for d in range(torch.cuda.device_count()) if d != device.index]
    if not all(torch.cuda.can_device_access_peer(device.index, d) for d in peers):
        return "the GPUs cannot access each other's memory (no peer-to-peer)"
    return None


def self_check(reduce: OneShotAllReduce, group, device: torch.device) -> Optional[str]:
    """Runs a few all-reduces against the known sum; None when every one is exact. Every rank runs all of
    them whatever it finds (they are collective), then reports the first failure."""
    world, rank = group.size(), group.rank()
    failures = []
    for numel in (8, 4096 * 3, reduce.max_bytes // 4):
        x = torch.full((numel,), float(rank + 1), device=device)
        x[: world] += torch.arange(world, device=device, dtype=torch.float32)
        want = torch.full((numel,), world * (world + 1) / 2, device=device)
        want[: world] += world * torch.arange(world, device=device, dtype=torch.float32)
        if not torch.equal(reduce(x), want):
            failures.append(f"self-check failed: a {numel}-element all-reduce gave a wrong sum")
    return failures[0] if failures else None
