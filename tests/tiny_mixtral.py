"""Tiny random Mixtral checkpoints written by transformers, and our model run over them the LoRAX way."""

from pathlib import Path
from typing import List, Sequence

import torch
import transformers

from lorax_server.models.custom_modeling.flash_mixtral_modeling import FlashMixtralForCausalLM, MixtralConfig
from lorax_server.engine.cache import PagedKVCache, PagedSequence
from lorax_server.engine.runner import mark_cached, pack
from lorax_server.utils.dist import FakeGroup
from lorax_server.utils.weights import Weights, weight_files

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def save_tiny_mixtral(directory: Path, seed: int = 0, **overrides) -> transformers.MixtralForCausalLM:
    """Writes a random transformers Mixtral to `directory` and returns it (fp32, eval mode).

    The router weights are scaled up so each token's top-k is decisive: two correct implementations
    then pick the same experts despite float rounding.
    """
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(**{**TINY, **overrides})
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(20.0)
    model.save_pretrained(directory)
    return model


def load_ours(directory: Path, group=None, dtype=torch.float32, device="cpu", **kwargs) -> FlashMixtralForCausalLM:
    config = MixtralConfig.from_pretrained(directory)
    weights = Weights(weight_files(directory), device, dtype, group or FakeGroup(0, 1))
    return FlashMixtralForCausalLM("", config, weights, **kwargs).eval()


@torch.no_grad()
def reference_logits(hf_model, tokens: Sequence[int]) -> torch.Tensor:
    """transformers' logits for every position of one sequence [len, vocab]."""
    return hf_model(torch.tensor([list(tokens)])).logits[0]


@torch.no_grad()
def paged_logits(model, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], block_size: int = 16,
                 num_blocks: int = 64, seed: int = 0, adapters=None, adapter_indices=None, device="cpu",
                 dtype=torch.float32) -> List[torch.Tensor]:
    """Our logits for every position: one ragged prefill of the prompts, then teacher-forced decode steps.

    Blocks come from a shuffled free list, so sequences own scattered, non-contiguous blocks. With an
    AdapterStore, sequence i uses adapter `adapter_indices[i]`.
    """
    config = model.config
    cache = PagedKVCache(config.num_hidden_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim,
                         dtype, device, shuffle_seed=seed)
    adapter_indices = adapter_indices or [0] * len(sequences)
    seqs = [PagedSequence(list(tokens), adapter) for tokens, adapter in zip(sequences, adapter_indices)]
    outputs = [[] for _ in seqs]
    step = list(prompt_lens)
    prefill = True
    while True:
        active = [i for i, s in enumerate(seqs) if s.cached < len(s.tokens)]
        if not active:
            return [torch.cat(o) for o in outputs]
        counts = [step[i] if prefill else 1 for i in active]
        batch = pack([seqs[i] for i in active], counts, cache, prefill, device, all_logits=True)
        adapter_data = adapters.batch_data(batch.token_adapters) if adapters is not None else None
        logits, _ = model(**batch.model_inputs(cache.layers, adapter_data))
        for i, piece in zip(active, logits.split(counts)):
            outputs[i].append(piece)
        mark_cached([seqs[i] for i in active], counts)
        prefill = False


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
