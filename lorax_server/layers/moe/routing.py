"""Top-k routing, written once, and the expert-sorted dispatch every expert backend consumes.

Legend: T = tokens, E = experts, K = experts per token, H = hidden, F = expert ffn (this rank's shard).
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    weights: torch.Tensor  # [T, K] fp32, each row sums to 1
    experts: torch.Tensor  # [T, K] int64 expert ids
    # Expert parallelism: expert id E (one past this rank's last expert) marks an assignment that another
    # rank computes. The fused kernels skip those; the dispatch gives them to expert 0 with weight 0.
    elsewhere: bool = False


def route(router_logits: torch.Tensor, top_k: int) -> Routing:
    """Mixtral's router: fp32 softmax over experts, keep the top k, renormalise them to sum to 1. Computed as
    the softmax of the top k logits, which is the same thing (the full softmax's denominator cancels in the
    renormalisation, and softmax keeps the order): three kernels a layer where the literal form takes five."""
    logits, experts = torch.topk(router_logits.float(), top_k, dim=-1)  # [T, K]
    return Routing(torch.softmax(logits, dim=-1), experts)


@dataclass(frozen=True)
class Dispatch:
    """The T*K (token, expert) assignments sorted by expert, so each expert's tokens are contiguous."""

    token_index: torch.Tensor  # [T*K] token of each sorted assignment
    expert_ids: torch.Tensor  # [T*K] expert of each sorted assignment (non-decreasing)
    weights: torch.Tensor  # [T*K] fp32 routing weight of each sorted assignment
    counts: torch.Tensor  # [E] assignments per expert
    offsets: torch.Tensor  # [E] int32 end offset of each expert's run (grouped GEMM's `offs`)


def dispatch(routing: Routing, num_experts: int) -> Dispatch:
    flat_experts = routing.experts.flatten()  # [T*K]
    flat_weights = routing.weights.flatten()
    if routing.elsewhere:  # computed here with weight 0: shapes stay fixed, the other rank adds the real part
        here = flat_experts < num_experts
        flat_experts, flat_weights = torch.where(here, flat_experts, 0), torch.where(here, flat_weights, 0.0)
    order = torch.argsort(flat_experts, stable=True)
    # scatter_add rather than bincount: no host synchronisation, so the step can be captured in a CUDA graph
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_experts.device)
    counts.scatter_add_(0, flat_experts, torch.ones_like(flat_experts))
    return Dispatch(
        token_index=order // routing.experts.shape[1],
        expert_ids=flat_experts[order],
        weights=flat_weights[order],
        counts=counts,
        offsets=counts.cumsum(0).to(torch.int32),
    )
