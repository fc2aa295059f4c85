"""What the engine keeps per request and per batch, and what a step returns for each request.

A Request is a live generation: its sequence in the paged cache, its sampler state (chooser, penalty
counts) and its stopping rules, its incremental detokenizer. A Batch is the router's unit: the requests
it decodes together. A StepResult is what one request produced in one step (one generate.v1.Generation).
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from lorax_server.engine.cache import PagedSequence
from lorax_server.utils.tokens import NextTokenChooser, StoppingCriteria

DEFAULT_BLOCK_SIZE = 16


class BatchNotFound(KeyError):
    def __str__(self):
        return self.args[0]


@dataclass
class TokenChoice:
    id: int
    logprob: float
    text: str
    is_special: bool
    alternatives: List[Tuple[int, float, str]] = field(default_factory=list)


@dataclass
class StepResult:
    """What one request produced in one step (maps onto generate.v1.Generation)."""

    request_id: int
    token: TokenChoice
    prompt_tokens: Optional[List[TokenChoice]] = None  # with prefill_logprobs, on the first step
    prompt_length: int = 0  # set on the prefill step only (the router streams a prefill message when > 0)
    finish_reason: Optional[str] = None  # "length", "eos", "stop_sequence" or "error" once finished
    text: str = ""  # the whole generated text, once finished
    error: Optional[str] = None  # why the request ended alone (finish_reason "error")
    generated_ids: List[int] = field(default_factory=list)  # once finished
    seed: Optional[int] = None


@dataclass
class Request:
    id: int
    seq: PagedSequence
    prompt_length: int
    chooser: NextTokenChooser
    stopping: StoppingCriteria
    max_new_tokens: int
    prefill_logprobs: bool = False
    finish_reason: Optional[str] = None
    counts: Optional[torch.Tensor] = None  # [vocab] token counts on the device, for penalties (engine.sampler)
    decoder: object = None  # its incremental detokenizer (engine.text), made at its first token
    ahead: object = None  # its next token's Choice (engine.sampler), when a step launched ahead chose it
    grammar: object = None  # its place in its JSON schema (engine.grammar.GrammarState), for structured output
    cache_len: int = 0  # prompt tokens the router says its blocks already hold (prefix caching)
    next_chunk: Optional[int] = None  # prompt tokens its next prefill step runs (chunked prefill); None: the rest
    deferred: bool = False  # its chunk waited for the next pass (FlashCausalLM.prefill_step's defer_chunks)
    prompt_logprobs: Optional[List[float]] = None  # with prefill_logprobs: each prompt token's, chunk by chunk

    @property
    def prefilling(self) -> bool:
        """Whether part of its prompt is still to be prefilled (a chunked prefill runs over several steps)."""
        return self.seq.cached < self.prompt_length

    @property
    def chunk(self) -> int:
        """The prompt tokens its next prefill step runs."""
        rest = self.prompt_length - self.seq.cached
        return rest if self.next_chunk is None else max(1, min(self.next_chunk, rest))

    @property
    def tokens(self) -> List[int]:
        """The sequence so far: prompt and generated tokens."""
        return self.seq.tokens

    @property
    def generated(self) -> List[int]:
        return self.seq.tokens[self.prompt_length:]

    @property
    def cache_tokens(self) -> int:
        """Tokens whose K/V this request ever writes: the last new token is returned, never fed back."""
        return self.prompt_length + self.max_new_tokens - 1


@dataclass
class Batch:
    id: int
    requests: List[Request]
    block_size: int = DEFAULT_BLOCK_SIZE

    @property
    def max_tokens(self) -> int:
        """Cache tokens the batch holds, in whole blocks (upstream's CachedBatch.max_tokens), which the
        router subtracts from Warmup's max_supported_total_tokens when it budgets the next batch."""
        return sum(len(r.seq.blocks) for r in self.requests) * self.block_size

    @property
    def current_tokens(self) -> int:
        return sum(len(r.seq.tokens) for r in self.requests)

    @property
    def next_step_tokens(self) -> int:
        """Tokens its next forward pass runs: the next chunk of each request still prefilling, one token for every
        other (upstream's CachedBatch.current_tokens, which the router subtracts from its prefill budget when it
        chunks prefills: router/src/infer.rs:1101-1105)."""
        return sum(r.chunk if r.prefilling else 1 for r in self.requests)
