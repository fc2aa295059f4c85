"""Expert computation backends: y = sum_k weight_k * W2_e (act(W1_e x) * W3_e x) over each token's experts.

Every backend is dropless and takes the same inputs: x [T, H], the expert weights w13 [E, 2F, H] (gate
rows then up rows) and w2 [E, H, F], and a `Dispatch`. It returns this rank's partial sum [T, H]; the
MoE block does the one all-reduce. Only the experts a token chose are computed.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lorax_server.layers.moe.routing import Dispatch


def run_per_expert(x: torch.Tensor, d: Dispatch, expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The reference: one call of `expert(e, tokens)` for each expert that received tokens."""
    out = torch.zeros_like(x)
    start = 0
    for e, end in enumerate(d.counts.cumsum(0).tolist()):
        if end > start:
            tokens = d.token_index[start:end]
            y = expert(e, x[tokens]) * d.weights[start:end, None]
            out.index_add_(0, tokens, y.to(x.dtype))
        start = end
    return out


def gated_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, act: Callable) -> torch.Tensor:
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(act(gate) * up, w2)


def experts_reference(x, w13, w2, d: Dispatch, act) -> torch.Tensor:
    return run_per_expert(x, d, lambda e, tokens: gated_mlp(tokens, w13[e], w2[e], act))


def experts_grouped_mm(x, w13, w2, d: Dispatch, act) -> torch.Tensor:
    """Two grouped GEMMs over the expert-sorted tokens; no host synchronisation."""
    sorted_x = x[d.token_index]  # [T*K, H]
    gate, up = F.grouped_mm(sorted_x, w13.transpose(1, 2), offs=d.offsets).chunk(2, dim=-1)
    y = F.grouped_mm(act(gate) * up, w2.transpose(1, 2), offs=d.offsets)  # [T*K, H]
    y = y * d.weights.unsqueeze(1).to(y.dtype)
    return torch.zeros_like(x).index_add_(0, d.token_index, y)


def grouped_mm_unavailable(hidden: int, ffn: int, dtype: torch.dtype) -> Optional[str]:
    """grouped_mm needs every stride to be a multiple of 16 bytes."""
    if not hasattr(F, "grouped_mm"):
        return "torch.nn.functional.grouped_mm is missing (torch < 2.9)"
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (hidden * itemsize) % 16 or (ffn * itemsize) % 16:
        return f"hidden {hidden} and ffn shard {ffn} must be multiples of {16 // itemsize} elements in {dtype}"
    return None


def megablocks_gmm():
    """megablocks' grouped GEMM (its dropless-MoE 'grouped' mode), or the reason it cannot be used."""
    try:
        from megablocks import grouped_gemm_util as gg
    except Exception as error:  # any failure to import or compile makes it unavailable, never fatal
        return None, f"megablocks does not import: {error!r}"
    if not gg.grouped_gemm_is_available():
        return None, "megablocks imports but its grouped_gemm extension is missing"
    return gg.ops.gmm, None


def experts_megablocks(x, w13, w2, d: Dispatch, act) -> torch.Tensor:
    gmm, reason = megablocks_gmm()
    if gmm is None:
        raise RuntimeError(reason)
    batch_sizes = d.counts.cpu()  # megablocks takes per-expert sizes on the host
    sorted_x = x[d.token_index]
    gate, up = gmm(sorted_x, w13, batch_sizes, trans_b=True).chunk(2, dim=-1)
    y = gmm((act(gate) * up).contiguous(), w2, batch_sizes, trans_b=True)
    y = y * d.weights.unsqueeze(1).to(y.dtype)
    return torch.zeros_like(x).index_add_(0, d.token_index, y)


def self_check(experts: Callable, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Runs a backend on a small random problem against the reference; returns why it failed, or None."""
    from lorax_server.layers.moe.routing import dispatch, route

    g = torch.Generator(device="cpu").manual_seed(0)
    T, E, H, Fn = 37, 4, 64, 128
    x = torch.randn(T, H, generator=g).to(device, dtype)
    w13 = (torch.randn(E, 2 * Fn, H, generator=g) / H**0.5).to(device, dtype)
    w2 = (torch.randn(E, H, Fn, generator=g) / Fn**0.5).to(device, dtype)
    routing = route(torch.randn(T, E, generator=g).to(device), 2)
    d = dispatch(routing, E)
    try:
        got = experts(x, w13, w2, d, F.silu).float()
    except Exception as error:
        return f"self-check raised {error!r}"
    want = experts_reference(x.float(), w13.float(), w2.float(), d, F.silu)
    err = ((got - want).norm() / want.norm()).item()
    return None if err < 2e-2 else f"self-check relative error {err:.3g}"
