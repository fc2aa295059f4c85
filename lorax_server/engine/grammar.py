"""Structured output: the tokens a JSON schema allows next, as a mask over the logits, per request and per batch.

Dimensions: B rows of the batch (one per request), V the vocabulary (the logits' width), W = ceil(V' / 32)
int32 words of a row's bitmask, V' the vocabulary the grammar library was given (the model's, normally V).

The grammar library is llguidance (Earley parser over a lazily built lexer; the README says why it was
chosen over xgrammar and outlines-core). Its three objects map onto ours:
- `GrammarCompiler`, one per engine: the tokenizer as llguidance sees it (built at the first compile, about
  0.3 s for a 32k vocabulary) and the compiled schemas, least recently used evicted first;
- `Grammar`, one per schema string: a matcher at the start of the output, which each request copies;
- `GrammarState`, one per request: where its output is in the grammar. It fills its row of a batch bitmask,
  accepts the chosen token, and is `finished` once the output is complete (the grammar then allows only EOS).

A bitmask row is W int32 words, bit j of word w set when token 32w + j is allowed (the layout llguidance,
xgrammar and outlines-core share). `mask_logits` builds the rows of a batch's constrained requests on the
host (in parallel on llguidance's thread pool when there are enough of them), copies the bitmask to the
device once, and adds -inf to the disallowed tokens in one out-of-place pass; free rows keep their values.

JSON is generated compactly, with the separators of Python's json.dumps (", " and ": ") and no other
whitespace: a model cannot then loop on whitespace, which flexible JSON whitespace lets it do.
Keywords llguidance does not implement (uniqueItems, not, dependentRequired, ...) refuse the schema rather
than being ignored, so that every complete output is valid against the schema it was asked for.
"""

import copy
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import torch

from lorax_server.utils.errors import RequestError, bounded

logger = logging.getLogger(__name__)

NEG_INF = float("-inf")

# Compiled schemas kept per engine. A compiled JSON schema is a few hundred kB at most (its lexer states are
# built as outputs visit them), and clients of one deployment tend to reuse a handful of schemas.
COMPILE_CACHE_SIZE = 256
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Threads of llguidance's pool for a batch's masks. LORAX_GRAMMAR_THREADS overrides; 0 or 1 fills the rows
# one after the other in the calling thread. Below PARALLEL_MIN_ROWS rows the pool's hand-off costs more
# than it saves (bench/grammar.py measures both).
DEFAULT_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))
PARALLEL_MIN_ROWS = 8


def llguidance():
    try:
        import llguidance as module
    except ImportError as error:  # a dependency of the package: only a broken install lacks it
        raise RequestError("structured output needs the llguidance package (pip install llguidance)") from error
    return module


