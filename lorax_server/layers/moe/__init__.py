"""Mixture-of-experts pieces: routing (once), and the choice of expert-compute backend."""

from functools import lru_cache
from typing import Callable

import torch

from lorax_server.layers.backends import Backend, choose
from lorax_server.layers.moe.experts import (
    experts_grouped_mm,
    experts_megablocks,
    experts_reference,
    grouped_mm_unavailable,
    megablocks_gmm,
    self_check,
)
from lorax_server.layers.moe.routing import Dispatch, Routing, dispatch, route

__all__ = ["Dispatch", "Routing", "dispatch", "route", "expert_backend", "EXPERT_BACKEND_NAMES"]


@lru_cache(maxsize=None)  # the self-check runs once per device and dtype, not per layer
def megablocks_unavailable(device: torch.device, dtype: torch.dtype):
    if device.type != "cuda":
        return "megablocks needs CUDA"
    gmm, reason = megablocks_gmm()
    return reason if gmm is None else self_check(experts_megablocks, device, dtype)


def expert_backends(hidden: int, ffn_shard: int, dtype: torch.dtype):
    """Fastest first; `reference` is last and always available."""
    return (
        Backend("megablocks", experts_megablocks, lambda device: megablocks_unavailable(device, dtype)),
        Backend("grouped_mm", experts_grouped_mm, lambda device: grouped_mm_unavailable(hidden, ffn_shard, dtype)),
        Backend("reference", experts_reference),
    )


EXPERT_BACKEND_NAMES = ("megablocks", "grouped_mm", "reference")


def expert_backend(hidden: int, ffn_shard: int, dtype: torch.dtype, device: torch.device) -> Callable:
    """The expert computation for these shapes, chosen once (LORAX_MOE_BACKEND overrides)."""
    return choose("moe", expert_backends(hidden, ffn_shard, dtype), device).impl
