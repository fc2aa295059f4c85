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
