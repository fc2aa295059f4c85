"""Two GPUs against one, under torchrun on one host: the decode step (batch 32, context 2048) of a stack
of full-size Mixtral-8x7B layers with tensor parallelism and with expert parallelism, each with the
one-shot all-reduce and with NCCL alone, against one GPU (measured by rank 0 in the same run).
CUDA-graph replays (collectives captured) and eager. Parity is a test: tests/gpu/test_two_gpus.py.

    torchrun --standalone --nproc-per-node 2 -m bench.tp_nccl [--layers 8]
"""

import argparse
import os

import torch
import torch.distributed as dist

from bench.common import card, print_table, time_graph_ms, time_ms
from bench.layer_stack import MIXTRAL_8X7B, RandomWeights, decode_floor_ms, decode_inputs
from lorax_server.utils.backends import CHOSEN
from lorax_server.models.custom_modeling.flash_mixtral_modeling import (
    BlockSparseMoE,
    ExpertParallelMoE,
    FlashMixtralForCausalLM,
    MixtralConfig,
)
from lorax_server.utils.dist import SMALL_ALL_REDUCE, FakeGroup, initialize_torch_distributed

BATCH = 32


def decode_ms(group, layers: int, moe_cls=BlockSparseMoE):
    """(eager ms, graph ms) of one decode step; graph is NaN if the collectives cannot be captured."""
    config = MixtralConfig(**MIXTRAL_8X7B, num_hidden_layers=layers)
    with torch.no_grad():
        model = FlashMixtralForCausalLM("", config, RandomWeights(group), moe_cls).eval()
        inputs = decode_inputs(model, config, BATCH)
        eager = time_ms(lambda: model(**inputs), warmup=3, repeat=10)
        graph = time_graph_ms(lambda: model(**inputs), repeat=10)
    del model, inputs
    torch.cuda.empty_cache()
    return eager, graph


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    group, rank, world = initialize_torch_distributed()
    one_shot = SMALL_ALL_REDUCE.get(group.group_name)
    timings = {}
    for layout, moe_cls in (("tensor parallel", BlockSparseMoE), ("expert parallel", ExpertParallelMoE)):
        for all_reduce in ("one-shot", "NCCL"):
            if all_reduce == "one-shot" and one_shot is None:
                continue
            if all_reduce == "NCCL":
                SMALL_ALL_REDUCE.pop(group.group_name, None)
            timings[(layout, all_reduce)] = decode_ms(group, args.layers, moe_cls)
            if one_shot is not None:
                SMALL_ALL_REDUCE[group.group_name] = one_shot
            dist.barrier()
    if rank == 0:
        one = decode_ms(FakeGroup(0, 1), args.layers)
        config = MixtralConfig(**MIXTRAL_8X7B, num_hidden_layers=args.layers)
        floor = decode_floor_ms(config, args.layers, BATCH, 3.0e12)
        rows = [["1 GPU", "-", f"{one[0]:.2f}", f"{one[1]:.2f}", "1.00x"]]
        rows += [[layout, all_reduce, f"{eager:.2f}", f"{graph:.2f}", f"{graph / one[1]:.2f}x"]
                 for (layout, all_reduce), (eager, graph) in timings.items()]
        print_table(f"{args.layers} Mixtral-8x7B layers, decode batch {BATCH}, context 2048, bf16, {card()} x{world} "
                    f"(small all-reduces chosen: {CHOSEN.get('allreduce')}; 1-GPU floor {floor:.2f} ms at 3.0 TB/s)",
                    ["layout", "all-reduce", "eager ms", "graph ms", "graph vs 1 GPU"], rows)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    main()
