"""One MoE layer at Mixtral-8x7B shapes (hidden 4096, ffn 14336, 8 experts, top-2), bf16, one card.

Every variant runs router + routing + experts on the same tokens. The floor is the larger of the
distinct experts' bytes over the measured copy bandwidth and the FLOPs over the measured matmul rate.
Anchors: transformers' MixtralSparseMoeBlock with experts_implementation="grouped_mm", and LoRAX
upstream's small-batch path (every token through all experts by bmm, then masked).

With --fp8 the same layer with FP8 experts (W8A8 e4m3, per-channel weight scales, per-token activation
scales): the fused Triton kernels, the same with bf16 activations (W8A16), and FP8 grouped GEMMs
(torch._scaled_grouped_mm), against the bf16 Triton kernels of the same run. Its floor counts one byte per
weight and the FLOPs at the measured FP8 rate of torch._scaled_mm.

After that table, the fused experts alone (routing computed once, shared) against a peer written from vLLM's
fused-MoE design and its tuned H200 table (bench/peer_vllm_moe.py): the peer with its alignment precomputed
(free) and with it, ours, ours with an expert's short last row block merged into the block before (TAIL_M, an
experiment off by default), ours with expert LoRA of 8 rank-16 adapters (one per token, round robin), and two
grouped_mm calls from 256 tokens. CUDA-graph replays. --peer prints only this table.

--tune times tile candidates for the fused kernels (the whole `fused_moe` call, CUDA-graph replays) per token
count; with --write the winners replace MOE_TILE_CONFIGS in lorax_server/kernels/fused_moe.py (with --fp8:
the same sweep for FP8 experts, K steps of the same bytes, into MOE_FP8_TILE_CONFIGS). Candidates
compile in parallel worker processes into Triton's on-disk cache first (compiling dominates a serial sweep).

    python -m bench.moe_layer [--tokens 1 16 256] [--tune [--write]] [--peer] [--fp8]
    python -m bench.moe_layer --fp8 --tune --write
"""

import argparse
import datetime
import itertools
import math
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import card, copy_bandwidth, fp8_matmul_rate, matmul_rate, print_table, time_graph_ms, time_ms
from bench import peer_vllm_moe as peer
from lorax_server.kernels import fused_moe as fused_moe_module
from lorax_server.kernels.fused_moe import MOE_FP8_TILE_CONFIGS, Tile, fused_moe
from lorax_server.layers.fp8 import Fp8Weight, quantize_weight
from lorax_server.layers.moe import dispatch, moe_experts, route
from lorax_server.layers.moe.experts import linear_grouped_mm, load_scaled_grouped_mm
from lorax_server.utils.fp8 import Fp8Tensors

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


# -- tile sweep ------------------------------------------------------------------------------------------

TUNE_TOKENS = (1, 4, 8, 16, 64, 256, 1024, 4096)
SMEM_BYTES = 225 * 1024  # a block may take 227 KB on an H100/H200


def fits(tile: Tile, gate_up: bool, operand_bytes: int = 2) -> bool:
    """Shared memory of the pipelined operands and registers of the fp32 accumulators (bf16 operands, or e4m3
    with `operand_bytes` 1). Triton keeps `stages` operand buffers for Hopper's wgmma (block_m >= 64) and
    stages - 1 for the older mma path (as compiled for sm_90a with Triton 3.6)."""
    rows = max(tile.block_m, 16)
    cols = tile.block_n * (2 if gate_up else 1)  # gate and up accumulators side by side
    buffers = tile.stages if rows >= 64 else tile.stages - 1
    smem = buffers * (rows * tile.block_k + tile.block_k * cols) * operand_bytes
    return smem <= SMEM_BYTES and rows * cols <= 128 * 32 * tile.warps


