"""Mixture-of-experts pieces: routing (once), the expert maths (once), and the choice of grouped linear."""

from functools import lru_cache

import torch

from lorax_server.layers.backends import Backend, choose
from lorax_server.layers.moe.experts import (
    GroupedLinear,
    grouped_mm_unavailable,
    linear_grouped_mm,
    linear_megablocks,
    linear_per_expert,
    megablocks_gmm,
    moe_experts,
    self_check,
)
from lorax_server.layers.moe.routing import Dispatch, Routing, dispatch, route

__all__ = ["Dispatch", "Routing", "dispatch", "route", "moe_experts", "expert_backend", "linear_per_expert"]


@lru_cache(maxsize=None)  # the self-check runs once per device and dtype, not once per layer
def megablocks_unavailable(device: torch.device, dtype: torch.dtype):
    if device.type != "cuda":
        return "megablocks needs CUDA"
    gmm, reason = megablocks_gmm()
    return reason if gmm is None else self_check(linear_megablocks, device, dtype)


def expert_backends(hidden: int, ffn_shard: int, dtype: torch.dtype):
    """Fastest first; `reference` is last and always available."""
    return (
        Backend("megablocks", linear_megablocks, lambda device: megablocks_unavailable(device, dtype)),
        Backend("grouped_mm", linear_grouped_mm, lambda device: grouped_mm_unavailable(hidden, ffn_shard, dtype)),
        Backend("reference", linear_per_expert),
    )


def expert_backend(hidden: int, ffn_shard: int, dtype: torch.dtype, device: torch.device) -> GroupedLinear:
    """The grouped linear for these shapes, chosen once (LORAX_MOE_BACKEND overrides)."""
    return choose("moe", expert_backends(hidden, ffn_shard, dtype), device).impl
