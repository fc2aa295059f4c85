"""Two-GPU parity worker, started by tests/gpu/test_two_gpus.py (and bench/tp_nccl.py) under torchrun:

    torchrun --standalone --nproc-per-node 2 -m tests.gpu.tp_worker DIR RESULT_JSON

The tiny Mixtral in bf16, a ragged batch (prefill, then decode steps), sharded over NCCL against the same
model on one GPU (computed by rank 0, in bf16 and in fp32): tensor parallelism with every adapter kind,
with the one-shot all-reduce and with NCCL alone, and expert parallelism. Rank 0 writes the relative
errors and the argmax agreement of every case to RESULT_JSON.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lorax_server.utils.backends import CHOSEN
from lorax_server.models.custom_modeling.flash_mixtral_modeling import BlockSparseMoE, ExpertParallelMoE
from lorax_server.utils.dist import SMALL_ALL_REDUCE, FakeGroup, initialize_torch_distributed
from tests.adapters.peft_adapters import ATTENTION_AND_HEAD, make_peft_adapter, store_for, write_per_expert_adapter
from tests.tiny_mixtral import load_ours, paged_logits, save_tiny_mixtral

SEQUENCES = [list(range(3, 20)), list(range(50, 58)), list(range(20, 43))]
PROMPT_LENS = [11, 3, 17]
ADAPTERS = {"none": [], "all kinds": ["experts", "per_expert"], "attention": ["attention"]}


def make(directory: Path) -> None:
    hf = save_tiny_mixtral(directory / "base", hidden_size=128, intermediate_size=256, head_dim=32, vocab_size=97)
    make_peft_adapter(hf, directory / "experts", seed=1, target_modules=ATTENTION_AND_HEAD + ["gate", "w1", "w2", "w3"])
    write_per_expert_adapter(hf, directory / "per_expert", seed=2)
    make_peft_adapter(hf, directory / "attention", seed=3, target_modules=ATTENTION_AND_HEAD + ["gate"])


def logits(directory: Path, group, device, adapters, moe_cls=BlockSparseMoE, dtype=torch.bfloat16):
    model = load_ours(directory / "base", group=group, dtype=dtype, device=device, moe_cls=moe_cls)
    store = None
    if adapters:
        store = store_for(model, group, dtype, device)
        for index, name in enumerate(adapters, start=1):
            store.load(index, directory / name)
    indices = [(i + 1) % (len(adapters) + 1) for i in range(len(SEQUENCES))]  # base and every adapter
    return paged_logits(model, SEQUENCES, PROMPT_LENS, block_size=4, adapters=store, adapter_indices=indices,
                        device=device, dtype=dtype)


def compare(got, want) -> dict:
    errors = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, want)]
    agree = torch.cat([a.argmax(-1) == b.argmax(-1) for a, b in zip(got, want)]).float().mean().item()
    return {"errors": errors, "argmax_agreement": agree}


def main(directory: Path, result_file: Path) -> None:
    group, rank, world = initialize_torch_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    one_shot = SMALL_ALL_REDUCE.get(group.group_name)
    # (layout, MoE block, adapters, dtype, one-shot all-reduce on)
    cases = [("tensor parallel", BlockSparseMoE, adapters, torch.bfloat16, True) for adapters in ADAPTERS]
    cases += [("tensor parallel, NCCL only", BlockSparseMoE, "all kinds", torch.bfloat16, False),
              ("tensor parallel", BlockSparseMoE, "all kinds", torch.float32, True)]
    cases += [("expert parallel", ExpertParallelMoE, adapters, torch.bfloat16, True) for adapters in ("none", "attention")]
    results = []
    for layout, moe_cls, adapters, dtype, with_one_shot in cases:
        if one_shot is not None and not with_one_shot:
            SMALL_ALL_REDUCE.pop(group.group_name)
        sharded = logits(directory, group, device, ADAPTERS[adapters], moe_cls, dtype)
        if one_shot is not None:
            SMALL_ALL_REDUCE[group.group_name] = one_shot
        if rank == 0:  # the bf16 bound: how far one GPU in bf16 is from one GPU in fp32
            single = logits(directory, FakeGroup(0, 1), device, ADAPTERS[adapters], dtype=dtype)
            exact = logits(directory, FakeGroup(0, 1), device, ADAPTERS[adapters], dtype=torch.float32)
            results.append({"layout": layout, "adapters": adapters, "dtype": str(dtype).split(".")[1],
                            "vs_one_gpu": compare(sharded, single), "vs_fp32": compare(sharded, exact),
                            "one_gpu_vs_fp32": compare(single, exact)})
        dist.barrier()
    if rank == 0:
        result_file.write_text(json.dumps({"world": world, "allreduce": CHOSEN.get("allreduce"), "cases": results}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if sys.argv[1] == "--make":
        make(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
