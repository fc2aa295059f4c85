"""The expert-LoRA stacks hold only the adapters that adapt the experts, and a token of any other adapter (or of
the base model) reads no row of them. Checked on the CPU with torch stand-ins for the Triton LoRA kernels
(tests/adapters/torch_lora_kernels.py), against the per-adapter loop that is the kernels' oracle."""

import torch

from lorax_server.adapters.batch import AdapterBatchData
from lorax_server.adapters.stacked import build_stacks
from lorax_server.adapters.weights import AdapterWeights, ExpertLoraWeights, LoraWeights
from tests.adapters.torch_lora_kernels import KERNELS

E, H, F = 4, 16, 24


def expert_adapter(seed: int, rank: int) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    experts = {(0, "w13"): ExpertLoraWeights(torch.randn(E, rank, H, generator=g), torch.randn(E, 2 * F, rank, generator=g)),
               (0, "w2"): ExpertLoraWeights(torch.randn(E, rank, F, generator=g), torch.randn(E, H, rank, generator=g))}
    return AdapterWeights(f"experts-{seed}", {(0, "self_attn.o_proj"): lora(seed, rank)}, experts)


def lora(seed: int, rank: int) -> LoraWeights:
    g = torch.Generator().manual_seed(100 + seed)
    return LoraWeights(torch.randn(H, rank, generator=g), torch.randn(rank, H, generator=g))


def test_only_expert_adapters_take_expert_stack_rows_and_the_deltas_are_the_loops():
    loaded = {1: AdapterWeights("attention-only", {(0, "self_attn.o_proj"): lora(1, 8)}),
              2: expert_adapter(2, 8),
              3: AdapterWeights("attention-only-too", {(0, "self_attn.o_proj"): lora(3, 16)}),
              5: expert_adapter(5, 4)}
    stacks = build_stacks(loaded, E, "cpu", kernels=KERNELS)
    assert stacks.expert_slot.tolist() == [-1, 0, -1, 1]  # slots of adapters 1, 2, 3, 5
    assert all(s.a.shape[0] == 2 * E for s in stacks.experts.values())  # two adapters, not four

    token_adapters = torch.tensor([0, 1, 2, 3, 5, 2, 5, 1])
    row_tokens = torch.arange(8).repeat_interleave(2)  # top-2: rows t * 2 + k
    row_experts = torch.tensor([0, 3, 1, 2, 2, 0, 3, 1, 1, 1, 0, 2, 3, 3, 2, 0])
    stacked = AdapterBatchData.for_tokens(token_adapters, loaded, stacks).expert_lora(0, row_tokens, row_experts)
    loop = AdapterBatchData.for_tokens(token_adapters, loaded, None).expert_lora(0, row_tokens, row_experts)
    without = torch.isin(token_adapters[row_tokens], torch.tensor([0, 1, 3]))  # the base, and no expert LoRA
    assert (stacked.rows[without] == -1).all() and (stacked.rows[~without] >= 0).all()

    x = torch.randn(16, H)
    scale = torch.rand(16)
    for name, width, inputs in (("w13", 2 * F, x), ("w2", H, torch.randn(16, F))):
        want, got = torch.zeros(16, width), torch.zeros(16, width)
        loop.add(want, inputs, name, row_scale=scale)
        stacked.add(got, inputs, name, row_scale=scale)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(stacked.deltas(inputs, name), loop_deltas(loop, inputs, name))


def loop_deltas(loop, x, name):
    out = torch.zeros(len(loop.row_adapters), {"w13": 2 * F, "w2": H}[name])
    loop.add(out, x, name)
    return out
