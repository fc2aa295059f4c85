"""One MoE layer at Mixtral-8x7B shapes (hidden 4096, ffn 14336, 8 experts, top-2), bf16, one card.

Every variant runs router + routing + experts on the same tokens. The floor is the larger of the
distinct experts' bytes over the measured copy bandwidth and the FLOPs over the measured matmul rate.
Anchors: transformers' MixtralSparseMoeBlock with experts_implementation="grouped_mm", and LoRAX
upstream's small-batch path (every token through all experts by bmm, then masked).

With --fp8 the same layer with FP8 experts (W8A8 e4m3, per-channel weight scales, per-token activation
scales): the fused Triton kernels, the same with bf16 activations (W8A16), and FP8 grouped GEMMs
(torch._scaled_grouped_mm), against the bf16 Triton kernels of the same run. Its floor counts one byte per
weight and the FLOPs at the measured FP8 rate of torch._scaled_mm.

    python -m bench.moe_layer [--tokens 1 16 256] [--tune] [--fp8]
"""

import argparse
import itertools

import torch
import torch.nn.functional as F

from bench.common import card, copy_bandwidth, fp8_matmul_rate, matmul_rate, print_table, time_graph_ms, time_ms
from lorax_server.kernels.fused_moe import MOE_FP8_TILE_CONFIGS, MOE_TILE_CONFIGS, fused_moe
from lorax_server.layers.fp8 import Fp8Weight, quantize_weight
from lorax_server.layers.moe import dispatch, moe_experts, route
from lorax_server.layers.moe.experts import linear_grouped_mm, load_scaled_grouped_mm

H, FF, E, K = 4096, 14336, 8, 2
TOKENS = [1, 4, 16, 64, 256, 1024, 4096]


def make_weights():
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * FF, H, device="cuda", generator=g) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, FF, device="cuda", generator=g) / FF**0.5).bfloat16()
    gate = (torch.randn(E, H, device="cuda", generator=g) / H**0.5).bfloat16()
    return gate, w13, w2


def ours_fused(x, gate, w13, w2, configs=None, fp8_activations=True):
    r = route(F.linear(x, gate), K)
    return fused_moe(x, w13, w2, r.weights, r.experts, configs, fp8_activations=fp8_activations)


def ours_grouped_mm(x, gate, w13, w2):
    r = route(F.linear(x, gate), K)
    return moe_experts(x, w13, w2, dispatch(r, E), F.silu, linear_grouped_mm)


def upstream_dense(x, gate, w13, w2):
    """LoRAX's small-batch path: all experts for every token (bmm), then weights zero for the unchosen."""
    r = route(F.linear(x, gate), K)
    mask = torch.zeros(x.shape[0], E, device=x.device, dtype=torch.float32).scatter_(1, r.experts, r.weights)
    xs = x.unsqueeze(0).expand(E, -1, -1)  # [E, T, H]
    gate_up = torch.bmm(xs, w13.transpose(1, 2))
    g, u = gate_up.chunk(2, dim=-1)
    y = torch.bmm(F.silu(g) * u, w2.transpose(1, 2))  # [E, T, H]
    return (y * mask.t().unsqueeze(-1).to(y.dtype)).sum(0)


def transformers_block(gate, w13, w2):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=H, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=K)
    config._experts_implementation = "grouped_mm"
    block = MixtralSparseMoeBlock(config).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        block.gate.weight.copy_(gate)
        block.experts.gate_up_proj.copy_(w13)
        block.experts.down_proj.copy_(w2)
    return lambda x: block(x.unsqueeze(0))


def floor_ms(x, gate, bandwidth, rate):
    experts = route(F.linear(x, gate), K).experts
    distinct = experts.unique().numel()
    bytes_moved = distinct * 3 * H * FF * 2 + 2 * x.numel() * 2
    flops = 2 * x.shape[0] * K * 3 * H * FF
    return max(bytes_moved / bandwidth, flops / rate) * 1e3


