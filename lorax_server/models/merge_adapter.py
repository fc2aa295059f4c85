"""Merging one adapter into the base weights (W += scale * B @ A, on this rank's shards).

After a merge, every request that uses the base model gets the adapter's outputs, at no per-token cost.
It cannot be undone exactly (floating point), so the engine offloads the adapter's index when merging.
An FP8 base weight's rows are dequantized, summed with the delta and quantized again (`add_delta`).
"""

import torch

from lorax_server.adapters.weights import AdapterWeights
from lorax_server.layers.fp8 import Fp8Weight, add_delta
from lorax_server.models.custom_modeling.flash_mixtral_modeling import (
    ATTN_K_PROJ,
    ATTN_O_PROJ,
    ATTN_Q_PROJ,
    ATTN_V_PROJ,
    LM_HEAD,
    LM_HEAD_LAYER_ID,
    ROUTER,
    BlockSparseMoE,
)


@torch.no_grad()
def merge_into(model, adapter: AdapterWeights) -> None:
    """Adds every LoRA delta of `adapter` into `model`'s weights in place (FlashMixtralForCausalLM)."""
    layers = model.model.layers
    for (layer_id, name), lora in adapter.linear.items():
        delta = (lora.a @ lora.b).t()  # [out (shard), in (shard)]
        if layer_id == LM_HEAD_LAYER_ID and name == LM_HEAD:
            model.lm_head.weight += delta.to(model.lm_head.weight.dtype)
        elif name == ROUTER:
            layers[layer_id].moe.gate += delta.to(layers[layer_id].moe.gate.dtype)
        else:
            linear, rows = target_rows(layers[layer_id].self_attn, name)
            add_delta(linear.weight, linear.weight_scale, rows, delta)
    for (layer_id, name), lora in adapter.experts.items():
        moe = layers[layer_id].moe
        delta = torch.bmm(lora.b, lora.a)  # [E, out (shard), in (shard)]
        for e in range(delta.shape[0]):
            add_delta(*expert_weight(moe, name, e), delta[e])


def target_rows(attention, name: str):
    """The linear (fused q/k/v, or o_proj) and its rows that `name` owns on this rank."""
    if name == ATTN_O_PROJ:
        return attention.o_proj.base, slice(None)
    q, k, v = attention.split
    start = {ATTN_Q_PROJ: 0, ATTN_K_PROJ: q, ATTN_V_PROJ: q + k}[name]
    size = {ATTN_Q_PROJ: q, ATTN_K_PROJ: k, ATTN_V_PROJ: v}[name]
    return attention.query_key_value.base, slice(start, start + size)


def expert_weight(moe, name: str, expert: int):
    """(weight, its FP8 scales or None, index) of expert `expert`'s fused w13 or its w2, whether stacked
    (BlockSparseMoE) or per module (DenseMoE)."""
    if isinstance(moe, BlockSparseMoE):
        stacked = moe.expert_w13 if name == "w13" else moe.expert_w2
        if isinstance(stacked, Fp8Weight):
            return stacked.weight, stacked.weight_scale, expert
        return stacked, None, expert
    linear = (moe.expert_w13 if name == "w13" else moe.expert_w2)[expert]
    return linear.weight, linear.weight_scale, slice(None)
