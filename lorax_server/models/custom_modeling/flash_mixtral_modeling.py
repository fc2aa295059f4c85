"""Mixtral (sparse mixture of experts) for LoRAX: paged KV cache, packed batches, tensor parallelism, LoRA hooks.

Top-down: config, MoE blocks, attention, decoder layer, model, causal LM. Every op has a pure-PyTorch
path, so this module imports and runs with torch, transformers and safetensors alone; faster kernels are
chosen once per op family in `lorax_server.layers` (see DESIGN.md section 4).

Legend: T = tokens in the packed batch, B = sequences, H = hidden size, E = experts, K = experts per
token, F = expert ffn size on this rank, nh / nkv = query / key-value heads on this rank, D = head dim.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# LoRA target names (LoRAX's adapter target map imports them from this module; they live with the adapters).
from lorax_server.adapters.targets import (  # noqa: F401
    ATTN_K_PROJ,
    ATTN_O_PROJ,
    ATTN_Q_PROJ,
    ATTN_QKV,
    ATTN_V_PROJ,
    LM_HEAD,
    LM_HEAD_LAYER_ID,
    LORA_TARGET_GROUPS,
    MOE_W1,
    MOE_W2,
    MOE_W3,
    ROUTER,
)
from lorax_server.layers.attention import attention_ops
from lorax_server.layers.fp8 import Fp8Tensors, Fp8Weight, cat_fp8, load_fp8, load_fp8_col, load_fp8_row
from lorax_server.layers.linear import (
    TensorParallelColumnLinear,
    TensorParallelEmbedding,
    TensorParallelHead,
    TensorParallelRowLinear,
)
from lorax_server.layers.lora import MultiAdapterLinear
from lorax_server.layers.moe import (
    ExpertsImpl,
    Routing,
    dispatch,
    expert_backend,
    linear_per_expert,
    moe_experts,
    route,
)
from lorax_server.layers.rmsnorm import RMSNorm
from lorax_server.layers.rotary import SUPPORTED_ROPE_TYPES, RotaryEmbedding, apply_rotary
from lorax_server.utils.attention.common import Seqlen
from lorax_server.utils.dist import all_reduce
from lorax_server.utils.weights import CheckpointError


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class MixtralConfig:
    """The fields of a Mixtral `config.json`, in its original form (`rope_theta`, `rope_scaling`) or
    transformers 5's (`rope_parameters`, `head_dim`). Unlike upstream, an absent `sliding_window` means
    no window (not 4096)."""

    model_type = "mixtral"

    def __init__(self, vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                 max_position_embeddings=4096 * 32, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 sliding_window=None, num_experts_per_tok=2, num_local_experts=8, rope_theta=1e6,
                 rope_scaling=None, rope_parameters=None, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                 **unused):
        num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        # Sizes first: everything below divides by them.
        require_positive_ints(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                              num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                              num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
                              num_local_experts=num_local_experts, num_experts_per_tok=num_experts_per_tok)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else derived_head_dim(hidden_size, num_attention_heads)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.tie_word_embeddings = tie_word_embeddings
        self.sliding_window = sliding_window
        self.num_experts_per_tok = num_experts_per_tok
        self.num_local_experts = num_local_experts
        self.rope_parameters = self.normalise_rope(rope_parameters, rope_scaling, rope_theta)
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.validate()

    @staticmethod
    def normalise_rope(rope_parameters, rope_scaling, rope_theta) -> dict:
        """One dict with `rope_type`, `rope_theta` and the scaling keys, whichever form the file used."""
        params = dict(rope_parameters or rope_scaling or {})
        params["rope_type"] = params.get("rope_type", params.pop("type", "default"))
        params.setdefault("rope_theta", rope_theta)
        return params

    def validate(self) -> None:
        """Refuses values no checkpoint can be served with, each with what is wrong (a NaN or refuse-everything
        server otherwise: rope_theta 0 gives NaN rotations, max_position_embeddings 0 admits no request)."""
        require_positive_ints(head_dim=self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary embeddings rotate pairs), got {self.head_dim}")
        if self.sliding_window is not None and not is_positive(self.sliding_window, int):
            raise ValueError(f"sliding_window must be a positive number of tokens or null, got {self.sliding_window}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if not self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be between 1 and "
                             f"num_local_experts {self.num_local_experts}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act '{self.hidden_act}' is not supported; supported: {sorted(ACTIVATIONS)}")
        if not is_positive(self.rms_norm_eps, (int, float)):
            raise ValueError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        self.validate_rope()

    def validate_rope(self) -> None:
        params = self.rope_parameters
        if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope type '{params['rope_type']}' is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        if not is_positive(params["rope_theta"], (int, float)):
            raise ValueError(f"rope_theta must be a positive number, got {params['rope_theta']!r}")
        factor = params.get("factor")
        if factor is None and params["rope_type"] != "default":  # every scaled rope is scaled by its factor
            raise ValueError(f"rope type '{params['rope_type']}' needs a scaling 'factor' in rope_scaling")
        if factor is not None and not is_positive(factor, (int, float)):
            raise ValueError(f"rope scaling factor must be a positive number, got {factor!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "MixtralConfig":
        model_type = values.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"model_type '{model_type}' is not '{cls.model_type}'")
        return cls(**values)

    @classmethod
    def from_pretrained(cls, model_dir) -> "MixtralConfig":
        return cls.from_dict(json.loads((Path(model_dir) / "config.json").read_text()))


def is_positive(value, types) -> bool:
    """A finite number of `types` above 0 (bools, NaN and inf are not)."""
    return isinstance(value, types) and not isinstance(value, bool) and 0 < value < float("inf")


def require_positive_ints(**values) -> None:
    for name, value in values.items():
        if not is_positive(value, int):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def derived_head_dim(hidden_size: int, num_attention_heads: int) -> int:
    """hidden / heads, when config.json has no head_dim; a remainder would silently drop hidden units."""
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}, "
                         f"and config.json gives no head_dim")
    return hidden_size // num_attention_heads


def check_divisible(what: str, size: int, world_size: int) -> None:
    if size % world_size:
        raise CheckpointError(f"{what} {size} is not divisible by the world size {world_size}")


@dataclass(frozen=True)
class BatchMetadata:
    """What every layer needs to know about this forward pass, packed once by the model."""

    cos: torch.Tensor  # [T, D/2]
    sin: torch.Tensor  # [T, D/2]
    cu_seqlen_prefill: Optional[torch.Tensor]  # [B+1] in prefill, None in decode
    block_tables: torch.Tensor  # [B, max_blocks] int32
    slots: torch.Tensor  # [T or written tokens] int64 cache slot per token, -1 = do not write
    seqlen: Seqlen
    max_s: int
    prefill_cache_indices: Optional[torch.Tensor]  # tokens whose K/V go to the cache (sliding window)
    adapter_data: object  # AdapterBatchData or None
    prefill_without_prefix: bool  # prefill in which no sequence has cached tokens: attend to fresh K/V


def make_batch_metadata(cos, sin, cu_seqlen_prefill, block_tables, slots, seqlen: Seqlen, max_s,
                        prefill_cache_indices, adapter_data) -> BatchMetadata:
    if seqlen.max_cached is not None:  # known on the host: no wait for the device
        no_prefix = cu_seqlen_prefill is not None and seqlen.max_cached == 0
    else:
        no_prefix = cu_seqlen_prefill is not None and not bool(seqlen.cache_lengths.any())
    return BatchMetadata(cos, sin, cu_seqlen_prefill, block_tables, slots, seqlen, max_s,
                         prefill_cache_indices, adapter_data, no_prefix)


# ---------------------------------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------------------------------


# transformers 5's own layout (save_pretrained(save_original_format=False)) names a MoE block `mlp` and keeps
# the router as `mlp.gate.weight` [E, H] and the experts fused: `mlp.experts.gate_up_proj` [E, 2F, H] (each
# expert's w1 rows, then its w3 rows) and `mlp.experts.down_proj` [E, H, F].
FUSED_MOE_BLOCK = "mlp"


def read_fused_layout_as_original(prefix: str, config: MixtralConfig, weights) -> None:
    """Lets the block at `prefix` (`...block_sparse_moe`) load a checkpoint in transformers 5's fused layout:
    the original names become views into the fused tensors, so every MoE class, tensor-parallel slicing and
    FP8 scaling read it as they read the original layout."""
    fused = f"{prefix.rpartition('.')[0]}.{FUSED_MOE_BLOCK}".lstrip(".")
    gate_up, down = f"{fused}.experts.gate_up_proj", f"{fused}.experts.down_proj"
    if weights.has(f"{prefix}.gate.weight") or not weights.has(gate_up):
        return
    e, h, f = config.num_local_experts, config.hidden_size, config.intermediate_size
    for name, expected in ((gate_up, [e, 2 * f, h]), (down, [e, h, f])):
        if weights.get_shape(name) != expected:
            raise CheckpointError(f"tensor {name}: expected shape {expected}, found {weights.get_shape(name)}")
    weights.add_view(f"{prefix}.gate.weight", f"{fused}.gate.weight", ())
    for expert in range(e):
        weights.add_view(f"{prefix}.experts.{expert}.w1.weight", gate_up, (expert, slice(0, f)))
        weights.add_view(f"{prefix}.experts.{expert}.w3.weight", gate_up, (expert, slice(f, 2 * f)))
        weights.add_view(f"{prefix}.experts.{expert}.w2.weight", down, (expert,))


def load_router(prefix: str, config: MixtralConfig, weights) -> nn.Parameter:
    """The router is replicated on every rank so all ranks route every token identically."""
    shape = (config.num_local_experts, config.hidden_size)
    return nn.Parameter(weights.get_tensor(f"{prefix}.gate.weight", shape=shape), requires_grad=False)


def load_expert_w13(prefix: str, config: MixtralConfig, weights):
    """[E, 2F, H]: each expert's gate (w1) rows then up (w3) rows, sharded along the ffn (FP8: an Fp8Tensors)."""
    shapes = [(config.intermediate_size, config.hidden_size)] * 2
    names = [[f"{prefix}.experts.{e}.w1", f"{prefix}.experts.{e}.w3"] for e in range(config.num_local_experts)]
    if weights.fp8_compute:
        return cat_fp8([load_fp8_col(weights, pair, shapes) for pair in names], dim=None)
    return torch.stack([weights.get_multi_weights_col(pair, shapes=shapes) for pair in names])