def tune(gate, w13, w2, tokens):
    """Times every tile shape in a small grid per token count; prints the best (for MOE_TILE_CONFIGS)."""
    grid = [(bm, bn, bk, w, s) for bm, bn, bk, w, s in itertools.product(
        (16, 32, 64, 128), (64, 128), (64, 128), (4, 8), (3, 4)) if not (bm == 128 and bk == 128)]
    for T in tokens:
        x = torch.randn(T, H, device="cuda").bfloat16()
        best = []
        for cfg in grid:
            try:
                best.append((time_ms(lambda: ours_fused(x, gate, w13, w2, (cfg, cfg)), warmup=2, repeat=10), cfg))
            except Exception as error:  # a shape that does not fit in shared memory
                print(f"  {cfg}: {type(error).__name__}")
        best.sort()
        print(f"tokens {T}: best {best[0][1]} {best[0][0]:.3f} ms; next {[f'{t:.3f}' for t, _ in best[1:4]]}")


# -- FP8 ---------------------------------------------------------------------------------------------

# Tile candidates (BLOCK_M, gate/up (BLOCK_N, BLOCK_K, warps, stages), down (...)): both kernels walk the same
# row blocks, so BLOCK_M is shared; the down kernel has one accumulator where gate/up has two.
FP8_SMALL = [(bm, g, d) for bm in (16, 64) for g in ((64, 256, 4, 4), (128, 128, 4, 4))
             for d in ((64, 256, 4, 4), (32, 256, 4, 4))]
FP8_LARGE = [(64, (128, 128, 8, 4), (128, 128, 8, 4)), (128, (128, 128, 8, 3), (128, 128, 8, 3)),
             (128, (64, 128, 4, 4), (128, 128, 8, 3)), (128, (128, 128, 8, 3), (256, 128, 8, 3)),
             (64, (64, 256, 4, 3), (128, 128, 4, 4))]


def fp8_experts(w13, w2):
    return Fp8Weight(quantize_weight(w13)), Fp8Weight(quantize_weight(w2))


def ours_grouped_fp8(x, gate, w13, w2, linear):
    r = route(F.linear(x, gate), K)
    return moe_experts(x, w13, w2, dispatch(r, E), F.silu, linear)


def fp8_floor_ms(x, gate, bandwidth, fp8_rate):
    """Distinct experts' FP8 bytes (one per weight) over the copy bandwidth, or the FLOPs at the FP8 rate."""
    experts = route(F.linear(x, gate), K).experts
    bytes_moved = experts.unique().numel() * 3 * H * FF + 2 * x.numel() * 2
    flops = 2 * x.shape[0] * K * 3 * H * FF
    return max(bytes_moved / bandwidth, flops / fp8_rate) * 1e3


def as_configs(candidate):
    bm, g, d = candidate
    return (bm, *g), (bm, *d)


def tune_fp8(gate, w13, w2, tokens):
    """CUDA-graph time of each tile candidate per token count (small grid up to 64 tokens, large above)."""
    for T in tokens:
        x = torch.randn(T, H, device="cuda").bfloat16()
        timed = []
        for candidate in (FP8_SMALL if T <= 64 else FP8_LARGE):
            configs = as_configs(candidate)
            try:
                ms = time_graph_ms(lambda: ours_fused(x, gate, w13, w2, configs), repeat=10)
            except Exception as error:  # a shape that does not fit in shared memory or registers
                print(f"  {configs}: {type(error).__name__}")
                continue
            if ms == ms:  # NaN: not capturable
                timed.append((ms, configs))
        timed.sort()
        print(f"fp8 tokens {T}: best {timed[0][1]} {timed[0][0]:.3f} ms; next "
              f"{[(round(t, 3), c) for t, c in timed[1:3]]}")


def cell(ms: float, floor: float) -> str:
    return f"{ms:.3f} ({100 * floor / ms:.0f}%)"


