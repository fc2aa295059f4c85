"""The model runner: one forward pass over the engine's sequences, and the choice of their next tokens.

The engine (`models/flash_causal_lm.py`) keeps requests, batches and blocks. The runner turns the
sequences of one step into a typed `ForwardBatch`, adds the adapters' batch data, replays a CUDA graph
for a decode step where one fits (else calls the model), and samples the whole batch.

Packing never waits for the GPU: every length a kernel needs on the host (the longest query and key
runs) comes from the host's own lists, and the tensors travel in two copies (one int64, one int32). So
the host queues the whole step, forward and sampling, and meets the GPU once, when the sampler returns.
"""

import itertools
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch

from lorax_server.adapters.store import AdapterStore
from lorax_server.engine.cache import PagedKVCache, PagedSequence
from lorax_server.engine.graphs import DecodeGraphs
from lorax_server.engine.sampler import NON_FINITE, BatchSampler, Choice, LaunchedStep, advance_grammars
from lorax_server.engine.step_graphs import StepGraphs
from lorax_server.engine.step_graphs import enabled_by_env as step_graphs_enabled
from lorax_server.utils.attention.common import Seqlen

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForwardBatch:
    """One forward pass, packed: the new tokens of B sequences back to back (T tokens in all)."""

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64
    slots: torch.Tensor  # [T] int64: the cache slot each token's K/V goes to
    token_adapters: torch.Tensor  # [T] int64: the adapter index of each token (0 = base)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with block 0
    seqlen: Seqlen  # new and cached lengths; max_q / max_k known on the host
    cu_seqlen_prefill: Optional[torch.Tensor]  # [B+1] int32 in a prefill, None in a decode step
    lm_head_indices: Optional[torch.Tensor]  # [B] int64: the token whose logits each sequence wants; None: all
    adapter_indices: FrozenSet[int]  # the adapters present, known on the host

    @property
    def size(self) -> int:
        """B, the sequences in the batch."""
        return self.block_tables.shape[0]

    def model_inputs(self, kv_cache, adapter_data=None) -> dict:
        """The keywords of the model's forward (LoRAX's names)."""
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, cu_seqlen_prefill=self.cu_seqlen_prefill,
                    kv_cache=kv_cache, block_tables=self.block_tables, slots=self.slots, seqlen=self.seqlen,
                    max_s=self.seqlen.max_k, lm_head_indices=self.lm_head_indices, adapter_data=adapter_data)


