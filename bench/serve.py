"""Serving throughput and latency of full-size Mixtral-8x7B (random bf16 weights) through the engine, driven
the way LoRAX's router drives a shard.

What runs. `FlashCausalLM` (prefill, decode with its CUDA graphs, batched sampling, a Rust-backed synthetic
tokenizer's incremental text, stopping) on one GPU, or on each rank under torchrun with `--tp`. `RouterLoop`
below plays LoRAX's router (router/src/infer.rs `batching_task`, router/src/scheduler.rs `next_batch`,
upstream a7394ba): a FIFO waiting queue and one running batch; every iteration may prefill a new batch, and
then decodes the running batch and the new one together (the engine concatenates them). Requests leave the
batch when they finish. Every request is greedy with `ignore_eos`, so each makes exactly its output length;
prompts are random token ids.

The policy, as the router's code has it. A new batch takes waiting requests in order while its prompt tokens
stay within `max_batch_prefill_tokens` (default 16384), while the running batch's cache tokens plus the new
requests' stay within `max_batch_total_tokens` (what the KV cache holds), and while the batch stays within
`--max-batch` requests (default 0: no cap, as the router's default; session 4 capped it at 512). With a
batch running, a new one is only prefilled when it would hold at least floor(1.2 x running) requests
(`waiting_served_ratio`), or once 20 decode steps (`max_waiting_tokens`) passed since the last prefill.
A request's cache tokens are counted in whole blocks of prompt + output - 1, which is what the engine
reserves at admission (the router counts prompt + output tokens, which the shard's Warmup answer has to
absorb). `--waiting-served-ratio 0` prefills whenever something fits.

Workloads (TensorRT-LLM's table shapes, `--shapes 128x128 512x128 2048x128`, input x output tokens):
- closed loop: `--requests` (1024) requests all waiting at t = 0, at most `--max-prompt-tokens` (524288)
  prompt tokens per shape, so 2048x128 runs 256 requests. Reported: output tok/s, wall time, and the share
  of the run that the floor below accounts for (floor / wall).
- open loop: `--open-requests` (512) requests of `--open-shape` (128x128) arriving as a Poisson process at
  `--rate` req/s (default: 70% of the closed loop's request rate for that shape, measured in this run).
  Reported: TTFT (arrival to first token) and TPOT ((finish - first token) / (output - 1)), p50 and p99 over
  requests, and the achieved throughput.
- with `--long-prompt N` (try 16384): the open loop's arrivals again, served with the router's chunked prefill
  (Info.chunked_prefill: no waiting-served ratio; a new batch gets max_batch_prefill_tokens = `--chunk-tokens`
  (256) less the running batch's next-step tokens, its last request chunked to fit, and joins the running
  batch: Prefill with cached_batch), without and then with one N-token prompt arriving halfway. Reported: the
  wall time of the Decode calls (the running requests' time per output token) over the whole run without it,
  and over the calls that ran a chunk of the long prompt beside decodes, p50/p99/max, and the p99 ratio
  (issue 15's target: at most 2x).
- with `--structured N` (try 64): a batch of N requests of the open shape, all waiting at t = 0, served free and
  then with every other request constrained by a JSON schema (bench.grammar's four); reported: the median wall
  time of the first Decode calls that ran the whole batch (as many in both runs: the constrained batch stays
  whole only until its first JSON is complete), its ratio to the free batch's (issue 15's target: at most 1.10x), and how many constrained outputs completed and are valid against their schema. The engine then uses
  a BPE tokenizer of Llama's shape trained here (JSON has to be spelled), not the word-per-id one.
- with `--prefix P` (try 2000): 64 requests sharing a P-token prefix, with 128 tokens of their own, prefilled
  without and with prefix caching (the router's blocks and cache_len), as bench.prefill does (target: >= 10x).
- each again with `--adapters N` (try 64): N random rank-16 adapters on q/k/v/o of every layer, the first
  `--expert-adapters` (8) of them on every expert too, loaded into the engine's AdapterStore (stacked for
  the Triton LoRA kernels), requests spread uniformly at random over them. Base and adapter rows run on one
  engine whose KV cache was sized with the adapters' memory set aside, so their ratio compares compute, not
  cache size; run without `--adapters` for the base model's numbers with the largest cache. The adapters
  share one set of random tensors (the kernels read a copy per adapter from the stacks, so the traffic is
  that of distinct adapters; a server with distinct raw tensors holds about 5 GB more for 64 of them).
  The expert-LoRA stacks hold only the adapters that adapt the experts (adapters/stacked.py): 8 of them take
  about 3.4 GB at 8x7B shapes (26.6 GiB before, when every loaded adapter had a slot there).

Memory: the KV cache gets what is free once the weights are in (93 GB at 32 layers), less the adapters'
stacks and the peak of one prefill of max_batch_prefill_tokens (both measured first, through a throwaway
engine), less `--spare-gib` (6) for the decode graphs, the sampler and the allocator. A workload whose
requests do not all fit waits in the queue: the loop admits what the cache holds.

Timing excludes the one-time work (building the model, measuring the ceilings, and for each workload before
it is timed): every decode graph the workload can replay (each batch bucket at each context bucket it
reaches, for base requests or for adapters with and without expert LoRA) is captured, and prefills of 1, 2,
4, ... prompts of its shape up to a full max_batch_prefill_tokens compile the kernels each token count picks.

The floor is what the GPU needs at least for the steps this run actually took, summed over its steps; each
step's floor is the larger of two lower bounds (so it is one too):
- bytes / copy bandwidth: the weights a step reads, with the experts that `t` tokens touch in expectation
  under uniform top-2 routing, 8 * (1 - (6/8)^t) (all 8 from about 64 tokens), plus the KV cache a decode
  step reads (each request's tokens so far). Per layer the attention weights are 4096 x (4096 + 1024 +
  1024 + 4096) = 41.9 M parameters, one expert 3 x 4096 x 14336 = 176.2 M, lm_head 32000 x 4096 = 131 M:
  a decode step of 64+ requests reads 32 x (41.9 M + 8 x 176.2 M) + 131 M = 46.6 G parameters = 93.1 GB in
  bf16, 21.9 ms at 4.25 TB/s; the KV cache is 32 layers x 8 heads x 128 x 2 (K, V) x 2 B = 131 kB a token,
  so 512 requests at context 256 add 17.2 GB (4.0 ms).
- FLOPs / bf16 matmul rate: 2 x (41.9 M + 2 x 176.2 M) x 32 = 25.2 GFLOP per token through the layers,
  plus 2 x 131 M for each token that reaches lm_head (every decode row, the last prompt token of a prefill),
  plus attention 4 x 4096 x 32 per (query, key) pair (causal within a prompt). A decode step of 512 rows is
  13.1 TFLOP, 18.8 ms at 693 TFLOP/s, close to its byte bound; a 16384-token prefill is 413 TFLOP (0.60 s).
Both ceilings are measured in the same run (a 512 MiB device copy, counting read + write, and an 8192^3
bf16 matmul). With `--tp N` each GPU does 1/N of the bytes and FLOPs. Base-model work only: with adapters
the floor is the base model's, so the adapters' cost shows in the share.

Anchors: TensorRT-LLM serves Mixtral-8x7B at about 7,700 output tok/s per GPU in FP16 (H100, TP2, 128/128)
and 12,500 per GPU in FP8 (H200, TP2), as issue 11 cites them.

Output: a table per workload kind, then one JSON line per row (`{"bench": "serve", ...}`) for docs/PERF.md.

    python -m bench.serve                                 # base: three closed loops and the open loop (~4 min, H200)
    python -m bench.serve --adapters 64 --shapes 128x128  # base and 64 adapters on one cache (~3 min)
    python -m bench.serve --fp8 --shapes 128x128          # --quantize fp8: attention and experts in W8A8 e4m3
    python -m bench.serve --shapes 128x128 --long-prompt 16384 --structured 64 --prefix 2000   # issue 15's rows
    python -m bench.serve --layers 4 --requests 128       # a quick look
    torchrun --standalone --nproc-per-node 2 -m bench.serve --tp 2
    python -m bench.serve --smoke [--adapters 4 --expert-adapters 1]   # the tiny embedded model on the CPU
"""