def load_expert_w2(prefix: str, config: MixtralConfig, weights):
    """[E, H, F]: each expert's down projection, sharded along the ffn (its input) (FP8: an Fp8Tensors)."""
    shape = (config.hidden_size, config.intermediate_size)
    names = [f"{prefix}.experts.{e}.w2" for e in range(config.num_local_experts)]
    if weights.fp8_compute:
        return cat_fp8([load_fp8_row(weights, name, shape) for name in names], dim=None)
    return torch.stack([weights.get_multi_weights_row(name, shape=shape) for name in names])


def expert_state(weight):
    """A module's stacked experts: a frozen Parameter, or an Fp8Weight (FP8 weights with their scales)."""
    return Fp8Weight(weight) if isinstance(weight, Fp8Tensors) else nn.Parameter(weight, requires_grad=False)


class MoEBlock(nn.Module):
    """Routing, (optional) router and expert LoRA, the experts, and the block's one all-reduce.

    Subclasses say how the experts are stored (`expert_w13`, `expert_w2`) and computed (`experts_impl`, an
    ExpertsImpl).
    """

    def __init__(self, prefix: str, config: MixtralConfig, weights, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.act = ACTIVATIONS[config.hidden_act]
        self.process_group = weights.process_group
        read_fused_layout_as_original(prefix, config, weights)
        self.gate = load_router(prefix, config, weights)

    def forward(self, x: torch.Tensor, adapter_data=None) -> torch.Tensor:
        router_logits = F.linear(x, self.gate)  # [T, E]
        if adapter_data is not None:
            adapter_data.add_lora(router_logits, x, self.layer_id, ROUTER)
        routing = self.localise(route(router_logits, self.top_k))
        has_lora = adapter_data is not None and adapter_data.has_expert_lora(self.layer_id)
        if self.use_fused(x.shape[0], adapter_data if has_lora else None):
            lora = None
            if has_lora:  # rows in t * K + k order, as the fused kernels walk them
                rows = torch.arange(routing.experts.numel(), device=x.device) // self.top_k
                lora = adapter_data.expert_lora(self.layer_id, rows, routing.experts.flatten())
            out = self.experts_impl.fused(x, self.expert_w13, self.expert_w2, routing.weights, routing.experts,
                                          lora=lora, elsewhere=routing.elsewhere)
        else:
            d = dispatch(routing, self.num_experts)
            lora = adapter_data.expert_lora(self.layer_id, d.token_index, d.expert_ids) if has_lora else None
            out = moe_experts(x, self.expert_w13, self.expert_w2, d, self.act, self.experts_impl.linear, lora)
        return all_reduce(out, self.process_group)

    def localise(self, routing: Routing) -> Routing:
        """The routing this rank computes (all of it, unless experts are split over ranks)."""
        return routing

    def use_fused(self, num_tokens: int, expert_lora_data) -> bool:
        """Fused kernels for small batches; with expert LoRA only when its deltas come from the GPU kernels."""
        impl = self.experts_impl
        fits = impl.fused is not None and num_tokens <= impl.fused_max_tokens
        return fits and (expert_lora_data is None or expert_lora_data.stacks is not None)


class BlockSparseMoE(MoEBlock):
    """Dropless MoE over stacked expert weights; the grouped-linear backend is chosen once."""

    def __init__(self, prefix: str, config: MixtralConfig, weights, layer_id: int = 0):
        super().__init__(prefix, config, weights, layer_id)
        self.expert_w13, self.expert_w2 = map(expert_state, self.load_experts(prefix, config, weights))
        w2 = self.expert_w2  # its dtype (float8_e4m3fn for FP8 experts) picks the implementations
        self.experts_impl = expert_backend(config.hidden_size, w2.shape[2], w2.dtype, w2.device, config.hidden_act)

    def load_experts(self, prefix: str, config: MixtralConfig, weights):
        return load_expert_w13(prefix, config, weights), load_expert_w2(prefix, config, weights)


class DenseExpert(nn.Module):
    """One expert as its own linears (the form quantized weights take)."""

    def __init__(self, prefix: str, config: MixtralConfig, weights):
        super().__init__()
        shapes = [(config.intermediate_size, config.hidden_size)] * 2
        self.w13 = TensorParallelColumnLinear.load_multi(weights, [f"{prefix}.w1", f"{prefix}.w3"], shapes)
        # No all-reduce per expert: the MoE block reduces the sum of all experts once.
        shape = (config.hidden_size, config.intermediate_size)
        self.w2 = TensorParallelRowLinear.load(weights, f"{prefix}.w2", shape, reduce=False)


class DenseMoE(MoEBlock):
    """MoE over per-expert modules; same routing and maths, computes only the experts each token chose."""

    def __init__(self, prefix: str, config: MixtralConfig, weights, layer_id: int = 0):
        super().__init__(prefix, config, weights, layer_id)
        self.experts = nn.ModuleList(
            DenseExpert(f"{prefix}.experts.{e}", config, weights) for e in range(config.num_local_experts)
        )
        self.experts_impl = ExpertsImpl(linear_per_expert)

    @property
    def expert_w13(self):
        return [expert.w13 for expert in self.experts]

    @property
    def expert_w2(self):
        return [expert.w2 for expert in self.experts]


class ExpertParallelMoE(BlockSparseMoE):
    """Experts split over ranks instead of every expert's ffn: rank r holds experts [r E/n, (r+1) E/n)
    whole. Every rank routes every token and computes only its own experts' assignments; the block's
    all-reduce sums the ranks' parts. The fused kernels (decode, small batches) skip the other ranks'
    assignments; the grouped path (large batches) computes them on expert 0 with weight 0, to keep its
    shapes fixed. Expert LoRA is not supported in this layout (its loader shards the ffn)."""

    def __init__(self, prefix: str, config: MixtralConfig, weights, layer_id: int = 0):
        group = weights.process_group
        check_divisible("num_local_experts", config.num_local_experts, group.size())
        self.experts_per_rank = config.num_local_experts // group.size()
        self.first_expert = group.rank() * self.experts_per_rank
        super().__init__(prefix, config, weights, layer_id)
        self.num_experts = self.experts_per_rank

    def load_experts(self, prefix: str, config: MixtralConfig, weights):
        h, f = config.hidden_size, config.intermediate_size
        local = range(self.first_expert, self.first_expert + self.experts_per_rank)
        if weights.fp8_compute:  # whole experts: every row and column, with all their scales
            def whole(e: int, w: str, shape):
                return load_fp8(weights, f"{prefix}.experts.{e}.{w}.weight", None, shape)

            w13 = cat_fp8([cat_fp8([whole(e, "w1", (f, h)), whole(e, "w3", (f, h))]) for e in local], dim=None)
            return w13, cat_fp8([whole(e, "w2", (h, f)) for e in local], dim=None)
        w13 = torch.stack([torch.cat([weights.get_tensor(f"{prefix}.experts.{e}.{w}.weight", shape=(f, h))
                                      for w in ("w1", "w3")]) for e in local])
        w2 = torch.stack([weights.get_tensor(f"{prefix}.experts.{e}.w2.weight", shape=(h, f)) for e in local])
        return w13, w2

    def localise(self, routing: Routing) -> Routing:
        local = routing.experts - self.first_expert
        mine = (local >= 0) & (local < self.experts_per_rank)
        return Routing(routing.weights, torch.where(mine, local, self.experts_per_rank), elsewhere=True)

    def forward(self, x: torch.Tensor, adapter_data=None) -> torch.Tensor:
        if adapter_data is not None and adapter_data.has_expert_lora(self.layer_id):
            raise NotImplementedError("expert LoRA is not supported with expert parallelism")
        return super().forward(x, adapter_data)


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------


class MixtralAttention(nn.Module):
    """Grouped-query attention with rotary embeddings, over the paged cache, with LoRA on q/k/v/o."""

    def __init__(self, prefix: str, config: MixtralConfig, weights, layer_id: int):
        super().__init__()
        world = weights.process_group.size()
        check_divisible("num_attention_heads", config.num_attention_heads, world)
        check_divisible("num_key_value_heads", config.num_key_value_heads, world)
        self.num_heads = config.num_attention_heads // world
        self.num_kv_heads = config.num_key_value_heads // world
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.window = config.sliding_window
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        hidden, d = config.hidden_size, config.head_dim
        qkv = TensorParallelColumnLinear.load_multi(
            weights, [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"],
            shapes=[(config.num_attention_heads * d, hidden)] + [(config.num_key_value_heads * d, hidden)] * 2,
        )
        self.query_key_value = MultiAdapterLinear(qkv, layer_id, ATTN_QKV, self.split)
        o_proj = TensorParallelRowLinear.load(weights, f"{prefix}.o_proj", (hidden, config.num_attention_heads * d),
                                              reduce=False)
        self.o_proj = MultiAdapterLinear(o_proj, layer_id, [ATTN_O_PROJ], [hidden], reduce_group=weights.process_group)
        self.ops = attention_ops(o_proj.weight.device, self.head_dim)
        # The FP8 KV cache's scales (Python floats: CUDA graphs bake them); only an FP8 cache uses them.
        self.k_scale, self.v_scale = load_kv_scales(weights, prefix)

    def forward(self, x: torch.Tensor, batch: BatchMetadata, kv_cache: Tuple[torch.Tensor, torch.Tensor]):
        q, k, v = self.project(x, batch, kv_cache)
        return self.output(self.attend(q, k, v, batch, kv_cache), batch)

    def project(self, x: torch.Tensor, batch: BatchMetadata, kv_cache: Tuple[torch.Tensor, torch.Tensor]):
        """q [T, nh, D] and k, v [T, nkv, D] of x, rotated; k and v are written to the cache. (The forward is
        split in three so that engine.step_graphs can replay all but `attend`, which depends on the batch's
        sequences, from CUDA graphs.)"""
        qkv = self.query_key_value(x, batch.adapter_data)
        q_and_k, v = qkv.split([self.split[0] + self.split[1], self.split[2]], dim=-1)
        # q's and k's heads sit side by side in the projection: rotated in one pass (half the launches of two,
        # 14 -> 7 kernels a layer), then viewed apart; the kernels take their strided rows as they are.
        q_and_k = apply_rotary(q_and_k.view(-1, self.num_heads + self.num_kv_heads, self.head_dim), batch.cos,
                               batch.sin)
        q, k = q_and_k.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, nh, D], [T, nkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        self.write_cache(k, v, kv_cache, batch)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BatchMetadata,
               kv_cache: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Each new token's attention over its sequence [T, nh, D]."""
        if batch.prefill_without_prefix:
            out = self.ops.prefill(q, k, v, batch.cu_seqlen_prefill, batch.max_s, self.scale, self.window)
        elif batch.cu_seqlen_prefill is not None:
            # A prefill on a cached prefix: its new K/V come from here, since with a sliding window only a
            # prompt's last W tokens were written to the cache.
            out = self.ops.paged(q, *kv_cache, batch.block_tables, batch.seqlen, self.scale, self.window,
                                 key=k, value=v, k_scale=self.k_scale, v_scale=self.v_scale)
        else:
            out = self.ops.paged(q, *kv_cache, batch.block_tables, batch.seqlen, self.scale, self.window,
                                 k_scale=self.k_scale, v_scale=self.v_scale)
        return out

    def output(self, attended: torch.Tensor, batch: BatchMetadata) -> torch.Tensor:
        return self.o_proj(attended.reshape(-1, self.num_heads * self.head_dim), batch.adapter_data)

    def write_cache(self, k, v, kv_cache, batch: BatchMetadata) -> None:
        if batch.prefill_cache_indices is not None:
            # With a sliding window only the last W tokens of a prompt are cached (upstream's contract).
            k, v = k[batch.prefill_cache_indices], v[batch.prefill_cache_indices]
        self.ops.write_kv(k, v, *kv_cache, batch.slots, k_scale=self.k_scale, v_scale=self.v_scale)


def load_kv_scales(weights, prefix: str) -> Tuple[float, float]:
    """The layer's FP8 KV-cache scales from `{prefix}.k_scale` / `.v_scale` (or one `.kv_scale` for both), as
    vLLM's FP8 checkpoints store them; 1.0 where the checkpoint has none."""
    scales = []
    for name in ("k_scale", "v_scale"):
        for stored in (f"{prefix}.{name}", f"{prefix}.kv_scale"):
            if weights.has(stored):
                tensor = weights.read_stored(stored)[0]  # as stored: a bfloat16 cast would round the scale
                if tensor.numel() != 1:
                    raise CheckpointError(f"tensor {stored}: a KV-cache scale is one number, found shape "
                                          f"{list(tensor.shape)}")
                if tensor.device.type == "meta":
                    scales.append(1.0)
                    break
                value = float(tensor.float().reshape(-1)[0])
                if not value > 0.0 or value == float("inf"):
                    raise CheckpointError(f"tensor {stored}: a KV-cache scale must be a positive finite number, "
                                          f"got {value}")
                scales.append(value)
                break
        else:
            scales.append(1.0)
    return scales[0], scales[1]


# ---------------------------------------------------------------------------------------------------
# Decoder layer, model, causal LM
# ---------------------------------------------------------------------------------------------------


class MixtralRMSNorm(RMSNorm):
    """Upstream's norm: weight `{prefix}.weight` from the checkpoint; forward(x, residual) -> (normed, x + residual)."""

    def __init__(self, prefix: str, weights, eps: float = 1e-6, hidden_size: Optional[int] = None):
        shape = (hidden_size,) if hidden_size is not None else None
        super().__init__(weights.get_tensor(f"{prefix}.weight", shape=shape), eps)


class MixtralLayer(nn.Module):
    def __init__(self, prefix: str, layer_id: int, config: MixtralConfig, weights, moe_cls=BlockSparseMoE):
        super().__init__()
        prefix = f"{prefix}.layers.{layer_id}"
        self.self_attn = MixtralAttention(f"{prefix}.self_attn", config, weights, layer_id)
        self.moe = moe_cls(f"{prefix}.block_sparse_moe", config, weights, layer_id)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = MixtralRMSNorm(f"{prefix}.input_layernorm", weights, eps, h)
        self.post_attention_layernorm = MixtralRMSNorm(f"{prefix}.post_attention_layernorm", weights, eps, h)

    def forward(self, x, residual, batch: BatchMetadata, kv_cache):
        """x is the previous layer's output, residual the stream before it; returns the same pair."""
        q, k, v, residual = self.enter(x, residual, batch, kv_cache)
        return self.leave(self.self_attn.attend(q, k, v, batch, kv_cache), residual, batch)

    def enter(self, x, residual, batch: BatchMetadata, kv_cache):
        """Up to the attention: the input norm and q, k, v (k and v written to the cache), and the residual."""
        normed, residual = self.input_layernorm(x, residual)
        return (*self.self_attn.project(normed, batch, kv_cache), residual)

    def leave(self, attended, residual, batch: BatchMetadata):
        """From the attention on: o_proj, the post-attention norm and the experts; (output, residual)."""
        normed, residual = self.post_attention_layernorm(self.self_attn.output(attended, batch), residual)
        return self.moe(normed, batch.adapter_data), residual


class MixtralModel(nn.Module):
    def __init__(self, prefix: str, config: MixtralConfig, weights, moe_cls=BlockSparseMoE):
        super().__init__()
        check_divisible("intermediate_size of the experts", config.intermediate_size, weights.process_group.size())
        self.embed_tokens = TensorParallelEmbedding(
            weights, f"{prefix}.embed_tokens.weight", config.vocab_size, config.hidden_size
        )
        self.layers = nn.ModuleList(
            MixtralLayer(prefix, i, config, weights, moe_cls) for i in range(config.num_hidden_layers)
        )
        self.norm = MixtralRMSNorm(f"{prefix}.norm", weights, config.rms_norm_eps, config.hidden_size)
        self.rotary = RotaryEmbedding(config.rope_parameters, config.head_dim, config.max_position_embeddings)
        self.rotary.to(self.norm.weight.device)

    def forward(self, input_ids, position_ids, kv_cache: List[Tuple[torch.Tensor, torch.Tensor]],
                batch_fields: dict) -> torch.Tensor:
        """Returns the final normed hidden states [T, H]."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, x.dtype)
        batch = make_batch_metadata(cos, sin, **batch_fields)
        residual = None
        for layer, layer_cache in zip(self.layers, kv_cache):
            x, residual = layer(x, residual, batch, layer_cache)
        return self.norm(x, residual)[0]

    # The step cut at each attention (engine.step_graphs replays the pieces between them from CUDA graphs).

    @staticmethod
    def piece_metadata(cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor) -> BatchMetadata:
        """What a layer's `enter` and `leave` read of a batch without adapters: the rotary tables and the slots."""
        return BatchMetadata(cos, sin, None, None, slots, None, 0, None, None, False)

    @staticmethod
    def attention_metadata(cu_seqlen_prefill, block_tables, slots, seqlen: Seqlen) -> BatchMetadata:
        """What a layer's attention (`attend`) reads of a batch."""
        return make_batch_metadata(None, None, cu_seqlen_prefill, block_tables, slots, seqlen, seqlen.max_k, None,
                                   None)


class FlashMixtralForCausalLM(nn.Module):
    """The LoRAX entry point: `forward(...) -> (logits, speculative_logits)` with LoRAX's keywords."""

    def __init__(self, prefix: str, config: MixtralConfig, weights, moe_cls=BlockSparseMoE):
        super().__init__()
        self.config = config
        base = f"{prefix}.model" if prefix else "model"
        self.model = MixtralModel(base, config, weights, moe_cls)
        head_name = f"{base}.embed_tokens.weight" if config.tie_word_embeddings else \
            (f"{prefix}.lm_head.weight" if prefix else "lm_head.weight")
        self.lm_head = TensorParallelHead(weights, head_name, config.vocab_size, config.hidden_size)
        # What a KV cache for this rank holds per token: [kv heads on this rank, head_dim].
        self.num_kv_heads = self.model.layers[0].self_attn.num_kv_heads if self.model.layers else 0
        self.head_dim = config.head_dim

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlen_prefill: Optional[torch.Tensor],
                kv_cache: List[Tuple[torch.Tensor, torch.Tensor]], block_tables: torch.Tensor, slots: torch.Tensor,
                seqlen: Seqlen, max_s: int, adapter_data=None, prefill_cache_indices: Optional[torch.Tensor] = None,
                lm_head_indices: Optional[torch.Tensor] = None, skip_lm_head: bool = False):
        """input_ids, position_ids [T]; cu_seqlen_prefill [B+1] or None in decode; see DESIGN.md section 3.

        Returns (logits [T or len(lm_head_indices), vocab], None); with skip_lm_head, the final hidden
        states in place of the logits. Speculative heads are not supported, hence None.
        """
        if prefill_cache_indices is not None:
            # As upstream's engine calls it: one slot per new token, but only the windowed tokens are cached.
            slots = slots[prefill_cache_indices]
        fields = dict(cu_seqlen_prefill=cu_seqlen_prefill, block_tables=block_tables, slots=slots, seqlen=seqlen,
                      max_s=max_s, prefill_cache_indices=prefill_cache_indices, adapter_data=adapter_data)
        hidden = self.model(input_ids, position_ids, kv_cache, fields)
        if lm_head_indices is not None:
            hidden = hidden[lm_head_indices]
            adapter_data = adapter_data.select(lm_head_indices) if adapter_data is not None else None
        if skip_lm_head:
            return hidden, None
        return self.compute_logits(hidden, adapter_data), None

    def compute_logits(self, hidden: torch.Tensor, adapter_data=None) -> torch.Tensor:
        logits = self.lm_head(hidden, gather=adapter_data is None)
        if adapter_data is None:
            return logits
        adapter_data.add_lora(logits, hidden, LM_HEAD_LAYER_ID, LM_HEAD)
        return self.lm_head.gather(logits)