class GrammarCompiler:
    """Compiles JSON schemas for one tokenizer and caches them by schema string.

    `vocab_size` is the model's (the logits' width), which may exceed the tokenizer's: ids past the
    tokenizer's are never allowed. `eos_token_ids` are the ids that end a request (the engine's)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[Optional[int]],
                 cache_size: int = COMPILE_CACHE_SIZE):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = [int(i) for i in eos_token_ids if i is not None]
        if not self.eos_token_ids and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids = [tokenizer.eos_token_id]
        self.cache_size = cache_size
        self.cache: "OrderedDict[str, Grammar]" = OrderedDict()
        self.hits = self.misses = 0
        self._ll_tokenizer = None

    def warm(self) -> None:
        """Builds llguidance's tokenizer now rather than at the first schema (0.3-0.6 s for 32k tokens)."""
        self.ll_tokenizer  # noqa: B018

    @property
    def ll_tokenizer(self):
        """llguidance's view of the tokenizer: every token's bytes, built once."""
        if self._ll_tokenizer is None:
            self._ll_tokenizer = self.build_tokenizer()
        return self._ll_tokenizer

    def build_tokenizer(self):
        if not self.eos_token_ids:
            raise RequestError("structured output needs an EOS token, and this model has none")
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise RequestError("structured output needs a tokenizer backed by the tokenizers library "
                               f"(tokenizer.json); this one is {type(self.tokenizer).__name__}")
        # The serialized Rust tokenizer, added tokens included; padding and truncation do not belong there.
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        n_vocab = max(self.vocab_size, backend.get_vocab_size(with_added_tokens=True))
        return llguidance().LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=self.eos_token_ids)

    def compile(self, schema: str) -> "Grammar":
        """The compiled grammar of a JSON schema string, from the cache when it was compiled before.
        Raises RequestError, saying why, for text that is not JSON or a schema that cannot be served."""
        grammar = self.cache.get(schema)
        if grammar is not None:
            self.hits += 1
            self.cache.move_to_end(schema)
            return grammar
        self.misses += 1
        grammar = Grammar(self.matcher_for(schema), self.words)
        self.cache[schema] = grammar
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return grammar

    def state(self, schema: str) -> "GrammarState":
        """A new request's state at the start of its output."""
        return self.compile(schema).start()

    @property
    def words(self) -> int:
        """W: int32 words of one bitmask row, for the vocabulary llguidance was given."""
        return (self.ll_tokenizer.vocab_size + 31) // 32

    def matcher_for(self, schema: str):
        ll = llguidance()
        parsed = parse_schema(schema)
        try:
            grammar = ll.LLMatcher.grammar_from_json_schema(parsed, defaults=JSON_OPTIONS)
        except ValueError as error:
            raise RequestError(bounded(f"the schema cannot be compiled: {error}")) from None
        matcher = ll.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(bounded(f"the schema cannot be compiled: {matcher.get_error()}"))
        for warning in matcher.get_grammar_warnings():
            logger.warning("JSON schema compiled with a warning: %s", warning)
        # Some schemas compile and fail at their first mask (a "$ref" to itself): refused here, once per schema,
        # not after admission. The mask's work is shared with the requests' copies (the lexer), so not lost.
        probe = GrammarState(matcher.deep_copy(), self.words)
        probe.fill(torch.empty(1, self.words, dtype=torch.int32), 0)
        if probe.error is not None:
            raise RequestError(bounded(f"the schema cannot be served: {probe.error}"))
        return matcher


def parse_schema(schema: str) -> str:
    """The schema as llguidance takes it (a JSON object's text), or a RequestError naming the problem."""
    try:
        value = json.loads(schema)
    except (TypeError, ValueError) as error:
        raise RequestError(bounded(f"the schema is not valid JSON: {error}")) from None
    except RecursionError:  # valid JSON nested deeper than Python's parser goes (~1000 levels)
        raise RequestError("the schema nests too deeply to be read") from None
    if value is True:  # the schema that allows everything
        return "{}"
    if not isinstance(value, dict):
        raise RequestError(f"a JSON schema must be an object (or true), got {type(value).__name__}")
    return schema


class Grammar:
    """One compiled schema: a matcher at the start of the output, which each new request copies (the copy
    shares the grammar and its lexer, so what one request's masks built is there for the next)."""

    def __init__(self, start_matcher, words: int):
        self.start_matcher = start_matcher
        self.words = words

    def start(self) -> "GrammarState":
        return GrammarState(self.start_matcher.deep_copy(), self.words)