def tiles(gate_up, block_m, block_n, block_k, warps, stages, groups=(1024,), operand_bytes=2):
    """The tiles of this grid that fit; block_k is given for bf16 and doubled for e4m3 (the same bytes a step)."""
    block_k = tuple(k * 2 // operand_bytes for k in block_k)
    return [t for t in (Tile(block_m, *rest) for rest in itertools.product(block_n, block_k, warps, stages, groups))
            if fits(t, gate_up, operand_bytes)]


def candidates(T, fp8: bool = False):
    """[(gate/up tiles, down tiles)] sharing one block_m each: what the sweep tries at T tokens (FP8 experts: the
    same grid with K steps of the same bytes)."""
    b = 1 if fp8 else 2
    out = []
    if T <= 8:  # pairs: no alignment, one assignment (step 1) or one token (step 2) per program
        out.append((tiles(True, 1, (32, 64, 128), (64, 128, 256), (4,), (3, 4, 5, 6), operand_bytes=b),
                    tiles(False, 1, (16, 32, 64), (128, 256, 512), (4,), (3, 4, 5, 6), operand_bytes=b)))
    if T <= 16:
        out.append((tiles(True, 16, (32, 64, 128), (128, 256), (4,), (3, 4, 5), operand_bytes=b),
                    tiles(False, 16, (32, 64, 128), (128, 256), (4,), (3, 4, 5), operand_bytes=b)))
    elif T <= 64:
        for bm in (16, 32):
            out.append((tiles(True, bm, (32, 64, 128), (64, 128, 256), (4,), (3, 4, 5), operand_bytes=b),
                        tiles(False, bm, (32, 64, 128), (64, 128, 256), (4,), (3, 4, 5), operand_bytes=b)))
    elif T <= 256:
        for bm in (32, 64):
            out.append((tiles(True, bm, (64, 128), (64, 128), (4, 8), (3, 4), operand_bytes=b),
                        tiles(False, bm, (64, 128, 256), (64, 128), (4, 8), (3, 4), operand_bytes=b)))
        out.append((tiles(True, 128, (64, 128), (64,), (8,), (3, 4), operand_bytes=b),
                    tiles(False, 128, (128, 256), (64,), (8,), (3, 4), operand_bytes=b)))
    else:
        for bm in (64, 128):
            out.append((tiles(True, bm, (64, 128), (64,) if bm == 128 else (64, 128), (4, 8), (3, 4), (8, 16, 1024),
                              operand_bytes=b),
                        tiles(False, bm, (128, 256), (64,), (8,), (3, 4), (8, 16, 1024), operand_bytes=b)))
    return out


_WORKER = {}


def worker_inputs(fp8: bool = False):
    if not _WORKER:
        torch.manual_seed(0)
        _WORKER.update(zip(("gate", "w13", "w2"), make_weights()))
    if fp8 and "q13" not in _WORKER:
        _WORKER["q13"], _WORKER["q2"] = fp8_experts(_WORKER["w13"], _WORKER["w2"])
        torch.cuda.empty_cache()  # the quantization's temporaries, which every worker would otherwise keep
    if fp8:
        return _WORKER["gate"], _WORKER["q13"], _WORKER["q2"]
    return _WORKER["gate"], _WORKER["w13"], _WORKER["w2"]


def run_job(job):
    """One launch of a variant, so that Triton compiles it (into the on-disk cache the timing process reads).
    Returns the error's name when the variant cannot compile or run."""
    kind, T, configs = job
    gate, w13, w2 = worker_inputs(fp8=kind == "fp8")
    x = torch.randn(T, H, device="cuda").bfloat16()
    r = route(F.linear(x, gate), K)
    try:
        with torch.no_grad():
            if kind in ("ours", "fp8"):
                fused_moe(x, w13, w2, r.weights, r.experts, configs)
            elif kind == "lora":
                fused_moe(x, w13, w2, r.weights, r.experts, lora=expert_lora(T, r.experts))
            else:
                peer.experts(x, w13, w2, r.weights, r.experts)
        torch.cuda.synchronize()
    except Exception as error:  # a shape that does not fit in shared memory or registers
        return f"{type(error).__name__}: {str(error)[:120]}"
    return None


def prewarm(jobs, workers: int = 12):
    """Compiles every job's kernels in parallel processes; returns {job: error} for those that failed."""
    from bench import moe_layer  # by its module name, also when run as __main__, so the workers can import it

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        return {job: error for job, error in zip(jobs, pool.map(moe_layer.run_job, jobs, chunksize=1)) if error}


def tune(gate, w13, w2, tokens, write: bool, fp8: bool = False):
    """Per token count and block_m: every gate/up tile with the first down tile, then every down tile with
    the best gate/up tile; the fastest pair wins. bf16 winners are checked against the peer's output, FP8
    winners (w13/w2 FP8 weights) against the FP8 kernels with the table in use (the same arithmetic)."""
    kind = "fp8" if fp8 else "ours"
    jobs = [(kind, T, (g, d)) for T in tokens for gs, ds in candidates(T, fp8)
            for g, d in [(g, ds[0]) for g in gs] + [(gs[0], d) for d in ds[1:]]]
    if not fp8:
        jobs += [("peer", T, None) for T in tokens]  # the check of the winners below
    print(f"compiling {len(jobs)} variants in worker processes")
    failed = prewarm(jobs)
    for job, error in failed.items():
        print(f"  {job}: {error}")
    winners = {}
    with torch.no_grad():
        for T in tokens:
            x = torch.randn(T, H, device="cuda").bfloat16()
            r = route(F.linear(x, gate), K)

            def timed(configs):
                if (kind, T, configs) in failed:
                    return float("inf")
                try:
                    ms = time_graph_ms(lambda: fused_moe(x, w13, w2, r.weights, r.experts, configs), repeat=20)
                except Exception as error:  # not compiled by a worker (its partner failed there), and failing here
                    print(f"  {configs}: {type(error).__name__}")
                    return float("inf")
                return ms if ms == ms else float("inf")  # NaN: not capturable

            results = []
            for gs, ds in candidates(T, fp8):
                first = sorted((timed((g, ds[0])), g) for g in gs)
                best_g = first[0][1]
                second = sorted((timed((best_g, d)), d) for d in ds)
                results.append((second[0][0], best_g, second[0][1], first[:3], second[:3]))
            ms, g, d, first, second = min(results)
            if fp8:
                want = fused_moe(x, w13, w2, r.weights, r.experts)
            else:
                want = peer.experts(x, w13, w2, r.weights, r.experts)
            error = ((fused_moe(x, w13, w2, r.weights, r.experts, (g, d)).float() - want.float()).norm()
                     / want.float().norm()).item()
            # FP8: against the table's tiles, which quantize h after another bf16 rounding of it: a value that
            # lands the other side of an e4m3 step moves by up to 6%; the GPU tests' W8A8 bound
            bound = 2e-2 if fp8 else 1e-2
            assert error < bound, f"tokens {T}: the winner {g}, {d} is off the reference by {error:.2e}"
            winners[T] = (ms, g, d)
            print(f"{'fp8 ' if fp8 else ''}tokens {T}: {ms:.3f} ms gate/up {tuple(g)} down {tuple(d)} (vs reference "
                  f"{error:.1e}); gate/up runners-up {[(round(t, 3), tuple(c)) for t, c in first[1:]]}, "
                  f"down runners-up {[(round(t, 3), tuple(c)) for t, c in second[1:]]}")
    print(table_text(winners, fp8))
    if write:
        write_table(winners, fp8)


def table_rows(winners):
    """Each tuned token count's tiles up to the geometric mean of it and the next; equal neighbours merged."""
    counts = sorted(winners)
    rows = []
    for i, T in enumerate(counts):
        bound = int(math.sqrt(T * counts[i + 1])) if i + 1 < len(counts) else 1 << 62
        _, g, d = winners[T]
        tiles_here = (tuple(g), tuple(d))
        if rows and rows[-1][1:] == tiles_here:
            rows[-1] = (bound, *tiles_here)
        else:
            rows.append((bound, *tiles_here))
    return rows


def table_text(winners, fp8: bool = False) -> str:
    rows = [f"    ({'1 << 62' if bound == 1 << 62 else bound}, {g}, {d})," for bound, g, d in table_rows(winners)]
    return f"{'MOE_FP8_TILE_CONFIGS' if fp8 else 'MOE_TILE_CONFIGS'} = (\n" + "\n".join(rows) + "\n)"


def write_table(winners, fp8: bool = False):
    """Replaces the table between the tune-table markers (fp8-tune-table for FP8) of
    lorax_server/kernels/fused_moe.py. Name the log in the comment it writes by hand."""
    path = Path(fused_moe_module.__file__)
    text = path.read_text()
    command = "python -m bench.moe_layer " + ("--fp8 --tune --write" if fp8 else "--tune --write")
    what = "FP8 W8A8 e4m3 experts" if fp8 else "bf16"
    lines = [f"# Chosen by `{command}` on an {card()}, {datetime.date.today()}, at Mixtral-8x7B shapes",
             f"# ({what}, CUDA-graph replays of the whole fused_moe call, routing given).",
             "# Measured, tokens: ms: " + ", ".join(f"{T}: {ms:.3f}" for T, (ms, _, _) in sorted(winners.items()))
             + "."]
    body = "\n".join(lines) + "\n" + table_text(winners, fp8) + "\n"
    marker = "fp8-tune-table" if fp8 else "tune-table"
    text, count = re.subn(rf"(# {marker}-begin\n).*?(# {marker}-end)", lambda m: m.group(1) + body + m.group(2),
                          text, flags=re.S)
    assert count == 1, f"the {marker} markers are missing from {path}"
    path.write_text(text)
    print(f"wrote the table into {path}")


# -- against the peer ---------------------------------------------------------------------------------------

LORA_ADAPTERS, LORA_RANK, LORA_MAX_TOKENS = 8, 16, 256
GROUPED_MIN_TOKENS = 256
PER_EXPERT_MIN_TOKENS = 1024
TAIL_M_TRIED, TAIL_MIN_TOKENS = 32, 256  # 128-row blocks from 256 tokens on
_LORA = {}


def lora_stacks():
    """8 random rank-16 adapters on every expert's w13 and w2 (layer 0), stacked for the kernels."""
    if not _LORA:
        from lorax_server.adapters.stacked import build_stacks
        from lorax_server.adapters.weights import AdapterWeights, ExpertLoraWeights

        def pair(n_in, n_out):
            return ExpertLoraWeights(torch.randn(E, LORA_RANK, n_in, device="cuda").bfloat16() / n_in**0.5,
                                     torch.randn(E, n_out, LORA_RANK, device="cuda").bfloat16() / LORA_RANK)

        loaded = {i + 1: AdapterWeights(f"random-{i}", experts={(0, "w13"): pair(H, 2 * FF), (0, "w2"): pair(FF, H)})
                  for i in range(LORA_ADAPTERS)}
        _LORA["loaded"], _LORA["stacks"] = loaded, build_stacks(loaded, E, "cuda")
    return _LORA["loaded"], _LORA["stacks"]


def expert_lora(T, experts):
    """The StackedExpertLora the MoE block hands the fused kernels, token t on adapter t % 8 + 1."""
    from lorax_server.adapters.batch import AdapterBatchData

    loaded, stacks = lora_stacks()
    token_adapters = torch.arange(T, device="cuda") % LORA_ADAPTERS + 1
    rows = torch.arange(T * K, device="cuda") // K
    return AdapterBatchData.for_tokens(token_adapters, loaded, stacks).expert_lora(0, rows, experts.flatten())


def best_of_two(fns):
    """Each variant's CUDA-graph median (eager when it cannot be captured), timed twice (in order, then
    reversed); the smaller of the two."""
    times = {name: float("inf") for name in fns}
    for order in (list(fns), list(reversed(fns))):
        for name in order:
            if fns[name] is not None:
                ms = time_graph_ms(fns[name], repeat=50)
                times[name] = min(times[name], ms if ms == ms else time_ms(fns[name]))
    return times


def linear_per_expert_mm(x, w, d):
    """One cuBLAS matmul per expert into its rows of the output, with the offsets read on the host (a sync:
    not capturable; a candidate for large prefills only)."""
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(d.offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], w[e].t(), out=out[start:end])
        start = end
    return out


