"""Decode step of a stack of full-size Mixtral-8x7B layers, batch 32, context 2048, with 1, 8 and 32
distinct rank-16 adapters (random weights) on q/k/v/o, and on q/k/v/o plus every expert, against the
base model in the same run (CUDA-graph replays); then a 2048-token prefill (eager) with 8 adapters, each
on a run of 256 tokens. The adapters go through the Triton LoRA kernels.

`--serve-mix B` instead times the mix `bench.serve --adapters 64` serves: a decode batch of B rows spread at
random over 64 adapters on q/k/v/o, 8 of them on every expert too, against the base model (CUDA-graph
replays), and lists the CUDA kernels of that step by total time (eager, one step).

    python -m bench.adapters [--layers 8]
    python -m bench.adapters --serve-mix 384
"""

import argparse

import torch

from bench.common import card, print_table, time_graph_ms, time_ms
from bench.layer_stack import MIXTRAL_8X7B, RandomWeights, decode_inputs, prefill_inputs
from lorax_server.adapters import batch as lora_batch
from lorax_server.adapters.store import AdapterStore
from lorax_server.adapters.weights import AdapterWeights, ExpertLoraWeights, LoraWeights
from lorax_server.models.custom_modeling.flash_mixtral_modeling import (
    ATTN_K_PROJ,
    ATTN_O_PROJ,
    ATTN_Q_PROJ,
    ATTN_V_PROJ,
    FlashMixtralForCausalLM,
    MixtralConfig,
)
from lorax_server.utils.dist import FakeGroup

RANK, BATCH, PREFILL = 16, 32, 2048


def random_adapter(config, layers: int, experts: bool) -> AdapterWeights:
    h, q, kv, f, e = config.hidden_size, 32 * 128, 8 * 128, config.intermediate_size, config.num_local_experts

    def lora(n_in, n_out):
        return LoraWeights(torch.randn(n_in, RANK, device="cuda").bfloat16() / n_in**0.5,
                           torch.randn(RANK, n_out, device="cuda").bfloat16() / RANK)

    adapter = AdapterWeights("random")
    for layer in range(layers):
        for name, (n_in, n_out) in {ATTN_Q_PROJ: (h, q), ATTN_K_PROJ: (h, kv), ATTN_V_PROJ: (h, kv),
                                    ATTN_O_PROJ: (q, h)}.items():
            adapter.linear[(layer, name)] = lora(n_in, n_out)
        if experts:
            adapter.experts[(layer, "w13")] = ExpertLoraWeights(
                torch.randn(e, RANK, h, device="cuda").bfloat16() / h**0.5,
                torch.randn(e, 2 * f, RANK, device="cuda").bfloat16() / RANK)
            adapter.experts[(layer, "w2")] = ExpertLoraWeights(
                torch.randn(e, RANK, f, device="cuda").bfloat16() / f**0.5,
                torch.randn(e, h, RANK, device="cuda").bfloat16() / RANK)
    return adapter


def random_store(config, layers: int, experts: bool, distinct: int) -> AdapterStore:
    """`distinct` random adapters at indices 1, 2, ..., stacked for the kernels."""
    store = AdapterStore(config, FakeGroup(0, 1), torch.bfloat16, "cuda")
    store.publish({i + 1: random_adapter(config, layers, experts) for i in range(distinct)})
    return store


