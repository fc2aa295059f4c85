"""One MoE layer at Mixtral-8x7B shapes (hidden 4096, ffn 14336, 8 experts, top-2), bf16, one card.

Every variant runs router + routing + experts on the same tokens. The floor is the larger of the
distinct experts' bytes over the measured copy bandwidth and the FLOPs over the measured matmul rate.
Anchors: transformers' MixtralSparseMoeBlock with experts_implementation="grouped_mm", and LoRAX
upstream's small-batch path (every token through all experts by bmm, then masked).

    python -m bench.moe_layer [--tokens 1 16 256] [--tune]
"""

import argparse
import itertools

import torch
import torch.nn.functional as F

from bench.common import card, copy_bandwidth, matmul_rate, print_table, time_graph_ms, time_ms
from lorax_server.kernels.fused_moe import MOE_TILE_CONFIGS, fused_moe
from lorax_server.layers.moe import dispatch, moe_experts, route
from lorax_server.layers.moe.experts import linear_grouped_mm

H, FF, E, K = 4096, 14336, 8, 2
TOKENS = [1, 4, 16, 64, 256, 1024, 4096]


def make_weights():
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * FF, H, device="cuda", generator=g) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, FF, device="cuda", generator=g) / FF**0.5).bfloat16()
    gate = (torch.randn(E, H, device="cuda", generator=g) / H**0.5).bfloat16()
    return gate, w13, w2


def ours_fused(x, gate, w13, w2, configs=None):
    r = route(F.linear(x, gate), K)
    return fused_moe(x, w13, w2, r.weights, r.experts, configs)


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--tune", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
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
