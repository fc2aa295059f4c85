"""Expert computation: y = sum_k weight_k * W2_e (act(W1_e x) * W3_e x) over each token's chosen experts.

The maths is written once (`moe_experts`) over the expert-sorted assignments of a `Dispatch`; a backend
only supplies the grouped linear `y[run of e] = x[run of e] @ w[e].T` for every expert's run of rows.
Expert weights are w13 [E, 2F, H] (gate rows, then up rows) and w2 [E, H, F], in the compute dtype or as
`Fp8Weight`s (e4m3 with per-expert, per-channel scales; the FP8 grouped linears below). Everything is dropless,
and only the experts a token chose are computed. The output is this rank's partial sum [T, H]; the MoE
block does the one all-reduce. Expert LoRA deltas (when a batch has them) are added to the two grouped
linears' outputs in the same sorted order.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lorax_server.layers.fp8 import (
    Fp8Weight,
    dequantize,
    fake_quantize_rows,
    fp8_unsupported,
    quantize_rows_reference,
    quantize_weight,
)
from lorax_server.layers.moe.routing import Dispatch

# (x_sorted [N, in], w [E, out, in] or per-expert modules, dispatch) -> [N, out]
GroupedLinear = Callable[[torch.Tensor, object, Dispatch], torch.Tensor]


def moe_experts(x: torch.Tensor, w13, w2, d: Dispatch, act: Callable, linear: GroupedLinear,
                lora=None) -> torch.Tensor:
    """x [T, H] -> this rank's partial MoE output [T, H]; `lora` adds expert-LoRA deltas (or is None)."""
    xs = x[d.token_index]  # [T*K, H], grouped by expert
    h13 = linear(xs, w13, d)  # [T*K, 2F]
    if lora is not None:
        lora.add(h13, xs, "w13")
    gate, up = h13.chunk(2, dim=-1)
    h = act(gate) * up  # [T*K, F]
    y = linear(h, w2, d)  # [T*K, H]
    if lora is not None:
        lora.add(y, h, "w2")
    y = y * d.weights.unsqueeze(1).to(y.dtype)
    return torch.zeros_like(x).index_add_(0, d.token_index, y.to(x.dtype))


def linear_per_expert(x: torch.Tensor, w, d: Dispatch) -> torch.Tensor:
    """The reference: one matmul per expert that received rows. `w` is a stacked weight [E, out, in]
    or a sequence of per-expert linear modules (DenseMoE)."""
    stacked = isinstance(w, torch.Tensor)
    out = x.new_zeros(x.shape[0], w.shape[1] if stacked else w[0].weight.shape[0])
    start = 0
    for e, end in enumerate(d.offsets.tolist()):
        if end > start:
            rows = x[start:end]
            out[start:end] = F.linear(rows, w[e]) if stacked else w[e](rows)
        start = end
    return out