def with_tail_m(fn, tail_m: int):
    """`fn` with kernels/fused_moe.py's TAIL_M set (an expert's short last row block computed by the program of
    the block before): the A/B of that experiment."""
    def run():
        before = fused_moe_module.TAIL_M
        fused_moe_module.TAIL_M = tail_m
        try:
            return fn()
        finally:
            fused_moe_module.TAIL_M = before
    return run


def main_peer(tokens):
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    gate, w13, w2 = make_weights()
    jobs = [(kind, T, None) for T in tokens for kind in ("ours", "peer")]
    jobs += [("lora", T, None) for T in tokens if T <= LORA_MAX_TOKENS]
    failed = prewarm(jobs)
    for job, error in failed.items():
        print(f"  {job}: {error}")
    assert not any(kind != "lora" for kind, _, _ in failed), "ours or the peer failed"
    rows = []
    with torch.no_grad():
        for T in tokens:
            x = torch.randn(T, H, device="cuda").bfloat16()
            r = route(F.linear(x, gate), K)
            floor = floor_ms(x, gate, bandwidth, rate)
            aligned = peer.align(r.experts, peer.config_for(T)[0], E)
            lora = expert_lora(T, r.experts) if T <= LORA_MAX_TOKENS and ("lora", T, None) not in failed else None
            want = peer.experts(x, w13, w2, r.weights, r.experts)
            got = fused_moe(x, w13, w2, r.weights, r.experts)
            error = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert error < 1e-2, f"tokens {T}: ours is off the peer by {error:.2e}"
            t = best_of_two({
                "free": lambda: peer.experts(x, w13, w2, r.weights, r.experts, aligned),
                "aligned": lambda: peer.experts(x, w13, w2, r.weights, r.experts),
                "ours": lambda: fused_moe(x, w13, w2, r.weights, r.experts),
                "tails": with_tail_m(lambda: fused_moe(x, w13, w2, r.weights, r.experts), TAIL_M_TRIED)
                if T >= TAIL_MIN_TOKENS else None,
                "lora": (lambda: fused_moe(x, w13, w2, r.weights, r.experts, lora=lora)) if lora else None,
                "grouped": (lambda: moe_experts(x, w13, w2, dispatch(r, E), F.silu, linear_grouped_mm))
                if T >= GROUPED_MIN_TOKENS else None,
                "per-expert": (lambda: moe_experts(x, w13, w2, dispatch(r, E), F.silu, linear_per_expert_mm))
                if T >= PER_EXPERT_MIN_TOKENS else None})
            rows.append([str(T), f"{floor:.3f}", cell(t["free"], floor), cell(t["aligned"], floor),
                         cell(t["ours"], floor), f"{t['ours'] / t['free']:.2f}",
                         f"{cell(t['tails'], floor)}, {t['tails'] / t['ours']:.2f}x" if T >= TAIL_MIN_TOKENS else "-",
                         cell(t["lora"], floor) if lora else "-", f"{t['lora'] / t['ours']:.2f}" if lora else "-",
                         cell(t["grouped"], floor) if T >= GROUPED_MIN_TOKENS else "-",
                         cell(t["per-expert"], floor) if T >= PER_EXPERT_MIN_TOKENS else "-"])
    print_table(f"MoE experts, Mixtral-8x7B shapes, bf16, {card()}: copy {bandwidth / 1e12:.2f} TB/s, matmul "
                f"{rate / 1e12:.0f} TFLOP/s; CUDA-graph replay ms (percent of floor), routing given, best of two",
                ["tokens", "floor ms", "vLLM design, alignment free", "vLLM design, with alignment", "ours",
                 "ours / vLLM free", f"ours, short last blocks merged (TAIL_M {TAIL_M_TRIED}), vs ours",
                 f"ours + expert LoRA ({LORA_ADAPTERS} adapters)", "LoRA / ours",
                 "two grouped_mm (the block's path above TRITON_MOE_MAX_TOKENS)",
                 "per-expert cuBLAS mm (host offsets, eager)"], rows)
    print(f"tile table in use: {fused_moe_module.MOE_TILE_CONFIGS}")


