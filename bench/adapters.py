"""Decode step of a stack of full-size Mixtral-8x7B layers, batch 32, context 2048, with 1, 8 and 32
distinct rank-16 adapters (random weights) on q/k/v/o, and on q/k/v/o plus every expert, against the
base model in the same run. CUDA-graph replays; the adapters go through the Triton LoRA kernels.

    python -m bench.adapters [--layers 8]
"""

import argparse

import torch

from bench.common import card, print_table, time_graph_ms
from bench.layer_stack import MIXTRAL_8X7B, RandomWeights, decode_inputs
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

RANK, BATCH = 16, 32


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    config = MixtralConfig(**MIXTRAL_8X7B, num_hidden_layers=args.layers)
    rows = []
    with torch.no_grad():
        model = FlashMixtralForCausalLM("", config, RandomWeights()).eval()
        inputs = decode_inputs(model, config, BATCH)
        base = time_graph_ms(lambda: model(**inputs), repeat=10)
        rows.append(["base model", "-", f"{base:.2f}", "1.00x"])
        for experts in (False, True):
            for distinct in (1, 8, 32):
                store = AdapterStore(config, FakeGroup(0, 1), torch.bfloat16, "cuda")
                store.publish({i + 1: random_adapter(config, args.layers, experts) for i in range(distinct)})
                token_adapters = torch.arange(BATCH, device="cuda") % distinct + 1
                data = store.batch_data(token_adapters)
                ms = time_graph_ms(lambda: model(**inputs, adapter_data=data), repeat=10)
                where = "q/k/v/o + experts" if experts else "q/k/v/o"
                rows.append([where, str(distinct), f"{ms:.2f}", f"{ms / base:.2f}x"])
                del store, data
                torch.cuda.empty_cache()
    print_table(f"{args.layers} Mixtral-8x7B layers, decode batch {BATCH}, context 2048, rank-{RANK} adapters, "
                f"bf16, {card()}, CUDA-graph replays",
                ["adapters on", "distinct adapters", "ms", "vs base"], rows)


if __name__ == "__main__":
    main()
