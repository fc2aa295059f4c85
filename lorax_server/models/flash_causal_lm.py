"""The engine: a model, its tokenizer and its paged cache, generating for a batch of prompts.

Prefill packs every prompt into one forward pass; each decode step then feeds one token per unfinished
sequence. Finished sequences give their blocks back at once.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from lorax_server.adapters.store import AdapterStore
from lorax_server.models.paged_cache import PagedKVCache, PagedSequence, mark_cached, pack_forward
from lorax_server.utils.tokens import SamplingParams, next_tokens

DEFAULT_BLOCK_SIZE = 16


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: List[int]
    finish_reason: str  # "length" or "eos"


class FlashCausalLM:
    def __init__(self, model, tokenizer, dtype: torch.dtype, device, num_blocks: int,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        self.model = model
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.device = torch.device(device)
        config = model.config
        self.cache = PagedKVCache(config.num_hidden_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim,
                                  dtype, device)
        self.eos_token_id = config.eos_token_id
        self.adapters = AdapterStore(config, model.lm_head.process_group, dtype, device)

    def encode(self, text: str) -> List[int]:
        ids = self.tokenizer(text)["input_ids"]
        if not ids:
            raise ValueError("the prompt is empty after tokenization")
        return ids

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 adapter_indices: Optional[Sequence[int]] = None):
        """Generates for every prompt in one batch; `adapter_indices[i]` picks prompt i's adapter (0 = base)."""
        adapter_indices = list(adapter_indices or [0] * len(prompts))
        self.adapters.check_loaded(adapter_indices)
        seqs = [PagedSequence(self.encode(p), adapter) for p, adapter in zip(prompts, adapter_indices)]
        prompt_lens = [len(s.tokens) for s in seqs]
        generator = torch.Generator(device=self.device).manual_seed(params.seed) if params.seed is not None else None
        done = [None] * len(seqs)
        counts, prefill = prompt_lens, True
        try:
            while True:
                active = [i for i, reason in enumerate(done) if reason is None]
                if not active:
                    break
                batch = [seqs[i] for i in active]
                inputs = pack_forward(batch, counts, self.cache, prefill, self.device)
                adapter_data = self.adapters.batch_data(inputs.pop("token_adapters"))
                logits, _ = self.model(**inputs, adapter_data=adapter_data)
                mark_cached(batch, counts)
                for i, token in zip(active, next_tokens(logits, params, generator).tolist()):
                    seqs[i].tokens.append(token)
                    done[i] = self.finish_reason(token, len(seqs[i].tokens) - prompt_lens[i], max_new_tokens)
                    if done[i] is not None:
                        self.cache.free(seqs[i].blocks)
                        seqs[i].blocks = []
                counts = [1] * sum(r is None for r in done)
                prefill = False
        finally:
            for seq in seqs:
                self.cache.free(seq.blocks)
                seq.blocks = []
        return [Generation(p, self.tokenizer.decode(s.tokens[n:], skip_special_tokens=True), s.tokens[n:], r)
                for p, s, n, r in zip(prompts, seqs, prompt_lens, done)]

    def finish_reason(self, token: int, generated: int, max_new_tokens: int):
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        if token in eos:
            return "eos"
        return "length" if generated >= max_new_tokens else None