class GrammarState:
    """Where one request's output is in its grammar."""

    def __init__(self, matcher, words: int):
        self.matcher = matcher
        self.words = words

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the allowed next tokens into `bitmask[row]` ([B, W] int32, contiguous, on the host). Once
        finished, or after a refused token, only the EOS ids are allowed."""
        target = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(target.data_ptr(), self.words * 4)

    def accept(self, token: int) -> bool:
        """Advances by the chosen token; False (and `error` set) when the grammar does not allow it."""
        return self.matcher.consume_token(token) and not self.matcher.is_error()

    @property
    def finished(self) -> bool:
        """The output is complete: the grammar allows nothing but EOS now (or EOS was accepted)."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    @property
    def error(self) -> Optional[str]:
        """Why the grammar refused a token, once it has; None before."""
        if not self.matcher.is_error():
            return None
        reason = self.matcher.get_error().splitlines()[0]  # the lines after it dump the parser and the grammar
        return f"the output left its JSON schema: {reason}"

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] of one request -> a copy with -inf on the tokens the grammar does not allow next (the
        per-request path: `NextTokenChooser` takes the result as its logits)."""
        return mask_logits(logits[None], [(0, self)])[0]


def mask_logits(logits: torch.Tensor, rows: Sequence[Tuple[int, GrammarState]],
                threads: Optional[int] = None) -> torch.Tensor:
    """logits [B, V] on any device, rows: (row index, its state) for the constrained rows -> a new [B, V]
    tensor with -inf where those rows' grammars disallow a token; the other rows are copied unchanged.
    One host-to-device copy."""
    if not rows:
        return logits
    cuda = logits.device.type == "cuda"
    bitmask = host_bitmask(len(logits), rows, threads, pinned=cuda)  # [B, W]
    # From pinned memory the copy is queued without a host sync; the caching host allocator keeps the
    # buffer until it is done.
    return apply_bitmask(logits, bitmask.to(logits.device, non_blocking=cuda))


def host_bitmask(batch: int, rows: Sequence[Tuple[int, GrammarState]], threads: Optional[int] = None,
                 pinned: bool = False) -> torch.Tensor:
    """[B, W] int32 on the host: every bit set (all allowed) on free rows, the grammar's mask on the others."""
    words = rows[0][1].words
    bitmask = torch.full((batch, words), -1, dtype=torch.int32, pin_memory=pinned)
    threads = configured_threads() if threads is None else threads
    if threads > 1 and len(rows) >= PARALLEL_MIN_ROWS:
        executor(threads).unsafe_compute_mask_ptr([(s.matcher, i) for i, s in rows], bitmask.data_ptr(), words * 4,
                                                  batch)
    else:
        for i, state in rows:
            state.fill(bitmask, i)
    return bitmask


# Per (device, dtype): [256, 8], row b holding 0 where bit j of the byte b is set and -inf where it is clear.
BYTE_BIASES: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}


def byte_bias(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    table = BYTE_BIASES.get((device, dtype))
    if table is None:
        clear = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1) == 0  # [256, 8]
        table = BYTE_BIASES[(device, dtype)] = torch.zeros(256, 8, dtype=dtype).masked_fill(clear, NEG_INF).to(device)
    return table


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V], bitmask [B, W] on the same device -> logits + a bias of 0 where a bit is set and -inf
    where it is clear (and on any column past 32 W). The bias comes from the bitmask's bytes (little-endian:
    byte k of a row holds tokens 8k..8k+7) looked up in a 256-row table, one gather: on a CPU this is about
    ten times faster than unpacking the bits with shifts and a masked_fill. A NaN or +inf logit stays
    non-finite, so such a row still ends its request as in a free batch."""
    batch, vocab = logits.shape
    table = byte_bias(logits.device, logits.dtype)
    data = bitmask.contiguous().view(torch.uint8).view(-1).long()  # [B * 4W]
    bias = table.index_select(0, data).view(batch, -1)  # [B, 32 W]
    width = bias.shape[1]
    if width < vocab:  # logits wider than the grammar's vocabulary: the extra ids are never allowed
        bias = torch.cat([bias, bias.new_full((batch, vocab - width), NEG_INF)], dim=1)
    return logits + bias[:, :vocab]


def configured_threads() -> int:
    value = os.getenv("LORAX_GRAMMAR_THREADS")
    return DEFAULT_THREADS if value is None or value == "" else int(value)


EXECUTORS: Dict[int, object] = {}


def executor(threads: int):
    """llguidance's thread pool of `threads` threads, made once per size."""
    pool = EXECUTORS.get(threads)
    if pool is None:
        pool = EXECUTORS[threads] = llguidance().LLExecutor(threads)
    return pool