# -- FP8 ---------------------------------------------------------------------------------------------

def fp8_experts(w13, w2):
    """The experts quantized one at a time: the float32 copy quantize_weight makes of a whole stack is 11 GB for
    w13, which the sweep's twelve worker processes could not all hold at once."""
    def stack(w):
        parts = [quantize_weight(w[e]) for e in range(w.shape[0])]
        return Fp8Tensors(torch.stack([p.weight for p in parts]), torch.stack([p.weight_scale for p in parts]))

    return Fp8Weight(stack(w13)), Fp8Weight(stack(w2))


def ours_grouped_fp8(x, gate, w13, w2, linear):
    r = route(F.linear(x, gate), K)
    return moe_experts(x, w13, w2, dispatch(r, E), F.silu, linear)


def fp8_floor_ms(x, gate, bandwidth, fp8_rate):
    """Distinct experts' FP8 bytes (one per weight) over the copy bandwidth, or the FLOPs at the FP8 rate."""
    experts = route(F.linear(x, gate), K).experts
    bytes_moved = experts.unique().numel() * 3 * H * FF + 2 * x.numel() * 2
    flops = 2 * x.shape[0] * K * 3 * H * FF
    return max(bytes_moved / bandwidth, flops / fp8_rate) * 1e3


def cell(ms: float, floor: float) -> str:
    return f"{ms:.3f} ({100 * floor / ms:.0f}%)"


