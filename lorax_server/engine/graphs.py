"""CUDA graphs for decode steps: one graph per (batch bucket, context bucket, LoRA signature), captured at
warm-up for the base model and the router's longest context, and on first use for any other key.

A decode step is a fixed sequence of kernels once the batch size and the longest context are fixed,
and at small batches launching them costs more than running them. A step is padded up to its bucket
(padding rows write no cache slot, read one harmless key and use no adapter), its inputs are copied
into the graph's static buffers, and the graph is replayed. The context bucket fixes how the attention
kernel splits the sequence, so it is rounded up to a power of two.

Steps with adapters replay too when the LoRA kernels serve them (stacked adapters): which slot each
row uses is a static input, and the kernels launched depend only on the stacks and on the layers where
the batch's adapters have expert LoRA (the signature). Loading or offloading an adapter rebuilds the
stacks, and the graphs that read the old ones are dropped.
"""

import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from lorax_server.adapters.batch import AdapterBatchData

import torch

from lorax_server.utils.attention.common import Seqlen

logger = logging.getLogger(__name__)

# Batch sizes a decode graph is captured for (a step pads up to the next one), up to 1024 rows: the router's largest
# batches must not fall back to eager steps. A padded row costs what a real one does (it goes through the projections
# and the experts), and from about 64 rows a step's time grows with its rows, so the buckets are close there: every
# 32 rows from 128 to 256, every 64 to 512, every 128 to 1024. All graphs write their logits into one buffer of the
# largest bucket's rows (65 MB at Mixtral's vocabulary in bf16), not one each (`DecodeGraphs.shared_output`).
# Why 1024 and not 512: the router's closed loop of 1024 requests decodes batches of 500 rows on average and up to
# about 1000. Base steps above 512 rows have the step graphs' pieces (engine/step_graphs.py), but steps with adapters
# ran eagerly there: 64 adapters served 0.70x the base model's tokens/s in bf16 and 0.52x in FP8; with these buckets
# 0.88x and 0.81x, the base unchanged (one H200, docs/PERF.md, session 8). LORAX_CUDA_GRAPH_BATCHES="1,2,4,..."
# overrides.
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896,
                         1024)


def batch_buckets_from_env() -> Tuple[int, ...]:
    text = os.getenv("LORAX_CUDA_GRAPH_BATCHES")
    if not text:
        return DEFAULT_BATCH_BUCKETS
    try:
        buckets = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ValueError(f"LORAX_CUDA_GRAPH_BATCHES must be a comma-separated list of batch sizes, "
                         f"got {text!r}") from None
    if not buckets or buckets[0] < 1:
        raise ValueError(f"LORAX_CUDA_GRAPH_BATCHES must list positive batch sizes, got {text!r}")
    return buckets


BATCH_BUCKETS = batch_buckets_from_env()
MIN_CONTEXT_BUCKET = 256


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    inputs: Dict[str, torch.Tensor]  # static buffers the graph reads and `load` refills
    logits: torch.Tensor  # what the graph writes: its rows of the buffer all graphs share (`shared_output`)
    # Everything else the graph reads (lm_head indices, Seqlen's tensors): a replay reads these addresses,
    # so they must live as long as the graph, or the allocator hands their memory to someone else.
    kept_alive: dict


StepKey = Tuple[int, int, Optional[frozenset]]  # batch bucket, context bucket, LoRA signature (None: base)