def pack(seqs: Sequence[PagedSequence], new_counts: Sequence[int], cache: PagedKVCache, prefill: bool,
         device, all_logits: bool = False, tables: Optional["BlockTables"] = None) -> ForwardBatch:
    """The batch that runs `new_counts[i]` uncached tokens of each sequence (reserving any block they still
    need: the engine's requests reserved theirs at admission). `all_logits`: logits for every token, not
    only each sequence's last. `tables`: where the batch's block table may be kept from step to step (the
    steps of a prompt prefilled in chunks share one: 33k ints a step for a 16k-token prompt beside 32
    decodes, the largest part of the step's host-to-device copy)."""
    block_size = cache.block_size
    ids, positions, slots, adapters = [], [], [], []
    for seq, count in zip(seqs, new_counts):
        seq.reserve(cache, seq.cached + count)
        span = range(seq.cached, seq.cached + count)
        ids += seq.tokens[seq.cached:seq.cached + count]
        positions += span
        slots += [seq.blocks[p // block_size] * block_size + p % block_size for p in span]
        adapters += [seq.adapter_index] * count
    cu = list(itertools.accumulate(new_counts, initial=0))
    last = [end - 1 for end in cu[1:]]
    width = max(len(s.blocks) for s in seqs)
    cached = [s.cached for s in seqs]
    kept = tables.get(seqs, device) if tables is not None else None
    flat_table = [] if kept is not None else [b for s in seqs for b in s.blocks + [0] * (width - len(s.blocks))]

    input_ids, position_ids, slot_ids, token_adapters, last_rows = to_device_sections(
        [ids, positions, slots, adapters, [] if all_logits else last], torch.int64, device)
    input_lengths, cache_lengths, cu_seqlens, table = to_device_sections(
        [list(new_counts), cached, cu, flat_table], torch.int32, device)
    table = kept if kept is not None else table.view(len(seqs), width)
    seqlen = Seqlen(input_lengths, cache_lengths, cu_seqlens, max_q=max(new_counts),
                    max_k=max(c + n for c, n in zip(cached, new_counts)), max_cached=max(cached),
                    min_q=min(new_counts))
    return ForwardBatch(
        input_ids=input_ids, position_ids=position_ids, slots=slot_ids, token_adapters=token_adapters,
        block_tables=table, seqlen=seqlen, cu_seqlen_prefill=cu_seqlens if prefill else None,
        lm_head_indices=None if all_logits else last_rows, adapter_indices=frozenset(adapters),
    )


def pack_decode(seqs: Sequence[PagedSequence], cache: PagedKVCache, device, tables: "BlockTables",
                input_ids: Optional[torch.Tensor] = None) -> ForwardBatch:
    """`pack` for a decode step (one new token per sequence), with less host work: one copy of 2-3B ints, the
    block table from `tables` (a batch's table only changes with the batch), the slots computed on the device.
    `input_ids` [B] on the device: the tokens the previous step chose there (the host does not know them yet)."""
    block_size = cache.block_size
    for seq in seqs:
        seq.reserve(cache, seq.cached + 1)
    B = len(seqs)
    cached = [s.cached for s in seqs]
    host_ids = [s.tokens[s.cached] for s in seqs] if input_ids is None else []
    positions, token_adapters, host_ids = to_device_sections(
        [cached, [s.adapter_index for s in seqs], host_ids], torch.int64, device)
    table = tables.get(seqs, device)
    slots = table.gather(1, (positions // block_size).unsqueeze(1)).squeeze(1) * block_size + positions % block_size
    ones = torch.ones(B, dtype=torch.int32, device=device)
    cu = torch.arange(B + 1, dtype=torch.int32, device=device)
    rows = torch.arange(B, dtype=torch.int64, device=device)
    seqlen = Seqlen(ones, positions.to(torch.int32), cu, max_q=1, max_k=max(cached) + 1)
    return ForwardBatch(input_ids=host_ids if input_ids is None else input_ids, position_ids=positions,
                        slots=slots, token_adapters=token_adapters,
                        block_tables=table, seqlen=seqlen, cu_seqlen_prefill=None, lm_head_indices=rows,
                        adapter_indices=frozenset(s.adapter_index for s in seqs))


class BlockTables:
    """Device block tables of the last few batches. A request's blocks are reserved when it is admitted and
    never change while it lives, so a decode batch's table changes only with the batch; keyed by each
    sequence's identity and block count, and holding the sequences, so no key is reused while it is here."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.tables: Dict[tuple, Tuple[Sequence[PagedSequence], torch.Tensor]] = {}

    def get(self, seqs: Sequence[PagedSequence], device) -> torch.Tensor:
        key = tuple((id(s), len(s.blocks)) for s in seqs)
        hit = self.tables.pop(key, None)
        if hit is None:
            width = max(len(s.blocks) for s in seqs)
            table = to_device([b for s in seqs for b in s.blocks + [0] * (width - len(s.blocks))], torch.int32, device)
            hit = (list(seqs), table.view(len(seqs), width))
        self.tables[key] = hit  # the most recent last
        while len(self.tables) > self.keep:
            del self.tables[next(iter(self.tables))]
        return hit[1]

    def clear(self) -> None:
        self.tables.clear()


# A copy from pageable memory is staged by the driver in small pieces, and a large one can make the host wait
# for the stream to reach it: a chunk step's 135 KB block table (33 rows x 1025 blocks) waited for the step
# before it. Lists this long go through page-locked memory (PyTorch's pinned-memory cache) instead.
PINNED_COPY_VALUES = 4096


def to_device(values: List[int], dtype: torch.dtype, device) -> torch.Tensor:
    """One host-to-device copy of a list of ints (the host does not wait for it)."""
    host = torch.tensor(values, dtype=dtype)
    if len(values) >= PINNED_COPY_VALUES and torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


# Triton compiles a kernel anew for each pattern of which pointer arguments are 16-byte aligned. Slices of one
# packed copy start wherever the previous section ended, so the pattern changed with the batch size, and a
# batch of a size not met before waited for a compile (measured: a 64-request prefix-cache hit took 3.4 s on
# an H200 where 0.4 s was the work). Every section starts on this boundary instead.
ALIGN_BYTES = 16


def to_device_sections(sections: Sequence[List[int]], dtype: torch.dtype, device) -> List[torch.Tensor]:
    """One host-to-device copy of several lists of ints; one tensor per list, each starting ALIGN_BYTES-aligned."""
    per_boundary = ALIGN_BYTES // dtype.itemsize
    flat: List[int] = []
    bounds = []
    for values in sections:
        flat += values
        bounds.append((len(flat) - len(values), len(flat)))
        flat += [0] * (-len(flat) % per_boundary)
    packed = to_device(flat, dtype, device)
    return [packed[start:end] for start, end in bounds]


def mark_cached(seqs: Sequence[PagedSequence], new_counts: Sequence[int]) -> None:
    for seq, count in zip(seqs, new_counts):
        seq.cached += count


# Prompt lengths the warm-up prefills: one in each row of the fused MoE's tile table (kernels/fused_moe.py,
# rows up to 2, 5, 11, 32, 128, 512 and 2048 tokens; the fused kernels take up to 1024) and of the attention's.
PLAIN_WARM_UP = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ModelRunner:
    """Runs the model over packed sequences and chooses next tokens; knows nothing of requests' text or lifetimes."""

    def __init__(self, model, cache: PagedKVCache, adapters: AdapterStore, device: torch.device):
        self.model = model
        self.cache = cache
        self.adapters = adapters
        self.device = device
        self.sampler = BatchSampler(device)
        self.tables = BlockTables()
        self.graphs = None
        self.step_graphs = None  # prefill and mixed steps in pieces between attentions (engine.step_graphs)
        if device.type == "cuda" and os.getenv("LORAX_CUDA_GRAPHS", "1") != "0":
            self.graphs = DecodeGraphs(model, cache.layers, cache.block_size, model.config.max_position_embeddings)
            if step_graphs_enabled(model.lm_head.process_group.size()):
                self.step_graphs = StepGraphs(model, cache.layers)

    def forward(self, seqs: Sequence[PagedSequence], new_counts: Sequence[int], prefill: bool,
                all_logits: bool = False, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of each sequence's last new token [B, V] (every new token's [T, V] with `all_logits`);
        the new tokens' K/V are in the cache afterwards. `input_ids`: a decode step's tokens, on the device."""
        if prefill or all_logits or any(n != 1 for n in new_counts):
            batch = pack(seqs, new_counts, self.cache, prefill, self.device, all_logits=all_logits, tables=self.tables)
        else:
            batch = pack_decode(seqs, self.cache, self.device, self.tables, input_ids)
        adapter_data = self.adapters.batch_data(batch.token_adapters, batch.adapter_indices)
        logits = None
        if not prefill and self.graphs is not None:
            logits = self.graphs.run(batch, adapter_data, self.adapters.stacks)
            if logits is None and self.step_graphs is not None and adapter_data is None:
                # a batch above the decode graphs' largest bucket (1024 rows) would otherwise launch eagerly
                logits = self.step_graphs.run(batch)
        elif prefill and self.step_graphs is not None and adapter_data is None and not all_logits:
            logits = self.step_graphs.run(batch)
        if logits is None:
            logits, _ = self.model(**batch.model_inputs(self.cache.layers, adapter_data))
        mark_cached(seqs, new_counts)
        return logits

    def warm_up_prefill(self, prefixes: Sequence[int] = (512, 1024), plain_tokens: Sequence[int] = PLAIN_WARM_UP,
                        query_tokens: Sequence[int] = (16, 32, 64, 128),
                        beside_chunk: Sequence[int] = (1, 8, 16)) -> None:
        """Runs one prefill per kernel variant serving can meet, so that Triton compiles them here and not when
        the first such request arrives, stalling the whole batch for a second or more (measured on an H200:
        2.8 s for the first chunk on a cached prefix, 2.0 s for the first 1024-token chunk): prompts of
        `plain_tokens` (the attention's row tiles and every token-count row of the fused MoE's tile table up to
        the 1024 tokens it takes), then new tokens on cached prefixes
        (prefix caching, chunked prefill) at `query_tokens` rows: on 512 cached tokens one program per row tile
        (128 new tokens there take the long-prefix tile), on 1024 the prefix split over several (split-KV,
        kernels/prefill_attention.py); and, where the cache has room for two such sequences, a chunk beside
        decodes (`beside_chunk` new tokens on a prefix, which take the attention's short-row launch: its tile
        follows the shortest run, found on an H200 compiling 1.6 s into the first chunk step). Uses free blocks
        (which forget any prefix recorded in them) and gives them back; call it with no batch alive, before any
        prefix is cached."""
        longest = max([p + n for p in prefixes for n in query_tokens] + list(plain_tokens) + list(prefixes))
        seq, other = PagedSequence(tokens=[0] * longest), PagedSequence(tokens=[0] * longest)
        runs = [((0, n),) for n in sorted({*plain_tokens, *prefixes})]
        runs += [((p, n),) for p in prefixes for n in query_tokens]
        if len(self.cache.free_blocks) >= 2 * self.cache.blocks_for(longest):
            runs += [((p, max(query_tokens)), (p, n)) for p in prefixes for n in beside_chunk]
        step_graphs, self.step_graphs = self.step_graphs, None  # the eager kernels (adapters' steps take them)
        try:
            for run in runs:
                seqs = [seq, other][:len(run)]
                for s, (cached, _) in zip(seqs, run):
                    s.cached = cached
                self.forward(seqs, [count for _, count in run], prefill=True)
        finally:
            self.step_graphs = step_graphs
            self.cache.free(seq.blocks)
            self.cache.free(other.blocks)

    def forget_tables(self) -> None:
        """Drops the cached block tables (the engine is idle: no batch will need them again)."""
        self.tables.clear()

    def sample(self, requests: Sequence, logits: torch.Tensor) -> List[Choice]:
        """One Choice per request (see `start`, through which every choice goes), waiting for them."""
        return self.start(requests, logits).collect()

    def start(self, requests: Sequence, logits: torch.Tensor) -> "PendingChoices":
        """Launches the choice of each request's next token from its row of `logits` [B, V]; the choices are
        read (one host synchronisation) when `collect` is called."""
        try:
            return PendingChoices(requests, logits, self.sampler.launch(logits, requests))
        except Exception:
            logger.exception("batched sampling failed; each request of the batch samples alone")
        return PendingChoices(requests, logits, None)


@dataclass
class PendingChoices:
    """The choices of one step for `requests`, launched by the batched sampler; should it fail (launched is
    None, or reading it raises), each request samples alone with its own chooser (the per-request oracle),
    so a failure stays with its request."""

    requests: Sequence
    logits: torch.Tensor
    launched: Optional[LaunchedStep]
    # Set by a `collect` that fell back after the batched launch: the device's tokens (which a following step
    # may already have been fed, engine.pipeline) are not the ones chosen.
    device_tokens_dropped: bool = False

    @property
    def device_tokens(self) -> Optional[torch.Tensor]:
        """[B] the chosen tokens on the device, before they are collected (None without a batched launch)."""
        return self.launched.tokens if self.launched is not None else None

    def collect(self) -> List[Choice]:
        if self.launched is not None:
            try:
                return self.launched.collect()
            except Exception:
                logger.exception("batched sampling failed; each request of the batch samples alone")
                self.device_tokens_dropped = True
        return [sample_alone(r, row) for r, row in zip(self.requests, self.logits)]


def sample_alone(r, logits: torch.Tensor) -> Choice:
    """The per-request oracle's choice for one request (the fallback of a failed batched step); a grammar
    masks its row first and takes the token after, as in the batched step."""
    r.counts = None  # this step's token is not counted there: the next batched step recounts the sequence
    grammar = getattr(r, "grammar", None)
    try:
        token, logprob, alternatives = r.chooser(grammar.masked(logits) if grammar else logits, r.seq.tokens)
    except Exception as error:
        return Choice(0, math.nan, error=f"{type(error).__name__}: {error}")
    choice = Choice(token, logprob, alternatives, None if math.isfinite(logprob) else NON_FINITE)
    if grammar is not None:
        advance_grammars([choice], [(0, grammar)])
    return choice
