"""Attention ops: KV-cache write, varlen prefill and paged attention, behind one backend choice.

The model calls `attention_ops(device)` once and uses what it returns; the pure-PyTorch reference is
the oracle and the fallback everywhere.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lorax_server.layers.attention import reference
from lorax_server.utils.backends import Backend, choose, needs_cuda_and_triton


@dataclass(frozen=True)
class AttentionOps:
    write_kv: Callable
    prefill: Callable
    paged: Callable


TORCH_OPS = AttentionOps(reference.write_kv, reference.prefill_attention, reference.paged_attention)

def load_cuda_ops() -> AttentionOps:
    from lorax_server.layers.attention import cuda

    return AttentionOps(cuda.write_kv, cuda.prefill_attention, cuda.paged_attention)


def triton_unavailable(device: torch.device, head_dim: int) -> Optional[str]:
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"the decode kernel needs a power-of-two head_dim of at least 16, not {head_dim}"
    return needs_cuda_and_triton(device)


def attention_backends(head_dim: int):
    return (
        Backend("triton", load_cuda_ops, lambda device: triton_unavailable(device, head_dim), lazy=True),
        Backend("torch", TORCH_OPS),
    )


def attention_ops(device: torch.device, head_dim: int) -> AttentionOps:
    return choose("attention", attention_backends(head_dim), device)


FP8_SELF_CHECK_TOLERANCE = 2e-2  # relative error; the ops read the same e4m3 entries, so only bf16 rounding differs


def check_fp8_kv_ops(ops: AttentionOps, device: torch.device, heads: int, kv_heads: int, head_dim: int,
                     dtype: torch.dtype, k_scale: float = 0.5, v_scale: float = 0.25) -> None:
    """Runs `ops` on a tiny random case over an FP8 (e4m3) KV cache (KV write, a decode step, a prefill on a
    cached prefix) against the torch reference, and raises a RuntimeError naming the op that disagrees: an FP8
    KV cache the kernels misread would silently degrade every answer. Nothing to check for the reference."""
    if ops is TORCH_OPS:
        return
    from lorax_server.utils.attention.common import Seqlen

    g = torch.Generator().manual_seed(0)
    block_size, cached, new = 16, [37, 0, 20], [1, 5, 3]
    total = [c + n for c, n in zip(cached, new)]
    blocks = [-(-t // block_size) for t in total]
    num_blocks = sum(blocks)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[order.pop() for _ in range(n)] for n in blocks]
    slots = torch.tensor([table[p // block_size] * block_size + p % block_size
                          for table, t in zip(tables, total) for p in range(t)], device=device)
    width = max(blocks)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    keys = torch.randn(sum(total), kv_heads, head_dim, generator=g).to(device, dtype)
    values = torch.randn(sum(total), kv_heads, head_dim, generator=g).to(device, dtype)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = [torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device) for _ in range(4)]
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    ops.write_kv(keys, values, caches[0], caches[1], slots, **scales)
    reference.write_kv(keys, values, caches[2], caches[3], slots, **scales)
    if not (torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
            and torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))):
        raise RuntimeError("--kv-cache-dtype fp8: the KV-write kernel stores other e4m3 values than the reference "
                           "on this GPU; serve without --kv-cache-dtype fp8")
    scale = head_dim**-0.5

    def compare(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        error = ((got.float() - want.float()).norm() / want.float().norm()).item()
        if not error <= FP8_SELF_CHECK_TOLERANCE:  # NaN fails too
            raise RuntimeError(f"--kv-cache-dtype fp8: the {what} kernel disagrees with the reference over an FP8 "
                               f"cache on this GPU (relative error {error:.3g}, allowed {FP8_SELF_CHECK_TOLERANCE}); "
                               f"serve without --kv-cache-dtype fp8")

    starts = [sum(total[:i]) for i in range(len(total))]
    # A decode step: one new token per sequence, its key already in the cache.
    decode = Seqlen(torch.ones(len(total), dtype=torch.int32, device=device),
                    torch.tensor([t - 1 for t in total], dtype=torch.int32, device=device),
                    torch.arange(len(total) + 1, dtype=torch.int32, device=device))
    q = torch.randn(len(total), heads, head_dim, generator=g).to(device, dtype)
    compare("paged decode attention", ops.paged(q, caches[0], caches[1], block_tables, decode, scale, None, **scales),
            reference.paged_attention(q, caches[2], caches[3], block_tables, decode, scale, None, **scales))
    # A prefill on a cached prefix: the new tokens packed, the prefix read from the cache.
    rows = torch.tensor([s + c + i for s, c, n in zip(starts, cached, new) for i in range(n)], device=device)
    prefix = Seqlen(torch.tensor(new, dtype=torch.int32, device=device),
                    torch.tensor(cached, dtype=torch.int32, device=device),
                    torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=device))
    q = torch.randn(sum(new), heads, head_dim, generator=g).to(device, dtype)
    packed = dict(key=keys[rows], value=values[rows])
    compare("prefix prefill attention",
            ops.paged(q, caches[0], caches[1], block_tables, prefix, scale, None, **packed, **scales),
            reference.paged_attention(q, caches[2], caches[3], block_tables, prefix, scale, None, **packed, **scales))