class DecodeGraphs:
    def __init__(self, model, kv_cache, block_size: int, max_positions: int):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.max_positions = max_positions
        self.steps: Dict[StepKey, CapturedStep] = {}
        self.stacks = None  # the adapter stacks the LoRA graphs in `steps` read
        self.pool = None
        self.output = None  # the logits every graph writes (`shared_output`)
        self.broken = False  # set when a capture failed (a backend that synchronises): stay eager

    def bucket(self, batch: int, max_k: int) -> Optional[Tuple[int, int]]:
        if self.broken or batch > BATCH_BUCKETS[-1]:
            return None
        context = max(MIN_CONTEXT_BUCKET, 1 << (max_k - 1).bit_length())
        if context > self.max_positions:
            context = self.max_positions
        return next(b for b in BATCH_BUCKETS if b >= batch), context

    def prepare(self, max_context: int) -> int:
        """Captures every batch bucket of the base model for contexts up to `max_context` now (at warm-up);
        returns how many graphs there are."""
        for batch in BATCH_BUCKETS:
            key = self.bucket(batch, max_context)
            if key is not None and key + (None,) not in self.steps:
                self.capture(key + (None,), None)
        return len(self.steps)

    def run(self, batch, adapter_data: Optional[AdapterBatchData] = None, stacks=None) -> Optional[torch.Tensor]:
        """Logits of this decode step (a runner.ForwardBatch) from a graph replay, or None when it must run
        eagerly. `stacks`: the adapter store's current stacks (LoRA graphs over older ones are dropped,
        freeing what they hold)."""
        self.use_stacks(stacks)
        bucket = self.bucket(batch.size, batch.seqlen.max_k)
        if bucket is None or (adapter_data is not None and adapter_data.stacks is None):
            return None  # too large, or adapters served by the per-adapter loop (it synchronises)
        signature = None
        if adapter_data is not None:
            assert adapter_data.stacks is stacks, "the batch's adapter data predates a load or offload"
            signature = adapter_data.expert_lora_layers()
        key = bucket + (signature,)
        step = self.steps.get(key) or self.capture(key, adapter_data)
        if step is None:
            return None
        self.load(step.inputs, batch, adapter_data)
        step.graph.replay()
        # A copy: the next replay (launched before this step's tokens are read, engine.pipeline)
        # rewrites the static buffer, and the per-request fallback of the sampler reads these logits later.
        return step.logits[: batch.size].clone()

    def use_stacks(self, stacks) -> None:
        if stacks is not self.stacks:
            self.steps = {key: step for key, step in self.steps.items() if key[2] is None}
            self.stacks = stacks

    @staticmethod
    def load(static: Dict[str, torch.Tensor], batch, adapter_data: Optional[AdapterBatchData]) -> None:
        rows = batch.size
        # Requests reserve blocks for all their future tokens; the graph only needs those of its context bucket.
        tables = batch.block_tables[:, : static["block_tables"].shape[1]]
        static["input_ids"][:rows].copy_(batch.input_ids)
        static["position_ids"][:rows].copy_(batch.position_ids)
        static["slots"].fill_(-1)[:rows].copy_(batch.slots)
        static["cache_lengths"].zero_()[:rows].copy_(batch.seqlen.cache_lengths)
        static["block_tables"].zero_()[:rows, : tables.shape[1]].copy_(tables)
        if adapter_data is not None:
            static["token_slots"].fill_(-1)[:rows].copy_(adapter_data.token_slots)

    def capture(self, key: StepKey, adapter_data: Optional[AdapterBatchData]) -> Optional[CapturedStep]:
        batch, context, _ = key
        device = self.kv_cache[0][0].device
        static = {
            "input_ids": torch.zeros(batch, dtype=torch.int64, device=device),
            "position_ids": torch.zeros(batch, dtype=torch.int64, device=device),
            "slots": torch.full((batch,), -1, dtype=torch.int64, device=device),  # capture writes nothing
            "cache_lengths": torch.zeros(batch, dtype=torch.int32, device=device),
            "block_tables": torch.zeros(batch, -(-context // self.block_size), dtype=torch.int32, device=device),
        }
        ones = torch.ones(batch, dtype=torch.int32, device=device)
        seqlen = Seqlen(ones, static["cache_lengths"], torch.arange(batch + 1, dtype=torch.int32, device=device),
                        max_q=1, max_k=context)
        kwargs = dict(input_ids=static["input_ids"], position_ids=static["position_ids"], cu_seqlen_prefill=None,
                      kv_cache=self.kv_cache, block_tables=static["block_tables"], slots=static["slots"],
                      seqlen=seqlen, max_s=context, lm_head_indices=torch.arange(batch, device=device))
        if adapter_data is not None:  # same adapters and stacks; every row's slot becomes a static input
            static["token_slots"] = torch.full((batch,), -1, dtype=torch.int32, device=device)
            kwargs["adapter_data"] = AdapterBatchData(torch.zeros(batch, dtype=torch.int64, device=device),
                                                      adapter_data.adapters, adapter_data.stacks,
                                                      static["token_slots"])
        try:
            step = self.record(kwargs, static)
        except Exception as error:  # a backend that synchronises with the host cannot be captured
            logger.warning("decode CUDA graphs disabled: capture failed (%s)", error)
            self.broken = True
            torch.cuda.synchronize()
            return None
        self.steps[key] = step
        return step

    def record(self, kwargs: dict, static: Dict[str, torch.Tensor]) -> CapturedStep:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture (Triton compiles, allocator settles)
            warm, _ = self.model(**kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        output = self.shared_output(warm)[: warm.shape[0]]
        del warm
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits, _ = self.model(**kwargs)
            output.copy_(logits)
        del logits  # back to the pool, for the next captures: the graph's result is `output`
        self.pool = graph.pool()
        # One replay now, as the warm-up above ran (the same slots): a graph's first launch also uploads it to the
        # device, which would otherwise land on the first step of a new batch size (~15 ms on an H200).
        graph.replay()
        return CapturedStep(graph, static, output, kwargs)

    def shared_output(self, logits: torch.Tensor) -> torch.Tensor:
        """The one buffer every graph copies its logits into, [largest bucket, vocab]. A replay's logits are
        cloned out at once (`run`), before any other graph runs. A buffer per graph would hold rows x vocab for
        every (batch, context, signature) captured: 400 MB for the buckets of one context and signature at
        Mixtral's vocabulary in bf16, gigabytes over a server's life, out of the memory the KV cache leaves."""
        shape = (BATCH_BUCKETS[-1],) + tuple(logits.shape[1:])
        if self.output is None or self.output.shape != shape or self.output.dtype != logits.dtype:
            self.output = torch.empty(shape, dtype=logits.dtype, device=logits.device)  # graphs keep the old one
        return self.output
