"""MoE routing against transformers' router, and every expert backend against the reference."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from lorax_server.utils.backends import BackendUnavailable
from lorax_server.layers.moe import dispatch, expert_backend, route
from lorax_server.layers.moe.experts import linear_grouped_mm, linear_per_expert, moe_experts, self_check

T, E, H, FF = 50, 6, 32, 48


def random_experts(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * FF, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, FF, generator=g) / FF**0.5
    return x, w13, w2


def loop_oracle(x, w13, w2, weights, experts):
    """Token by token, expert by expert: the definition of the MoE output."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], experts[t]):
            gate, up = (w13[e] @ x[t]).chunk(2)
            out[t] += w * (w2[e] @ (F.silu(gate) * up))
    return out


def test_route_matches_transformers_router():
    config = transformers.MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=2)
    router = transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter(config)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(T, H)
    _, scores, indices = router(x)
    routing = route(F.linear(x, router.weight), 2)
    assert torch.equal(routing.experts, indices)
    torch.testing.assert_close(routing.weights, scores)


@pytest.mark.parametrize("top_k", [1, 2, E])
@pytest.mark.parametrize("skew", [False, True])
def test_backends_match_the_token_loop(top_k, skew):
    x, w13, w2 = random_experts()
    logits = torch.randn(T, E)
    if skew:
        logits[:, :2] += 10.0  # nearly every token picks experts 0 and 1; most experts get no token
    routing = route(logits, top_k)
    want = loop_oracle(x, w13, w2, routing.weights, routing.experts)
    d = dispatch(routing, E)
    for linear in (linear_per_expert, linear_grouped_mm):
        torch.testing.assert_close(moe_experts(x, w13, w2, d, F.silu, linear), want, rtol=1e-5, atol=1e-5)


def test_experts_with_no_tokens_and_an_empty_batch():
    x, w13, w2 = random_experts()
    routing = route(torch.full((T, E), -1e4).index_fill_(1, torch.tensor([3]), 0.0), 1)
    d = dispatch(routing, E)
    assert d.counts.tolist() == [0, 0, 0, T, 0, 0]
    torch.testing.assert_close(moe_experts(x, w13, w2, d, F.silu, linear_grouped_mm),
                               moe_experts(x, w13, w2, d, F.silu, linear_per_expert))
    empty = dispatch(route(torch.zeros(0, E), 2), E)
    for linear in (linear_per_expert, linear_grouped_mm):
        assert moe_experts(x[:0], w13, w2, empty, F.silu, linear).shape == (0, H)


def test_self_check_accepts_a_correct_backend_and_rejects_a_wrong_one():
    assert self_check(linear_grouped_mm, torch.device("cpu"), torch.float32) is None
    wrong = lambda x, w, d: 2 * linear_per_expert(x, w, d)  # noqa: E731
    assert "relative error" in self_check(wrong, torch.device("cpu"), torch.float32)


def test_backend_choice_and_override(monkeypatch):
    cpu = torch.device("cpu")
    assert expert_backend(H, FF, torch.float32, cpu).linear is linear_grouped_mm
    assert expert_backend(H, 3, torch.float32, cpu).linear is linear_per_expert  # unaligned: grouped_mm unavailable
    monkeypatch.setenv("LORAX_MOE_BACKEND", "reference")
    assert expert_backend(H, FF, torch.float32, cpu).linear is linear_per_expert
    monkeypatch.setenv("LORAX_MOE_BACKEND", "megablocks")
    with pytest.raises(BackendUnavailable, match="megablocks is not available on cpu: megablocks needs CUDA"):
        expert_backend(H, FF, torch.float32, cpu)
    monkeypatch.setenv("LORAX_MOE_BACKEND", "magic")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        expert_backend(H, FF, torch.float32, cpu)


def test_triton_backend_is_refused_on_cpu(monkeypatch):
    monkeypatch.setenv("LORAX_MOE_BACKEND", "triton")
    with pytest.raises(BackendUnavailable, match="triton is not available on cpu: Triton kernels need a CUDA device"):
        expert_backend(H, FF, torch.float32, torch.device("cpu"))