import argparse
import dataclasses
import gc
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from bench.common import print_table
from lorax_server.adapters.weights import AdapterWeights, ExpertLoraWeights, LoraWeights
from lorax_server.engine.graphs import BATCH_BUCKETS
from lorax_server.models.custom_modeling.flash_mixtral_modeling import (
    ATTN_K_PROJ,
    ATTN_O_PROJ,
    ATTN_Q_PROJ,
    ATTN_V_PROJ,
)
from lorax_server.models.flash_causal_lm import FlashCausalLM
from lorax_server.utils.tokens import SamplingParams

GREEDY = SamplingParams()
BLOCK_SIZE = 16
LORA_RANK = 16
FIRST_TOKEN = 3  # random prompts use ids from here up (0-2 are special in both tokenizers)
SMOKE_KV_BLOCKS = 24  # the smoke's cache holds fewer long requests than --max-batch: the token budget binds
SMOKE = dict(shapes=["16x8", "40x8"], requests=10, max_batch=8, max_prefill_tokens=128, open_shape="16x8",
             open_requests=6)
DEFAULTS = dict(shapes=["128x128", "512x128", "2048x128"], requests=1024, max_batch=0,
                max_prefill_tokens=16384, open_shape="128x128", open_requests=512)


# -- workloads -----------------------------------------------------------------------------------------

@dataclass
class Arrival:
    """One request of a workload: when it arrives (seconds after the start), its prompt and output length."""

    request_id: int
    at_s: float
    prompt: List[int]
    max_new_tokens: int
    adapter_index: int = 0
    schema: Optional[str] = None  # a JSON schema constraining the output (structured output)


def parse_shape(text: str) -> Tuple[int, int]:
    prompt, output = text.lower().split("x")
    return int(prompt), int(output)


def workload(shape: Tuple[int, int], count: int, rate: Optional[float], vocab: int, adapters: int,
             first_id: int, seed: int) -> List[Arrival]:
    """`count` requests of `shape`: all at t = 0 (rate None), else Poisson arrivals at `rate` per second.
    Each request goes to the base model, or to one of adapters 1..`adapters` uniformly at random."""
    prompt, output = shape
    times, choices = random.Random(seed), random.Random(seed + 1)  # the same arrivals with or without adapters
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(FIRST_TOKEN, vocab, (count, prompt), generator=generator).tolist()
    at, arrivals = 0.0, []
    for i in range(count):
        if rate is not None:
            at += times.expovariate(rate)
        adapter = choices.randint(1, adapters) if adapters else 0
        arrivals.append(Arrival(first_id + i, at, tokens[i], output, adapter))
    return arrivals


# -- the router's loop ---------------------------------------------------------------------------------

@dataclass
class Served:
    """What happened to one request (times in seconds after the start of the run)."""

    arrival: Arrival
    first_token_s: Optional[float] = None
    finish_s: Optional[float] = None
    tokens: int = 0  # results received
    generated: int = 0  # the engine's count of generated ids, once finished
    finish_reason: Optional[str] = None
    text: str = ""  # the generated text, once finished

    @property
    def exact(self) -> bool:
        """Whether it ended by length with exactly its output length."""
        n = self.arrival.max_new_tokens
        return self.finish_reason == "length" and self.tokens == n and self.generated == n


@dataclass
class Step:
    """One engine call: "prefill" with each new request's prompt length, or "decode" with the tokens each
    request of the batch attends (its prompt and its tokens so far)."""

    kind: str
    lengths: List[int]
    seconds: float
    prefilling: Tuple[int, ...] = ()  # a decode call's requests that ran a chunk of their prompt in it


@dataclass
class Trace:
    served: Dict[int, Served] = field(default_factory=dict)
    steps: List[Step] = field(default_factory=list)
    wall_s: float = 0.0


