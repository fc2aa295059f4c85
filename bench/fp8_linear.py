"""Mixtral-8x7B's attention projections in FP8 against bf16, one card: the fused q/k/v [6144, 4096] and o_proj
[4096, 4096] at several token counts.

Two FP8 paths at every size: activations quantized per token (one Triton launch), then torch._scaled_mm with
row-wise scales and bf16 output (W8A8); and the Triton weight-only kernel (W8A16) the model uses up to
W8A16_MAX_ROWS rows. The floor is the larger of the weight's bytes over the measured copy bandwidth (one byte
per weight in FP8, two in bf16) and the FLOPs over the measured matmul rate of each dtype.

    python -m bench.fp8_linear [--tokens 1 16 64 256 1024 4096] [--tune]
"""

import argparse

import torch
import torch.nn.functional as F

from bench.common import card, copy_bandwidth, fp8_matmul_rate, matmul_rate, print_table, time_graph_ms
from lorax_server.kernels.fp8_linear import w8a16_linear
from lorax_server.kernels.fp8_quant import quantize_rows
from lorax_server.layers.fp8 import W8A16_MAX_ROWS, quantize_weight

PROJECTIONS = {"qkv": (6144, 4096), "o_proj": (4096, 4096)}
TOKENS = [1, 16, 64, 256, 1024, 4096]


def floor_ms(tokens: int, out: int, inp: int, weight_bytes: int, bandwidth: float, rate: float) -> float:
    return max(out * inp * weight_bytes / bandwidth, 2 * tokens * out * inp / rate) * 1e3


def w8a8(x, q):
    x8, scale = quantize_rows(x)
    return torch._scaled_mm(x8, q.weight.t(), scale_a=scale.unsqueeze(1), scale_b=q.weight_scale.unsqueeze(0),
                            out_dtype=torch.bfloat16)


# (BLOCK_M ceiling, BLOCK_N, BLOCK_K, warps, stages) of the weight-only kernel
W8A16_CANDIDATES = [(16, 16, 512, 4, 3), (16, 16, 256, 4, 4), (16, 32, 256, 4, 4), (16, 32, 512, 4, 3),
                    (16, 64, 256, 4, 4), (32, 32, 256, 4, 4), (64, 32, 256, 4, 4)]


def tune(tokens):
    """CUDA-graph time of each weight-only tile candidate, per projection and token count."""
    for name, (out, inp) in PROJECTIONS.items():
        q = quantize_weight((torch.randn(out, inp, device="cuda") / inp**0.5).bfloat16())
        for T in tokens:
            x = torch.randn(T, inp, device="cuda").bfloat16()
            timed = []
            for tiles in W8A16_CANDIDATES:
                try:
                    timed.append((time_graph_ms(lambda: w8a16_linear(x, q.weight, q.weight_scale, tiles)), tiles))
                except Exception as error:  # out of shared memory or registers
                    print(f"  {tiles}: {type(error).__name__}")
            timed.sort()
            print(f"w8a16 {name} tokens {T}: " + ", ".join(f"{tiles} {ms * 1e3:.1f} us" for ms, tiles in timed[:4]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--tune", action="store_true", help="time the weight-only kernel's tile candidates")
    args = parser.parse_args()
    if args.tune:
        tune([T for T in args.tokens if T <= 64])
    bandwidth, rate, fp8_rate = copy_bandwidth(), matmul_rate(), fp8_matmul_rate()
    rows = []
    with torch.no_grad():
        for name, (out, inp) in PROJECTIONS.items():
            w = (torch.randn(out, inp, device="cuda") / inp**0.5).bfloat16()
            q = quantize_weight(w)
            for T in args.tokens:
                x = torch.randn(T, inp, device="cuda").bfloat16()
                bf16 = time_graph_ms(lambda: F.linear(x, w))
                scaled = time_graph_ms(lambda: w8a8(x, q))
                weight_only = time_graph_ms(lambda: w8a16_linear(x, q.weight, q.weight_scale)) if T <= 256 else None
                bf16_floor = floor_ms(T, out, inp, 2, bandwidth, rate)
                fp8_floor = floor_ms(T, out, inp, 1, bandwidth, fp8_rate)
                served = weight_only if T <= W8A16_MAX_ROWS else scaled
                rows.append([name, str(T), f"{bf16:.4f} ({100 * bf16_floor / bf16:.0f}%)",
                             f"{scaled:.4f} ({100 * fp8_floor / scaled:.0f}%)",
                             f"{weight_only:.4f} ({100 * fp8_floor / weight_only:.0f}%)" if weight_only else "-",
                             f"{served / bf16:.2f}x"])
    print_table(f"Attention projections, Mixtral-8x7B shapes, {card()}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul "
                f"{rate / 1e12:.0f} TFLOP/s, FP8 matmul (torch._scaled_mm) {fp8_rate / 1e12:.0f} TFLOP/s; CUDA-graph "
                f"replay ms (percent of each dtype's floor)",
                ["projection", "tokens", "bf16", "fp8 W8A8 (quantize + scaled_mm)", "fp8 W8A16 (triton)",
                 "served fp8 / bf16"], rows)


if __name__ == "__main__":
    main()