def linear_grouped_mm(x: torch.Tensor, w: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """One grouped GEMM for all experts; no host synchronisation."""
    return F.grouped_mm(x, w.transpose(1, 2), offs=d.offsets)


def grouped_mm_unavailable(hidden: int, ffn: int, dtype: torch.dtype) -> Optional[str]:
    """grouped_mm needs every stride to be a multiple of 16 bytes."""
    if not hasattr(F, "grouped_mm"):
        return "torch.nn.functional.grouped_mm is missing (torch < 2.9)"
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (hidden * itemsize) % 16 or (ffn * itemsize) % 16:
        return f"hidden {hidden} and ffn shard {ffn} must be multiples of {16 // itemsize} elements in {dtype}"
    return None


def linear_fp8_dequantized(x: torch.Tensor, w: Fp8Weight, d: Dispatch) -> torch.Tensor:
    """The FP8 reference: each expert's weight scaled back to x's dtype (activations unquantized), one matmul
    per expert that received rows."""
    out = x.new_zeros(x.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(d.offsets.tolist()):
        if end > start:
            out[start:end] = F.linear(x[start:end], dequantize(w.weight[e], w.weight_scale[e], x.dtype))
        start = end
    return out


def load_scaled_grouped_mm():
    """One FP8 grouped GEMM for all experts (torch._scaled_grouped_mm, row-wise scales), activations quantized
    per row (or with the static input scale) by the Triton kernel where Triton is installed."""
    try:
        from lorax_server.kernels.fp8_quant import quantize_rows
    except ImportError:
        quantize_rows = quantize_rows_reference

    def linear_scaled_grouped_mm(x: torch.Tensor, w: Fp8Weight, d: Dispatch) -> torch.Tensor:
        x8, x_scale = quantize_rows(x, w.input_scale)
        y = torch._scaled_grouped_mm(x8, w.weight.transpose(1, 2), x_scale, w.weight_scale, offs=d.offsets,
                                     out_dtype=torch.bfloat16)
        return y.to(x.dtype)

    return linear_scaled_grouped_mm


def scaled_grouped_mm_unavailable(device: torch.device, hidden: int, ffn: int) -> Optional[str]:
    reason = fp8_unsupported(device)
    if reason is not None:
        return reason
    if not hasattr(torch, "_scaled_grouped_mm"):
        return "torch._scaled_grouped_mm is missing (torch < 2.8)"
    if hidden % 16 or ffn % 16:
        return f"hidden {hidden} and ffn shard {ffn} must be multiples of 16"
    return fp8_self_check(load_scaled_grouped_mm(), device)


def fp8_self_check(linear: GroupedLinear, device: torch.device) -> Optional[str]:
    """An FP8 grouped linear on a small random MoE against the dequantized reference (activations quantized
    the same way), or why it failed. Catches a kernel that is not built for this GPU."""
    from lorax_server.layers.moe.routing import dispatch, route

    g = torch.Generator(device="cpu").manual_seed(0)
    T, E, H, Fn = 37, 4, 64, 128
    x = torch.randn(T, H, generator=g).to(device, torch.bfloat16)
    w = Fp8Weight(quantize_weight(torch.randn(E, Fn, H, generator=g).to(device)))
    d = dispatch(route(torch.randn(T, E, generator=g).to(device), 2), E)
    try:
        got = linear(x[d.token_index], w, d).float()
    except Exception as error:  # any failure (not built for this GPU, a shape it refuses) makes it unavailable
        return f"self-check raised {error!r}"
    want = linear_fp8_dequantized(fake_quantize_rows(x[d.token_index]), w, d)
    err = ((got - want).norm() / want.norm()).item()
    return None if err < 2e-2 else f"self-check relative error {err:.3g}"


def megablocks_gmm():
    """megablocks' grouped GEMM (its dropless-MoE 'grouped' mode) and None, or None and the reason."""
    try:
        from megablocks import grouped_gemm_util as gg
    except Exception as error:  # any failure to import or compile makes it unavailable, never fatal
        return None, f"megablocks does not import: {error!r}"
    if not gg.grouped_gemm_is_available():
        return None, "megablocks imports but its grouped_gemm extension is missing"
    return gg.ops.gmm, None


def linear_megablocks(x: torch.Tensor, w: torch.Tensor, d: Dispatch) -> torch.Tensor:
    gmm, reason = megablocks_gmm()
    if gmm is None:
        raise RuntimeError(reason)
    return gmm(x.contiguous(), w, d.counts.cpu(), trans_b=True)  # megablocks takes sizes on the host


def self_check(linear: GroupedLinear, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Runs a backend on a small random MoE against the reference; returns why it failed, or None."""
    from lorax_server.layers.moe.routing import dispatch, route

    g = torch.Generator(device="cpu").manual_seed(0)
    T, E, H, Fn = 37, 4, 64, 128
    x = torch.randn(T, H, generator=g).to(device, dtype)
    w13 = (torch.randn(E, 2 * Fn, H, generator=g) / H**0.5).to(device, dtype)
    w2 = (torch.randn(E, H, Fn, generator=g) / Fn**0.5).to(device, dtype)
    d = dispatch(route(torch.randn(T, E, generator=g).to(device), 2), E)
    try:
        got = moe_experts(x, w13, w2, d, F.silu, linear).float()
    except Exception as error:
        return f"self-check raised {error!r}"
    want = moe_experts(x.float(), w13.float(), w2.float(), d, F.silu, linear_per_expert)
    err = ((got - want).norm() / want.norm()).item()
    return None if err < 2e-2 else f"self-check relative error {err:.3g}"