def main_fp8(tokens):
    bandwidth, fp8_rate = copy_bandwidth(), fp8_matmul_rate()
    gate, w13, w2 = make_weights()
    q13, q2 = fp8_experts(w13, w2)
    grouped = load_scaled_grouped_mm()
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
    parser.add_argument("--tokens", type=int, nargs="*", default=None)
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--write", action="store_true", help="with --tune: write the winners into fused_moe.py")
    parser.add_argument("--peer", action="store_true", help="only the table against the vLLM-design peer")
    parser.add_argument("--fp8", action="store_true", help="FP8 experts against bf16 (see the module docstring)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.fp8:
        if args.tune:
            gate, w13, w2 = make_weights()[:3]
            tune(gate, *fp8_experts(w13, w2), args.tokens or TUNE_TOKENS, args.write, fp8=True)
        main_fp8(args.tokens or TOKENS)
        return
    if args.tune:
        tune(*make_weights()[:3], args.tokens or TUNE_TOKENS, args.write)
        return
    if not args.peer:
        main_layer(args.tokens or TOKENS)
    main_peer(args.tokens or TOKENS)


def main_layer(tokens):
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    gate, w13, w2 = make_weights()
    hf = transformers_block(gate, w13, w2)
    rows = []
    with torch.no_grad():
        for T in tokens:
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
    print(f"tile table in use: {fused_moe_module.MOE_TILE_CONFIGS}")


if __name__ == "__main__":
    main()