def serve_mix(model, config, layers: int, batch: int, distinct: int = 64, on_experts: int = 8) -> None:
    """The decode step of `bench.serve --adapters 64`: its time against the base model's, and its kernels."""
    store = AdapterStore(config, FakeGroup(0, 1), torch.bfloat16, "cuda")
    store.publish({i + 1: random_adapter(config, layers, i < on_experts) for i in range(distinct)})
    generator = torch.Generator().manual_seed(0)
    data = store.batch_data(torch.randint(1, distinct + 1, (batch,), generator=generator).cuda())
    inputs = decode_inputs(model, config, batch)
    base = time_graph_ms(lambda: model(**inputs), repeat=10)
    with_adapters = {**inputs, "adapter_data": data}
    mixed = time_graph_ms(lambda: model(**with_adapters), repeat=10)
    print_table(f"{layers} Mixtral-8x7B layers, decode batch {batch}, context 2048, {distinct} rank-{RANK} adapters "
                f"({on_experts} also on every expert), bf16, {card()}, CUDA-graph replays",
                ["step", "ms", "vs base"], [["base model", f"{base:.2f}", "1.00x"],
                                            ["adapters", f"{mixed:.2f}", f"{mixed / base:.2f}x"]])
    for name, step_inputs in (("base model", inputs), ("adapters", with_adapters)):
        model(**step_inputs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(**step_inputs)
            torch.cuda.synchronize()
        print(f"\nkernels of one eager step, {name}:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def profile_prefill(model, config, layers: int) -> None:
    """The CUDA kernels of a prefill with 8 adapters on q/k/v/o and the experts, by total time."""
    inputs = prefill_inputs(config, PREFILL)
    store = random_store(config, layers, True, 8)
    data = store.batch_data(torch.arange(PREFILL, device="cuda") // 256 % 8 + 1)
    model(**{**inputs, "adapter_data": data})
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(**{**inputs, "adapter_data": data})
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--profile-prefill", action="store_true", help="only list the kernels of a prefill")
    parser.add_argument("--serve-mix", type=int, metavar="BATCH",
                        help="only the decode step of bench.serve's adapter mix at this batch, and its kernels")
    args = parser.parse_args()
    config = MixtralConfig(**MIXTRAL_8X7B, num_hidden_layers=args.layers)
    if args.serve_mix:
        with torch.no_grad():
            model = FlashMixtralForCausalLM("", config, RandomWeights()).eval()
            return serve_mix(model, config, args.layers, args.serve_mix)
    if args.profile_prefill:
        with torch.no_grad():
            return profile_prefill(FlashMixtralForCausalLM("", config, RandomWeights()).eval(), config, args.layers)
    rows = []
    with torch.no_grad():
        model = FlashMixtralForCausalLM("", config, RandomWeights()).eval()
        inputs = decode_inputs(model, config, BATCH)
        base = time_graph_ms(lambda: model(**inputs), repeat=10)
        rows.append(["base model", "-", f"{base:.2f}", "1.00x"])
        for experts in (False, True):
            for distinct in (1, 8, 32):
                store = random_store(config, args.layers, experts, distinct)
                data = store.batch_data(torch.arange(BATCH, device="cuda") % distinct + 1)
                ms = time_graph_ms(lambda: model(**{**inputs, "adapter_data": data}), repeat=10)
                where = "q/k/v/o + experts" if experts else "q/k/v/o"
                rows.append([where, str(distinct), f"{ms:.2f}", f"{ms / base:.2f}x"])
                del store, data
                torch.cuda.empty_cache()
        print_table(f"{args.layers} Mixtral-8x7B layers, decode batch {BATCH}, context 2048, rank-{RANK} adapters, "
                    f"bf16, {card()}, CUDA-graph replays",
                    ["adapters on", "distinct adapters", "ms", "vs base"], rows)
        print_table(f"the same layers, prefill of {PREFILL} tokens, eager",
                    ["adapters on", "distinct adapters", "ms", "vs base"], prefill_rows(model, config, args.layers))


def prefill_rows(model, config, layers: int):
    inputs = prefill_inputs(config, PREFILL)
    base = time_ms(lambda: model(**inputs), warmup=2, repeat=5)
    rows = [["base model", "-", f"{base:.2f}", "1.00x"]]
    sgmv_min_rows = lora_batch.SGMV_MIN_ROWS
    for where, experts, per_row in (("q/k/v/o", False, False), ("q/k/v/o + experts", True, False),
                                    ("q/k/v/o + experts, per-row kernels (BGMV) for the experts", True, True)):
        lora_batch.SGMV_MIN_ROWS = 1 << 62 if per_row else sgmv_min_rows
        store = random_store(config, layers, experts, 8)
        data = store.batch_data(torch.arange(PREFILL, device="cuda") // 256 % 8 + 1)
        ms = time_ms(lambda: model(**{**inputs, "adapter_data": data}), warmup=2, repeat=5)
        rows.append([where, "8", f"{ms:.2f}", f"{ms / base:.2f}x"])
        del store, data
        torch.cuda.empty_cache()
    lora_batch.SGMV_MIN_ROWS = sgmv_min_rows
    return rows


if __name__ == "__main__":
    main()
