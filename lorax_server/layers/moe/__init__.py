"""Mixture-of-experts pieces: routing (once), the expert maths (once), and the choice of expert backend."""

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import torch

from lorax_server.utils.backends import Backend, choose, needs_cuda_and_triton
from lorax_server.layers.fp8 import FP8, fp8_unsupported
from lorax_server.layers.moe.experts import (
    GroupedLinear,
    grouped_mm_unavailable,
    linear_fp8_dequantized,
    linear_grouped_mm,
    linear_megablocks,
    linear_per_expert,
    load_scaled_grouped_mm,
    megablocks_gmm,
    moe_experts,
    scaled_grouped_mm_unavailable,
    self_check,
)
from lorax_server.layers.moe.routing import Dispatch, Routing, dispatch, route

__all__ = ["Dispatch", "Routing", "dispatch", "route", "moe_experts", "expert_backend", "linear_per_expert",
           "ExpertsImpl"]

# Token counts up to which the fused Triton kernels beat two grouped_mm calls (above, grouped_mm runs).
# Measured on an H200 at Mixtral-8x7B shapes with the tuned tiles, CUDA-graph replays, routing given, in two runs
# (docs/logs/moe_vs_vllm_s5_h200.log and _run1_): Triton ahead at 256 tokens (0.72 against 1.07 ms) and at
# 1024 (1.68 against 1.86 ms), grouped_mm ahead at 4096 (5.60 against 5.82 ms). 2048 is not measured.
TRITON_MOE_MAX_TOKENS = 1024
# The same bound for FP8 experts: none. On an H200 at Mixtral-8x7B shapes the fused FP8 kernels beat FP8 grouped
# GEMMs (torch._scaled_grouped_mm) at every size measured, 1 to 4096 tokens (3.98 against 4.36 ms at 4096;
# docs/PERF.md, FP8 section); the grouped GEMMs serve expert LoRA that the fused kernels cannot take.
TRITON_FP8_MOE_MAX_TOKENS = 1 << 62


@dataclass(frozen=True)
class ExpertsImpl:
    """How one MoE layer computes its experts.

    `linear` is the grouped linear of the two-stage path (`moe_experts`), which also carries expert
    LoRA; `fused(x, w13, w2, routing_weights, experts)`, when set, computes the whole expert sum in
    fused kernels and is used for batches of at most `fused_max_tokens` tokens without expert LoRA.
    """

    linear: GroupedLinear
    fused: Optional[Callable] = None
    fused_max_tokens: int = 0


@lru_cache(maxsize=None)  # the self-check runs once per device and dtype, not once per layer
def megablocks_unavailable(device: torch.device, dtype: torch.dtype):
    if device.type != "cuda":
        return "megablocks needs CUDA"
    gmm, reason = megablocks_gmm()
    return reason if gmm is None else self_check(linear_megablocks, device, dtype)


def load_triton(hidden: int, ffn_shard: int, dtype: torch.dtype) -> ExpertsImpl:
    from lorax_server.kernels.fused_moe import fused_moe

    linear = linear_grouped_mm if grouped_mm_unavailable(hidden, ffn_shard, dtype) is None else linear_per_expert
    return ExpertsImpl(linear, fused_moe, TRITON_MOE_MAX_TOKENS)


def triton_unavailable(device: torch.device, activation: str) -> Optional[str]:
    if activation != "silu":
        return f"the fused kernels implement SiLU gating, not {activation}"
    return needs_cuda_and_triton(device)


@lru_cache(maxsize=None)  # the self-check runs once per device and shape, not once per layer
def fp8_grouped_unavailable(device: torch.device, hidden: int, ffn_shard: int) -> Optional[str]:
    return scaled_grouped_mm_unavailable(device, hidden, ffn_shard)


def load_triton_fp8(device: torch.device, hidden: int, ffn_shard: int) -> ExpertsImpl:
    """The fused FP8 kernels up to TRITON_FP8_MOE_MAX_TOKENS, FP8 grouped GEMMs above it and for expert LoRA
    without the LoRA kernels; the dequantizing reference for those where the grouped GEMM is not available."""
    from lorax_server.kernels.fused_moe import fused_moe

    if fp8_grouped_unavailable(device, hidden, ffn_shard) is None:
        return ExpertsImpl(load_scaled_grouped_mm(), fused_moe, TRITON_FP8_MOE_MAX_TOKENS)
    return ExpertsImpl(linear_fp8_dequantized, fused_moe, 1 << 62)


def fp8_expert_backends(hidden: int, ffn_shard: int, activation: str, device: torch.device):
    """FP8 experts (Fp8Weight): the same names as for float experts, fastest first; `reference` dequantizes."""
    return (
        Backend("triton", lambda: load_triton_fp8(device, hidden, ffn_shard),
                lambda device: triton_unavailable(device, activation) or fp8_unsupported(device), lazy=True),
        Backend("grouped_mm", lambda: ExpertsImpl(load_scaled_grouped_mm()),
                lambda device: fp8_grouped_unavailable(device, hidden, ffn_shard), lazy=True),
        Backend("reference", ExpertsImpl(linear_fp8_dequantized)),
    )


def expert_backends(hidden: int, ffn_shard: int, dtype: torch.dtype, activation: str, device: torch.device):
    """Fastest first; `reference` is last and always available. FP8 weights have their own implementations."""
    if dtype == FP8:
        return fp8_expert_backends(hidden, ffn_shard, activation, device)
    return (
        Backend("triton", lambda: load_triton(hidden, ffn_shard, dtype),
                lambda device: triton_unavailable(device, activation), lazy=True),
        Backend("megablocks", ExpertsImpl(linear_megablocks), lambda device: megablocks_unavailable(device, dtype)),
        Backend("grouped_mm", ExpertsImpl(linear_grouped_mm),
                lambda device: grouped_mm_unavailable(hidden, ffn_shard, dtype)),
        Backend("reference", ExpertsImpl(linear_per_expert)),
    )


def expert_backend(hidden: int, ffn_shard: int, dtype: torch.dtype, device: torch.device,
                   activation: str = "silu") -> ExpertsImpl:
    """The expert computation for these shapes, chosen once (LORAX_MOE_BACKEND overrides); `dtype` is the
    experts' weights' (float8_e4m3fn for FP8 experts)."""
    return choose("moe", expert_backends(hidden, ffn_shard, dtype, activation, device), device)