def main_fp8(tokens, tune: bool):
    bandwidth, fp8_rate = copy_bandwidth(), fp8_matmul_rate()
    gate, w13, w2 = make_weights()
    q13, q2 = fp8_experts(w13, w2)
    grouped = load_scaled_grouped_mm()
    if tune:
        tune_fp8(gate, q13, q2, tokens)
    rows = []
    with torch.no_grad():
        for T in tokens:
            x = torch.randn(T, H, device="cuda").bfloat16()
            floor = fp8_floor_ms(x, gate, bandwidth, fp8_rate)
            fp8 = time_graph_ms(lambda: ours_fused(x, gate, q13, q2))
            # W8A16 only where the weights' bytes decide; bf16 grouped_mm only where it can beat the kernels
            w8a16 = time_graph_ms(lambda: ours_fused(x, gate, q13, q2, fp8_activations=False)) if T <= 64 else None
            scaled_grouped = time_graph_ms(lambda: ours_grouped_fp8(x, gate, q13, q2, grouped))
            bf16 = time_graph_ms(lambda: ours_fused(x, gate, w13, w2))
            bf16_grouped = time_graph_ms(lambda: ours_grouped_mm(x, gate, w13, w2)) if T >= 256 else float("inf")
            best_bf16 = min(bf16, bf16_grouped)
            rows.append([str(T), f"{floor:.3f}", cell(fp8, floor), cell(w8a16, floor) if w8a16 else "-",
                         cell(scaled_grouped, floor), f"{bf16:.3f} / " + (f"{bf16_grouped:.3f}" if T >= 256 else "-"),
                         f"{min(fp8, scaled_grouped) / best_bf16:.2f}x"])
    print_table(f"MoE layer, Mixtral-8x7B shapes, FP8 experts, {card()}: copy {bandwidth / 1e12:.2f} TB/s, FP8 "
                f"matmul (torch._scaled_mm) {fp8_rate / 1e12:.0f} TFLOP/s; CUDA-graph replay ms (percent of the "
                f"FP8 floor)",
                ["tokens", "fp8 floor ms", "fp8 triton W8A8", "fp8 triton W8A16", "fp8 scaled_grouped_mm",
                 "bf16 triton / grouped_mm", "best fp8 / best bf16"], rows)
    print(f"fp8 tile table in use: {MOE_FP8_TILE_CONFIGS}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--fp8", action="store_true", help="FP8 experts against bf16 (see the module docstring)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.fp8:
        main_fp8(args.tokens, args.tune)
        return
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    gate, w13, w2 = make_weights()
    if args.tune:
        tune(gate, w13, w2, args.tokens)
        return
    hf = transformers_block(gate, w13, w2)
    rows = []
    with torch.no_grad():
        for T in args.tokens:
            x = torch.randn(T, H, device="cuda").bfloat16()
            floor = floor_ms(x, gate, bandwidth, rate)
            variants = {"triton": lambda: ours_fused(x, gate, w13, w2),
                        "grouped_mm": lambda: ours_grouped_mm(x, gate, w13, w2),
                        "hf grouped_mm": lambda: hf(x),
                        "upstream dense": (lambda: upstream_dense(x, gate, w13, w2)) if T <= 1024 else None}
            cells = [str(T), f"{floor:.3f}"]
            for fn in variants.values():
                if fn is None:
                    cells.append("-")
                    continue
                eager, graph = time_ms(fn), time_graph_ms(fn)
                cells.append(f"{eager:.3f} ({100 * floor / eager:.0f}%) / "
                             + ("no graph" if graph != graph else f"{graph:.3f} ({100 * floor / graph:.0f}%)"))
            rows.append(cells)
    print_table(f"MoE layer, Mixtral-8x7B shapes, bf16, {card()}: copy {bandwidth / 1e12:.2f} TB/s, "
                f"matmul {rate / 1e12:.0f} TFLOP/s; ms (percent of floor), eager / CUDA-graph replay",
                ["tokens", "floor ms", "ours triton", "ours grouped_mm", "transformers grouped_mm", "upstream dense bmm"],
                rows)
    print(f"tile table in use: {MOE_TILE_CONFIGS}")


if __name__ == "__main__":
    main()
