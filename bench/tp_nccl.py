"""Tensor parallelism over NCCL, under torchrun on one host with 2 GPUs:

1. parity: the tiny Mixtral (bf16) with a batch mixing the base model and two adapters (attention +
   lm_head + router + experts), TP=2 against one GPU: logits within bf16 bounds;
2. speed: decode step (batch 32, context 2048) of a stack of full-size layers, TP=2 against one GPU,
   CUDA-graph replays, the single-GPU number measured by rank 0 in the same run.

    torchrun --standalone --nproc-per-node 2 -m bench.tp_nccl DIR   (DIR made by `python -m bench.tp_nccl --make DIR`)
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import card, time_graph_ms, time_ms
from bench.layer_stack import MIXTRAL_8X7B, RandomWeights, decode_inputs, decode_floor_ms
from lorax_server.models.custom_modeling.flash_mixtral_modeling import (
    BlockSparseMoE,
    ExpertParallelMoE,
    FlashMixtralForCausalLM,
    MixtralConfig,
)
from lorax_server.utils.dist import initialize_torch_distributed

SEQUENCES = [list(range(3, 20)), list(range(50, 58)), list(range(20, 43))]
PROMPT_LENS = [11, 3, 17]


def make(directory: Path) -> None:
    from tests.adapters.peft_adapters import ATTENTION_AND_HEAD, make_peft_adapter, write_per_expert_adapter
    from tests.tiny_mixtral import save_tiny_mixtral

    hf = save_tiny_mixtral(directory / "base", hidden_size=128, intermediate_size=256, head_dim=32, vocab_size=97)
    make_peft_adapter(hf, directory / "a1", seed=1, target_modules=ATTENTION_AND_HEAD + ["gate", "w1", "w2", "w3"])
    write_per_expert_adapter(hf, directory / "a2", seed=2)


def tiny_logits(directory: Path, group, device, with_adapters: bool):
    from tests.adapters.peft_adapters import store_for
    from tests.tiny_mixtral import load_ours, paged_logits

    model = load_ours(directory / "base", group=group, dtype=torch.bfloat16, device=device)
    if not with_adapters:
        return paged_logits(model, SEQUENCES, PROMPT_LENS, block_size=4, device=device, dtype=torch.bfloat16)
    store = store_for(model, group, torch.bfloat16, device)
    store.load(1, directory / "a1")
    store.load(2, directory / "a2")
    return paged_logits(model, SEQUENCES, PROMPT_LENS, block_size=4, adapters=store, adapter_indices=[1, 0, 2],
                        device=device, dtype=torch.bfloat16)


def decode_ms(group, layers: int, moe_cls=BlockSparseMoE):
    """(eager ms, graph ms) of one decode step; graph is NaN if the collectives cannot be captured."""
    config = MixtralConfig(**MIXTRAL_8X7B, num_hidden_layers=layers)
    with torch.no_grad():
        model = FlashMixtralForCausalLM("", config, RandomWeights(group), moe_cls).eval()
        inputs = decode_inputs(model, config, 32)
        eager = time_ms(lambda: model(**inputs), warmup=3, repeat=10)
        graph = time_graph_ms(lambda: model(**inputs), repeat=10)
    del model, inputs
    torch.cuda.empty_cache()
    return eager, graph


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("--make", action="store_true")
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    if args.make:
        return make(args.directory)
    group, rank, world = initialize_torch_distributed()
    device = torch.device(f"cuda:{torch.cuda.current_device()}")
    from lorax_server.utils.dist import FakeGroup

    for with_adapters in (False, True):
        sharded = tiny_logits(args.directory, group, device, with_adapters)
        if rank == 0:
            single = tiny_logits(args.directory, FakeGroup(0, 1), device, with_adapters)
            errors = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(sharded, single)]
            agree = torch.cat([a.argmax(-1) == b.argmax(-1) for a, b in zip(sharded, single)]).float().mean().item()
            print(f"TP={world} vs 1 GPU, adapters={with_adapters}: relative errors {[f'{e:.1e}' for e in errors]}, "
                  f"argmax agreement {agree:.3f}", flush=True)
        dist.barrier()
    tp = decode_ms(group, args.layers)
    dist.barrier()
    ep = decode_ms(group, args.layers, ExpertParallelMoE)
    dist.barrier()
    if rank == 0:
        one = decode_ms(FakeGroup(0, 1), args.layers)
        config = MixtralConfig(**MIXTRAL_8X7B, num_hidden_layers=args.layers)
        print(f"{args.layers} layers, decode batch 32, context 2048, bf16, {card()} x{world}: eager / graph ms: "
              f"TP={world} {tp[0]:.2f} / {tp[1]:.2f}, 1 GPU {one[0]:.2f} / {one[1]:.2f}; ratio eager {tp[0] / one[0]:.2f}, "
              f"graph {tp[1] / one[1]:.2f} (1-GPU floor {decode_floor_ms(config, args.layers, 32, 3.0e12):.2f} ms at 3.0 TB/s)",
              flush=True)
        print(f"expert parallel (attention split by heads, experts by rank): eager / graph ms {ep[0]:.2f} / "
              f"{ep[1]:.2f}; ratio to 1 GPU graph {ep[1] / one[1]:.2f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    main()