class Clock:
    """Seconds since the run started. Under torchrun, rank 0's count of arrived requests is broadcast, so that
    every rank takes the same steps (the engine's collectives need every rank in the same call)."""

    def __init__(self, group=None, device="cpu"):
        self.group = group if group is not None and group.size() > 1 else None
        self.device = device
        self.start = time.perf_counter()

    def restart(self) -> None:
        self.start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.start

    def arrived(self, pending: Sequence[Arrival]) -> int:
        """How many of `pending` (in arrival order) have arrived by now."""
        now, count = self.now(), 0
        while count < len(pending) and pending[count].at_s <= now:
            count += 1
        if self.group is None:
            return count
        agreed = torch.tensor([count], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(agreed, src=0, group=self.group)
        return int(agreed.item())


class RouterLoop:
    """LoRAX's batching loop over one engine in this process (the policy is in the module docstring)."""

    def __init__(self, engine, max_batch_total_tokens: int, max_batch_prefill_tokens: int, max_batch: int,
                 waiting_served_ratio: float = 1.2, max_waiting_tokens: int = 20, clock: Optional[Clock] = None,
                 chunked: bool = False):
        self.engine = engine
        # Info.chunked_prefill: prompts longer than the prefill budget are prefilled in chunks beside the running
        # batch (`run_chunked`), as the router does then (infer.rs:1101-1110, scheduler.rs:421-456)
        self.chunked = chunked
        self.total_tokens = max_batch_total_tokens
        self.prefill_tokens = max_batch_prefill_tokens
        self.max_batch = max_batch
        self.ratio = waiting_served_ratio
        self.max_waiting_tokens = max_waiting_tokens
        self.clock = clock or Clock()
        self.batch_ids = itertools.count()

    def cache_tokens(self, a: Arrival) -> int:
        """Cache tokens the engine reserves for a request at admission: whole blocks of prompt + output - 1."""
        cache = self.engine.cache
        return cache.blocks_for(len(a.prompt) + a.max_new_tokens - 1) * cache.block_size

    def check(self, arrivals: Sequence[Arrival]) -> None:
        for a in arrivals:
            if (len(a.prompt) > self.prefill_tokens and not self.chunked) or self.cache_tokens(a) > self.total_tokens:
                raise ValueError(f"a request of {len(a.prompt)} + {a.max_new_tokens} tokens never fits a batch of "
                                 f"{self.prefill_tokens} prefill tokens and {self.total_tokens} cache tokens")

    def run(self, arrivals: Sequence[Arrival]) -> Trace:
        """Serves every request to its end; returns what each request saw and every step taken."""
        self.check(arrivals)
        self.trace = Trace({a.request_id: Served(a) for a in arrivals})
        self.live: List[int] = []  # request ids of the running batch
        pending, waiting = deque(sorted(arrivals, key=lambda a: a.at_s)), deque()
        running, waited = None, 0  # the running engine batch; decode steps since the last prefill
        self.clock.restart()
        if self.chunked:
            return self.run_chunked(pending, waiting)
        while pending or waiting or running is not None:
            waiting.extend(pending.popleft() for _ in range(self.clock.arrived(pending)))
            if running is None:
                if not waiting:
                    time.sleep(max(0.0, min(pending[0].at_s - self.clock.now(), 0.01)))
                    continue
                running, waited = self.prefill(self.next_batch(waiting, None)), 1
                continue
            min_size = None if waited >= self.max_waiting_tokens else math.floor(len(self.live) * self.ratio)
            batches = [running]
            new = self.next_batch(waiting, min_size)
            if new:
                waited = 1
                batches.append(self.prefill(new))
            running = self.decode([b for b in batches if b is not None])
            waited += 1
        self.trace.wall_s = max(s.finish_s for s in self.trace.served.values())
        return self.trace

    def run_chunked(self, pending: deque, waiting: deque) -> Trace:
        """The router's loop with chunked prefill: no waiting-served ratio; a new batch gets the prefill budget
        less the tokens the running batch's next step runs (CachedBatch.current_tokens), its last request
        chunked to fit; it is prefilled together with the running batch (Prefill with cached_batch), and the
        merged batch is decoded in the same iteration (infer.rs:1087-1241)."""
        self.engine.max_prefill_tokens = self.prefill_tokens  # as Warmup sets it (set_max_prefill_tokens)
        running = None
        try:
            while pending or waiting or running is not None:
                waiting.extend(pending.popleft() for _ in range(self.clock.arrived(pending)))
                if running is None and not waiting:
                    time.sleep(max(0.0, min(pending[0].at_s - self.clock.now(), 0.01)))
                    continue
                current = self.engine.batches[running.id].next_step_tokens if running is not None else 0
                new = self.next_batch(waiting, None, max(0, self.prefill_tokens - current))
                if new:
                    running = self.prefill(new, running)
                if running is not None:
                    running = self.decode([running])
        finally:
            self.engine.max_prefill_tokens = None
        self.trace.wall_s = max(s.finish_s for s in self.trace.served.values())
        return self.trace

    def next_batch(self, waiting: deque, min_size: Optional[int], budget: Optional[int] = None) -> List[Arrival]:
        """The longest prefix of the queue within the budgets (`budget` prompt tokens, by default the prefill
        budget), or nothing if it is shorter than `min_size`. With chunked prefill the first request past the
        budget is taken too, with `chunk_len` the budget left (when any is)."""
        budget = self.prefill_tokens if budget is None else budget
        held = sum(self.cache_tokens(self.trace.served[i].arrival) for i in self.live)
        room = None if not self.max_batch else self.max_batch - len(self.live)  # 0: no cap, as the router's default
        taken, prompt_tokens, cache_tokens = [], 0, held
        self.chunk_len = None
        for a in itertools.islice(waiting, room):
            cache_tokens += self.cache_tokens(a)
            if cache_tokens > self.total_tokens:
                break
            if prompt_tokens + len(a.prompt) > budget:
                if self.chunked and budget > prompt_tokens:
                    self.chunk_len = budget - prompt_tokens
                    taken.append(a)
                break
            prompt_tokens += len(a.prompt)
            taken.append(a)
        if not taken or (min_size is not None and len(taken) < min_size):
            return []
        for _ in taken:
            waiting.popleft()
        return taken

    def prefill(self, arrivals: List[Arrival], cached=None):
        """A new batch of these arrivals (the last one with `next_batch`'s chunk_len, if it set one), alone or
        joining the running batch `cached` (chunked prefill: Prefill with cached_batch)."""
        chunks = [None] * (len(arrivals) - 1) + [getattr(self, "chunk_len", None)]
        # A copy of each prompt: the engine's sequence is the list it is given, and it grows with each token.
        requests = [self.engine.new_request(a.request_id, list(a.prompt), GREEDY, a.max_new_tokens, ignore_eos=True,
                                            adapter_index=a.adapter_index, schema=a.schema, chunk_len=chunk)
                    for a, chunk in zip(arrivals, chunks)]
        start = time.perf_counter()
        results, batch = self.engine.prefill(next(self.batch_ids), requests,
                                             cached_batch_id=None if cached is None else cached.id)
        lengths = [chunk or len(a.prompt) for a, chunk in zip(arrivals, chunks)]
        self.trace.steps.append(Step("prefill", lengths, time.perf_counter() - start))
        self.live += [a.request_id for a in arrivals]
        self.record(results)
        return batch

    def decode(self, batches: list):
        lengths = [len(s.arrival.prompt) + s.tokens for s in map(self.trace.served.get, self.live)]
        prefilling = tuple(r.id for b in batches for r in self.engine.batches[b.id].requests if r.prefilling)
        start = time.perf_counter()
        results, batch = self.engine.decode([b.id for b in batches])
        self.trace.steps.append(Step("decode", lengths, time.perf_counter() - start, prefilling))
        self.record(results)
        return batch

    def record(self, results) -> None:
        now = self.clock.now()
        for result in results:
            if result.finish_reason == "error":
                raise RuntimeError(f"request {result.request_id} failed: {result.error}")
            served = self.trace.served[result.request_id]
            served.tokens += 1
            if served.first_token_s is None:
                served.first_token_s = now
            if result.finish_reason:
                served.finish_s, served.finish_reason = now, result.finish_reason
                served.generated, served.text = len(result.generated_ids), result.text
        finished = {r.request_id for r in results if r.finish_reason}
        self.live = [i for i in self.live if i not in finished]


# -- the floor ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ceilings:
    bandwidth: float  # bytes/s of a device copy (read + write)
    matmul: float  # FLOP/s of a large matmul in the serving dtype


class Floor:
    """The least time a step can take on one device (see the module docstring for the arithmetic)."""

    def __init__(self, config, world: int, dtype_bytes: int, ceilings: Ceilings, weight_bytes: Optional[int] = None):
        h, d = config.hidden_size, config.head_dim
        q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
        self.layers, self.experts = config.num_hidden_layers, config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.attention_params = h * (2 * q + 2 * kv)
        self.expert_params = 3 * h * config.intermediate_size
        self.head_params = config.vocab_size * h
        self.query_width = q
        self.kv_bytes = 2 * kv * self.layers * dtype_bytes  # per cached token
        self.dtype_bytes, self.world, self.ceilings = dtype_bytes, world, ceilings
        # Bytes per weight of the attention projections and experts: 1 with --fp8 (lm_head stays in dtype_bytes).
        self.layer_weight_bytes = dtype_bytes if weight_bytes is None else weight_bytes

    def weight_bytes(self, tokens: int) -> float:
        touched = self.experts * (1 - (1 - self.top_k / self.experts) ** tokens)
        layers = self.layers * (self.attention_params + touched * self.expert_params)
        return layers * self.layer_weight_bytes + self.head_params * self.dtype_bytes

    def flops(self, tokens: int, pairs: int, head_rows: int) -> float:
        layers = 2 * tokens * self.layers * (self.attention_params + self.top_k * self.expert_params)
        return layers + 4 * self.query_width * self.layers * pairs + 2 * head_rows * self.head_params

    def seconds(self, step: Step) -> Tuple[float, float]:
        """(byte bound, FLOP bound) of one step, in seconds, per device."""
        tokens = sum(step.lengths) if step.kind == "prefill" else len(step.lengths)
        if step.kind == "prefill":
            pairs = sum(n * (n + 1) // 2 for n in step.lengths)
            nbytes = self.weight_bytes(tokens) + self.kv_bytes * tokens
        else:
            pairs = sum(step.lengths)
            nbytes = self.weight_bytes(tokens) + self.kv_bytes * pairs
        flops = self.flops(tokens, pairs, len(step.lengths))
        return nbytes / self.world / self.ceilings.bandwidth, flops / self.world / self.ceilings.matmul

    def total(self, steps: Sequence[Step]) -> float:
        return sum(max(self.seconds(step)) for step in steps)


def cpu_ceilings() -> Ceilings:
    """The smoke's stand-ins for the device ceilings: a 16 MiB copy and a 512^3 fp32 matmul on the CPU."""
    def best_s(fn, repeat=5):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    src = torch.randn(1 << 22)
    dst = torch.empty_like(src)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    return Ceilings(2 * src.numel() * 4 / best_s(lambda: dst.copy_(src)), 2 * 512**3 / best_s(lambda: a @ b))


def device_ceilings(fp8: bool = False) -> Ceilings:
    """The copy bandwidth and the matmul rate of the serving precision (torch._scaled_mm's with --fp8)."""
    from bench.common import copy_bandwidth, fp8_matmul_rate, matmul_rate

    return Ceilings(copy_bandwidth(), fp8_matmul_rate() if fp8 else matmul_rate())


# -- adapters ------------------------------------------------------------------------------------------

def random_adapters(model, count: int, with_experts: int, device, dtype) -> Dict[int, AdapterWeights]:
    """Adapters 1..`count`, rank 16, on q/k/v/o of every layer; the first `with_experts` also on every expert
    (w13 and w2). Shapes are this rank's shards. All share one set of random tensors."""
    config, world = model.config, model.lm_head.process_group.size()
    h, d, e = config.hidden_size, config.head_dim, config.num_local_experts
    q, kv = config.num_attention_heads * d // world, config.num_key_value_heads * d // world
    f = config.intermediate_size // world
    r = LORA_RANK

    def randn(*shape, fan_in):
        return (torch.randn(*shape, device=device) / fan_in**0.5).to(dtype)

    shapes = {ATTN_Q_PROJ: (h, q), ATTN_K_PROJ: (h, kv), ATTN_V_PROJ: (h, kv), ATTN_O_PROJ: (q, h)}
    linear, experts = {}, {}
    for layer in range(config.num_hidden_layers):
        for name, (n_in, n_out) in shapes.items():
            linear[(layer, name)] = LoraWeights(randn(n_in, r, fan_in=n_in), randn(r, n_out, fan_in=r))
        if with_experts:
            experts[(layer, "w13")] = ExpertLoraWeights(randn(e, r, h, fan_in=h), randn(e, 2 * f, r, fan_in=r))
            experts[(layer, "w2")] = ExpertLoraWeights(randn(e, r, f, fan_in=f), randn(e, h, r, fan_in=r))
    return {i: AdapterWeights(f"random-{i}", dict(linear), dict(experts) if i <= with_experts else {})
            for i in range(1, count + 1)}


# -- building the engine -------------------------------------------------------------------------------

def smoke_engine(args, world: int):
    """The embedded tiny Mixtral (fp32, CPU) with a cache of SMOKE_KV_BLOCKS blocks."""
    from lorax_server.models import get_model

    model_dir = Path(__file__).resolve().parent.parent / "lorax_server" / "assets" / "tiny_mixtral"
    config = json.loads((model_dir / "config.json").read_text())
    kv_heads = config["num_key_value_heads"] // world
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    block_bytes = 2 * config["num_hidden_layers"] * kv_heads * head_dim * BLOCK_SIZE * 4
    return get_model(str(model_dir), sharded=world > 1, dtype="float32", kv_cache_bytes=SMOKE_KV_BLOCKS * block_bytes,
                     quantize="fp8" if args.fp8 else None)


def gpu_engine(args, group, adapters_wanted: bool):
    """Random full-size Mixtral-8x7B layers; the KV cache takes what is free after the weights, the adapters'
    stacks, a prefill of max_batch_prefill_tokens (both measured) and `--spare-gib`.
    Returns (engine, adapters, a line on where the memory went)."""
    from bench.engine_step import synthetic_tokenizer
    from bench.layer_stack import MIXTRAL_8X7B, RandomWeights
    from lorax_server.models.custom_modeling.flash_mixtral_modeling import FlashMixtralForCausalLM, MixtralConfig

    longest = max([sum(parse_shape(s)) for s in args.shapes + [args.open_shape]]
                  + [args.long_prompt + parse_shape(args.open_shape)[1], args.prefix + 256])
    config = MixtralConfig(**MIXTRAL_8X7B, num_hidden_layers=args.layers,
                           max_position_embeddings=max(4096, 1 << (longest - 1).bit_length()))
    device = gpu()
    if args.structured:  # JSON needs a vocabulary that spells text: a BPE of Llama's shape, trained here
        from bench.grammar import llama_shaped_tokenizer
        tokenizer = llama_shaped_tokenizer(config.vocab_size)
    else:
        tokenizer = synthetic_tokenizer(config.vocab_size)
    torch.manual_seed(0)  # every rank draws the same replicated weights
    with torch.no_grad():
        model = FlashMixtralForCausalLM("", config, RandomWeights(group, fp8=args.fp8)).eval()
        weights = torch.cuda.memory_allocated(device)
        adapters = {}
        if adapters_wanted:
            adapters = random_adapters(model, args.adapters, args.expert_adapters, device, torch.bfloat16)
        prompt = max(parse_shape(s)[0] for s in args.shapes + [args.open_shape])
        stacks, prefill = probe_memory(model, tokenizer, adapters, prompt, args.max_prefill_tokens, device)
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = free - stacks - prefill - int(args.spare_gib * 2**30)
    block_bytes = 2 * config.num_hidden_layers * model.num_kv_heads * model.head_dim * BLOCK_SIZE * 2
    blocks = agreed_min(max(2, budget // block_bytes), group, device)
    engine = FlashCausalLM(model, tokenizer, torch.bfloat16, device, blocks, BLOCK_SIZE)
    notes = (f"weights {weights / 2**30:.1f} GiB, adapter stacks {stacks / 2**30:.1f} GiB, a prefill of "
             f"{args.max_prefill_tokens} tokens {prefill / 2**30:.1f} GiB, KV cache {blocks * BLOCK_SIZE} tokens "
             f"({blocks * block_bytes / 2**30:.1f} GiB) of {total / 2**30:.0f} GiB")
    return engine, adapters, notes


def gpu() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def agreed_min(value: int, group, device) -> int:
    """The smallest `value` over the ranks: every rank must admit exactly the same requests."""
    if group.size() == 1:
        return value
    tensor = torch.tensor([value], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN, group=group)
    return int(tensor.item())


def probe_memory(model, tokenizer, adapters, prompt: int, tokens: int, device) -> Tuple[int, int]:
    """(bytes the adapters take once loaded (their kernel stacks), the peak bytes a prefill of `tokens` tokens in
    prompts of `prompt` allocates, with the adapters when there are any), measured through a throwaway engine
    whose cache holds just that prefill."""
    count = max(1, tokens // prompt)
    engine = FlashCausalLM(model, tokenizer, torch.bfloat16, device, count * (prompt // BLOCK_SIZE + 1) + 1, BLOCK_SIZE)
    engine.graphs = None
    before = torch.cuda.memory_allocated(device)
    engine.adapters.publish(adapters)
    stacks = torch.cuda.memory_allocated(device) - before
    prompts = torch.randint(FIRST_TOKEN, model.config.vocab_size, (count, prompt)).tolist()
    requests = [engine.new_request(i, ids, GREEDY, 1, ignore_eos=True,
                                   adapter_index=1 + i % len(adapters) if adapters else 0)
                for i, ids in enumerate(prompts)]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    engine.prefill(0, requests)
    torch.cuda.synchronize(device)
    return stacks, torch.cuda.max_memory_allocated(device) - base


# -- warm-up -------------------------------------------------------------------------------------------

class WarmUp:
    """The one-time work of a workload, done before it is timed, for each adapter kind it serves: a decode
    graph for every (batch bucket, context bucket) it can replay, and prefills of 1, 2, 4, ... prompts up
    to a full max_batch_prefill_tokens (the MoE kernels' tiles, and so their compiles, depend on the count)."""

    def __init__(self, engine, loop: RouterLoop, max_batch: int):
        self.engine, self.loop, self.max_batch = engine, loop, max_batch
        engine.warm_up_kernels()  # as the server's Warmup: prefill kernels of short prompts and cached prefixes
        self.done = set()
        self.ids = itertools.count(1 << 40)

    def __call__(self, shape: Tuple[int, int], adapter_kinds: Sequence[int]) -> None:
        prompt, output = shape
        for adapter in adapter_kinds:
            self.capture(prompt, output, adapter)
            most = max(1, self.loop.prefill_tokens // prompt)
            for count in sorted({min(most, 1 << i) for i in range(most.bit_length() + 1)}):
                self.once(("prefill", prompt, count, adapter), lambda: self.prefill([prompt] * count, 1, adapter))

    def once(self, key, work) -> None:
        if key not in self.done:
            work()
            self.done.add(key)

    def capture(self, prompt: int, output: int, adapter: int) -> None:
        graphs = self.engine.graphs
        if graphs is None:
            return
        contexts = {}  # context bucket -> the fewest attended tokens that reach it
        for attended in range(prompt + 1, prompt + output):
            key = graphs.bucket(1, attended)
            if key is not None:
                contexts.setdefault(key[1], attended)
        most = self.max_batch or BATCH_BUCKETS[-1]  # no cap: every bucket (larger batches: the step graphs' pieces)
        buckets = sorted({key[0] for b in range(1, most + 1) if (key := graphs.bucket(b, prompt + 1))})
        for rows, (context, attended) in itertools.product(buckets, contexts.items()):
            self.once(("graph", rows, context, adapter), lambda: self.decode_once(rows, attended, adapter))

    def decode_once(self, rows: int, attended: int, adapter: int) -> None:
        """One decode step of `rows` requests, the longest attending `attended` tokens (the step's graph is
        captured on the way)."""
        batches = self.prefill([attended - 1] + [1] * (rows - 1), 2, adapter)
        self.engine.decode([b.id for b in batches])
        self.engine.clear()

    def prefill(self, prompts: List[int], max_new_tokens: int, adapter: int) -> list:
        """Prefills random prompts of these lengths, in batches within max_batch_prefill_tokens; returns the
        batches left running."""
        vocab, batches, chunk, size = self.engine.config.vocab_size, [], [], 0
        for i, length in enumerate(prompts):
            ids = torch.randint(FIRST_TOKEN, vocab, (length,)).tolist()
            chunk.append(self.engine.new_request(next(self.ids), ids, GREEDY, max_new_tokens, ignore_eos=True,
                                                 adapter_index=adapter))
            size += length
            if i + 1 == len(prompts) or size + prompts[i + 1] > self.loop.prefill_tokens:
                batches.append(self.engine.prefill(next(self.ids), chunk)[1])
                chunk, size = [], 0
        return [b for b in batches if b is not None]


# -- reports -------------------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarise(trace: Trace, floor: Floor, world: int) -> dict:
    served = list(trace.served.values())
    tokens = sum(s.tokens for s in served)
    first_arrival = min(s.arrival.at_s for s in served)
    span = trace.wall_s - first_arrival
    ttft = [(s.first_token_s - s.arrival.at_s) * 1e3 for s in served]
    tpot = [(s.finish_s - s.first_token_s) / (s.tokens - 1) * 1e3 for s in served if s.tokens > 1]
    decode_rows = [len(st.lengths) for st in trace.steps if st.kind == "decode"]
    floor_s = floor.total(trace.steps)
    return dict(
        requests=len(served),
        exact_lengths=sum(s.exact for s in served),
        output_tokens=tokens, wall_s=float(f"{span:.4g}"), tok_s=round(tokens / span, 1),
        tok_s_per_gpu=round(tokens / span / world, 1), req_s=round(len(served) / span, 3),
        floor_s=float(f"{floor_s:.4g}"), floor_share=float(f"{floor_s / span:.4g}"),
        ttft_p50_ms=round(percentile(ttft, 50), 2), ttft_p99_ms=round(percentile(ttft, 99), 2),
        tpot_p50_ms=round(percentile(tpot, 50), 2) if tpot else 0.0,
        tpot_p99_ms=round(percentile(tpot, 99), 2) if tpot else 0.0,
        mean_decode_batch=round(statistics.fmean(decode_rows), 1) if decode_rows else 0.0,
        prefill_share=round(sum(st.seconds for st in trace.steps if st.kind == "prefill") / span, 4),
        steps=len(trace.steps),
    )


def closed_rows(records: List[dict]) -> List[List[str]]:
    rows = []
    for r in records:
        ratio = f"{r['vs_base']:.2f}x" if r.get("vs_base") else "-"
        rows.append([r["shape"], r["model"], str(r["requests"]), f"{r['mean_decode_batch']:.0f}", f"{r['wall_s']:.3g}",
                     f"{r['tok_s']:.0f}", f"{r['tok_s_per_gpu']:.0f}", f"{r['floor_s']:.3g}",
                     f"{100 * r['floor_share']:.0f}%", f"{100 * r['prefill_share']:.0f}%", ratio])
    return rows


def open_rows(records: List[dict]) -> List[List[str]]:
    return [[r["shape"], r["model"], f"{r['rate']:.2f}", f"{r['req_s']:.2f}", f"{r['tok_s']:.0f}",
             f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f}", f"{r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f}",
             f"{r['mean_decode_batch']:.0f}", f"{100 * r['floor_share']:.0f}%"] for r in records]


def print_report(records: List[dict], title: str) -> None:
    closed = [r for r in records if r["mode"] == "closed"]
    opened = [r for r in records if r["mode"] == "open"]
    if closed:
        print_table(f"Closed loop (all requests waiting at t=0): {title}",
                    ["shape", "model", "requests", "mean decode batch", "wall s", "output tok/s", "per GPU",
                     "floor s", "floor / wall", "prefill share", "vs base"], closed_rows(closed))
    if opened:
        print_table(f"Open loop (Poisson arrivals): {title}",
                    ["shape", "model", "offered req/s", "achieved req/s", "output tok/s", "TTFT p50 / p99 ms",
                     "TPOT p50 / p99 ms", "mean decode batch", "floor / wall"], open_rows(opened))
    print("\nAnchors: TensorRT-LLM Mixtral-8x7B about 7,700 output tok/s per GPU FP16 (H100, TP2, 128/128), "
          "12,500 per GPU FP8 (H200, TP2).")
    for r in records:
        print(json.dumps({"bench": "serve", **r}))


# -- main ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the embedded tiny model on the CPU, few requests")
    parser.add_argument("--layers", type=int, default=32, help="Mixtral-8x7B layers (not with --smoke)")
    parser.add_argument("--shapes", nargs="*",
                        help="closed-loop shapes INPUTxOUTPUT (default 128x128 512x128 2048x128)")
    parser.add_argument("--requests", type=int, help="closed-loop requests per shape (default 1024)")
    parser.add_argument("--max-prompt-tokens", type=int, default=524288,
                        help="at most this many prompt tokens per closed loop (fewer requests for long prompts)")
    parser.add_argument("--open-shape", help="open-loop shape (default 128x128)")
    parser.add_argument("--open-requests", type=int, help="open-loop requests (default 512; 0: no open loop)")
    parser.add_argument("--rate", type=float, help="open-loop arrivals per second (default: 70%% of the closed loop's)")
    parser.add_argument("--adapters", type=int, default=0, help="also serve N random rank-16 adapters (try 64)")
    parser.add_argument("--expert-adapters", type=int, default=8, help="how many of them also adapt every expert")
    parser.add_argument("--max-batch", type=int,
                        help="most requests in the running batch (default 0: no cap, as the router's default)")
    parser.add_argument("--max-prefill-tokens", type=int, help="max_batch_prefill_tokens (default 16384)")
    parser.add_argument("--long-prompt", type=int, default=0,
                        help="also serve the open loop with chunked prefill, without and with one prompt of this "
                             "many tokens arriving halfway (try 16384), and compare the running requests' TPOT")
    parser.add_argument("--chunk-tokens", type=int, default=256,
                        help="with --long-prompt: max_batch_prefill_tokens, which sizes the chunks")
    parser.add_argument("--structured", type=int, default=0,
                        help="also serve a batch of this many requests (try 64), free and then half constrained "
                             "by JSON schemas, and compare their decode steps (uses a trained BPE tokenizer)")
    parser.add_argument("--prefix", type=int, default=0,
                        help="also prefill 64 requests sharing a prefix of this many tokens (try 2000) without "
                             "and with prefix caching")
    parser.add_argument("--waiting-served-ratio", type=float, default=1.2)
    parser.add_argument("--max-waiting-tokens", type=int, default=20)
    parser.add_argument("--spare-gib", type=float, default=6.0,
                        help="device memory kept free beyond the measured prefill (graphs, sampler, fragmentation)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (run under torchrun)")
    parser.add_argument("--fp8", action="store_true",
                        help="attention projections and experts in FP8 (--quantize fp8: weights quantized at load)")
    args = parser.parse_args(argv)
    for name, value in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.expert_adapters = min(args.expert_adapters, args.adapters)
    if args.open_requests and args.rate is None and args.open_shape not in args.shapes:
        parser.error(f"--rate is needed when the closed loop does not run the open loop's shape {args.open_shape}")
    if args.tp != int(os.getenv("WORLD_SIZE", "1")):
        parser.error(f"--tp {args.tp}: run under torchrun with --nproc-per-node {args.tp}")
    return args


def setup(args):
    """(engine, adapters, ceilings, group, notes) for this process."""
    from lorax_server.utils.dist import initialize_torch_distributed

    if args.smoke:
        torch.set_num_threads(1)  # a tiny model: more threads only contend (20x slower on a busy 2-core VM)
        engine = smoke_engine(args, args.tp)
        group = engine.model.lm_head.process_group
        adapters = random_adapters(engine.model, args.adapters, args.expert_adapters, engine.device, engine.dtype)
        notes = f"tiny embedded Mixtral, fp32, CPU, {engine.cache.num_blocks} KV blocks"
        return engine, adapters, cpu_ceilings(), group, notes
    group = initialize_torch_distributed()[0]
    ceilings = device_ceilings(args.fp8)
    engine, adapters, notes = gpu_engine(args, group, args.adapters > 0)
    return engine, adapters, ceilings, group, notes


def run_workloads(args, loop: RouterLoop, warm: WarmUp, floor: Floor, model: str, kinds: List[int],
                  base: Dict[tuple, dict]) -> List[dict]:
    """Every closed loop, then the open loop, for one model variant: "base" (kinds [0]) or the adapters
    (`kinds`: an adapter of each kind, for the warm-up). `base` holds the base variant's records by
    (mode, shape) once they exist: the adapters' rows are compared with them and take their offered rate."""
    records, vocab, adapters = [], loop.engine.config.vocab_size, (args.adapters if kinds != [0] else 0)
    for i, text in enumerate(args.shapes):
        shape = parse_shape(text)
        count = max(1, min(args.requests, args.max_prompt_tokens // shape[0]))
        warm(shape, kinds)
        record = run_one(loop, floor, args.tp, workload(shape, count, None, vocab, adapters, 0, 100 + i))
        records.append(dict(mode="closed", shape=text, model=model, adapters=adapters, **record))
    if args.open_requests:
        rate = open_rate(args, base or {("closed", r["shape"]): r for r in records})
        shape = parse_shape(args.open_shape)
        warm(shape, kinds)
        record = run_one(loop, floor, args.tp, workload(shape, args.open_requests, rate, vocab, adapters, 0, 99))
        records.append(dict(mode="open", shape=args.open_shape, model=model, adapters=adapters, rate=round(rate, 3),
                            **record))
    for r in records:  # throughput against the base model's; the open loops compare latencies instead
        reference = base.get((r["mode"], r["shape"])) if r["mode"] == "closed" else None
        r["vs_base"] = round(r["tok_s"] / reference["tok_s"], 3) if reference else None
    return records


def long_prompt_rows(args, engine, warm: WarmUp, group, total_tokens: int, rate: float) -> List[List[str]]:
    """Chunked prefill in the open loop (issue 15's target): the open loop's arrivals served with chunked
    prefill and a prefill budget of --chunk-tokens, without and then with one --long-prompt-token request
    arriving halfway. The running requests' time per output token is the wall time of the Decode calls: over
    every call of the run without it, and over the calls that ran a chunk of the long prompt."""
    loop = RouterLoop(engine, total_tokens, args.chunk_tokens, args.max_batch, clock=Clock(group, engine.device),
                      chunked=True)
    shape, vocab = parse_shape(args.open_shape), engine.config.vocab_size
    warm(shape, [0])
    if engine.graphs is not None:  # the decode graphs the batch replays once the long prompt decodes beside it
        engine.graphs.prepare(args.long_prompt + shape[1])
    arrivals = workload(shape, args.open_requests, rate, vocab, 0, 0, 99)
    generator = torch.Generator().manual_seed(7)
    long = Arrival(len(arrivals), arrivals[len(arrivals) // 2].at_s,
                   torch.randint(FIRST_TOKEN, vocab, (args.long_prompt,), generator=generator).tolist(), shape[1])
    rows, alone_p99 = [], None
    for name, run in (("without it", arrivals), (f"with {args.long_prompt} tokens in chunks", arrivals + [long])):
        trace = loop.run(run)
        # with it: the calls that ran its chunk beside running decodes (alone, no request waits on them)
        calls = [st.seconds * 1e3 for st in trace.steps if st.kind == "decode" and (
            run is arrivals or (long.request_id in st.prefilling and len(st.lengths) > len(st.prefilling)))]
        served = trace.served.get(long.request_id)
        ttft = f"{served.first_token_s - long.at_s:.2f}" if run is not arrivals else "-"
        if not calls:  # every request ended before the long prompt came (too low a rate)
            rows.append([name, "0", "-", "-", "-", "-", ttft])
            continue
        p99 = percentile(calls, 99)
        alone_p99 = alone_p99 or p99
        rows.append([name, str(len(calls)), f"{statistics.median(calls):.1f}", f"{p99:.1f}", f"{max(calls):.1f}",
                     f"{p99 / alone_p99:.2f}x", ttft])
    return rows


def structured_rows(args, engine, warm: WarmUp, group, total_tokens: int) -> List[List[str]]:
    """Structured output (issue 15's target): --structured requests of the open shape, all waiting at t = 0 (one
    Prefill, one running batch), served first all free, then with every other one constrained by one of
    bench.grammar's JSON schemas (a tool call, a nested record, a list of objects, enums and bounded numbers).
    The cost is the median wall time of the first Decode calls in which every request of the batch still runs
    (a constrained output ends when its JSON is complete), as many calls in both runs (the same contexts),
    constrained over free. Each constrained output that
    completed is checked against its schema (jsonschema, where installed; else that it parses as JSON)."""
    from bench.grammar import SCHEMAS

    loop = RouterLoop(engine, total_tokens, args.max_prefill_tokens, 0, clock=Clock(group, engine.device))
    shape, vocab = parse_shape(args.open_shape), engine.config.vocab_size
    warm(shape, [0])
    free = workload(shape, args.structured, None, vocab, 0, 0, 98)
    constrained = [dataclasses.replace(a, schema=json.dumps(SCHEMAS[i // 2 % len(SCHEMAS)]) if i % 2 == 0 else None)
                   for i, a in enumerate(free)]
    loop.run(constrained[:2 * len(SCHEMAS)])  # each schema compiles once (then cached); the masks' kernels load
    runs = {}
    for name, arrivals in (("free", free), (f"{len(constrained[::2])} constrained", constrained)):
        trace = loop.run(arrivals)
        # the Decode calls that ran the whole batch, in order (the same contexts in both runs, call by call)
        whole = [st.seconds * 1e3 for st in trace.steps if st.kind == "decode" and len(st.lengths) == len(arrivals)]
        if not whole:
            raise RuntimeError(f"the {len(arrivals)} requests never ran as one batch: the KV cache holds fewer")
        runs[name] = (whole, [s for s in trace.served.values() if s.arrival.schema is not None])
    calls = min(len(whole) for whole, _ in runs.values())  # the constrained batch stays whole for fewer calls
    free_ms = statistics.median(runs["free"][0][:calls])
    rows = []
    for name, (whole, outputs) in runs.items():
        median = statistics.median(whole[:calls])
        complete = [s for s in outputs if s.finish_reason != "length"]
        valid = sum(valid_json(s.text, s.arrival.schema) for s in complete)
        rows.append([name, str(calls), f"{median:.2f}", f"{median / free_ms:.3f}x",
                     f"{len(complete)} of {len(outputs)}" if outputs else "-",
                     f"{valid} of {len(complete)}" if outputs else "-"])
    return rows


def valid_json(text: str, schema: str) -> bool:
    """Whether `text` is JSON valid against `schema` (only that it parses, without jsonschema installed)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    try:
        import jsonschema
    except ImportError:
        return True
    try:
        jsonschema.validate(value, json.loads(schema))
    except jsonschema.ValidationError:
        return False
    return True


def prefix_rows(args, engine) -> List[List[str]]:
    """Prefix caching (issue 15's target), as bench.prefill measures it: 64 requests of one shared --prefix-token
    prefix and 128 tokens of their own, prefilled without the cache (in Prefills within the prefill budget), and
    then with the router's blocks and cache_len (the prefix's whole blocks shared), through this engine."""
    from bench.prefill import Blocks
    from bench.prefill import prefix_rows as measure

    own, sharing = (8, 4) if args.smoke else (128, 64)
    cfg = dict(prefix=args.prefix, own=own, sharing=sharing, prefill_budget=args.max_prefill_tokens)
    return measure(engine, Blocks(engine), cfg)


def open_rate(args, closed: Dict[tuple, dict]) -> float:
    """--rate, else the base open loop's rate, else 70% of the closed loop's request rate for the open shape."""
    if args.rate:
        return args.rate
    if ("open", args.open_shape) in closed:
        return closed[("open", args.open_shape)]["rate"]
    return 0.7 * closed[("closed", args.open_shape)]["req_s"]


def run_one(loop: RouterLoop, floor: Floor, world: int, arrivals: List[Arrival]) -> dict:
    """One timed workload's summary (with the device memory's peak during it, on a GPU)."""
    device = loop.engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trace = loop.run(arrivals)
    if not loop.engine.cache.all_free:
        raise RuntimeError("cache blocks were not all returned after the workload")
    summary = summarise(trace, floor, world)
    if device.type == "cuda":
        summary["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    return summary


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    engine, adapters, ceilings, group, notes = setup(args)
    dtype_bytes = torch.empty((), dtype=engine.dtype).element_size()
    floor = Floor(engine.config, args.tp, dtype_bytes, ceilings, weight_bytes=1 if args.fp8 else None)
    total_tokens = (engine.cache.num_blocks - 1) * engine.cache.block_size  # block 0 is the router's probe's
    loop = RouterLoop(engine, total_tokens, args.max_prefill_tokens, args.max_batch, args.waiting_served_ratio,
                      args.max_waiting_tokens, Clock(group, engine.device))
    warm = WarmUp(engine, loop, args.max_batch)
    with torch.no_grad():
        records = run_workloads(args, loop, warm, floor, "base", [0], {})
        if adapters:
            engine.adapters.publish(adapters)
            base = {(r["mode"], r["shape"]): r for r in records}
            records += run_workloads(args, loop, warm, floor, f"{args.adapters} adapters", adapter_kinds(args), base)
        long_rows = None
        if args.long_prompt and args.open_requests:
            closed = {(r["mode"], r["shape"]): r for r in records if r["model"] == "base"}
            long_rows = long_prompt_rows(args, engine, warm, group, total_tokens, open_rate(args, closed))
        grammar_rows = structured_rows(args, engine, warm, group, total_tokens) if args.structured else None
        cached_rows = prefix_rows(args, engine) if args.prefix else None
    card = "CPU" if args.smoke else f"{torch.cuda.get_device_name()} x{args.tp}"
    meta = dict(card=card, layers=engine.config.num_hidden_layers, tp=args.tp, fp8=args.fp8, expert_adapters=args.expert_adapters,
                lora_rank=LORA_RANK, kv_tokens=total_tokens, max_batch=args.max_batch,
                max_prefill_tokens=args.max_prefill_tokens, waiting_served_ratio=args.waiting_served_ratio,
                max_waiting_tokens=args.max_waiting_tokens, bandwidth_tb_s=float(f"{ceilings.bandwidth / 1e12:.4g}"),
                matmul_tflop_s=float(f"{ceilings.matmul / 1e12:.4g}"))
    records = [{**r, **meta} for r in records]
    if group.rank() == 0:
        precision = "FP8 (W8A8) attention and experts, bf16 elsewhere" if args.fp8 else "bf16"
        model = f"tiny smoke model, fp32{', --quantize fp8' if args.fp8 else ''}" if args.smoke else \
            f"{meta['layers']} Mixtral-8x7B layers, {precision}"
        print_report(records, f"{model}, {card}, copy {ceilings.bandwidth / 1e12:.3g} TB/s, matmul "
                              f"{ceilings.matmul / 1e12:.3g} TFLOP/s; {notes}; max batch {args.max_batch}, prefill "
                              f"{args.max_prefill_tokens} tokens, waiting_served_ratio {args.waiting_served_ratio}, "
                              f"max_waiting_tokens {args.max_waiting_tokens}")
        if long_rows:
            print_table(f"Chunked prefill in the open loop ({args.open_shape}): a {args.long_prompt}-token prompt "
                        f"arriving halfway, max_batch_prefill_tokens {args.chunk_tokens}; decode calls' wall ms",
                        ["run", "decode calls", "p50 ms", "p99 ms", "max ms", "p99 / without", "its TTFT s"],
                        long_rows)
        if grammar_rows:
            print_table(f"Structured output: a batch of {args.structured} ({args.open_shape}), free and then every "
                        f"other request constrained by a JSON schema; decode calls with the whole batch running",
                        ["batch", "decode calls", "median ms", "vs free", "outputs complete", "valid JSON"],
                        grammar_rows)
        if cached_rows:
            print_table(f"Prefix caching: requests sharing a {args.prefix}-token prefix, prefill wall ms",
                        ["requests", "without cache ms", "first hit ms", "next hit ms", "speedup (first)",
                         "speedup (next)"], cached_rows)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return records


def adapter_kinds(args) -> List[int]:
    """One adapter index of each kind the requests use: with expert LoRA (1..expert_adapters), without."""
    kinds = [1] if args.expert_adapters else []
    return kinds + ([args.expert_adapters + 1] if args.adapters > args.expert_adapters else [])


if __name__ == "__main__":
    short = [r for r in main() if r["exact_lengths"] != r["requests"]]
    for r in short:
        print(f"{r['mode']} {r['shape']} {r['model']}: only {r['exact_lengths']} of {r['requests']} requests made "
              f"exactly their output length", file=sys.stderr)
    sys.exit(1 if short else 0)
