"""CUDA graphs for prefill and mixed steps (and decode steps above the decode graphs' largest bucket), in pieces:
everything but the attention.

A chunk of a long prompt beside running decodes, or new tokens on a cached prefix, is a step of a few hundred
tokens that is launched eagerly: about 300 Triton and 1000 torch launches for 32 layers. On the H200 machine
that took 40-50 ms of host time, as long as the GPU's work, so such steps were host-bound (docs/PERF.md,
session 6). The attention depends on the batch's sequences (how many, how long, which blocks); everything else
depends only on how many tokens there are. So the step is cut at each attention. Per token-count bucket there is:
- one graph from the embedding to layer 0's attention;
- one from each attention to the next;
- one from the last attention to the final norm.

The attention runs eagerly between replays. It reads q, k and v from static buffers and writes its output to
one. Padding tokens (bucket minus T) write no cache slot and belong to no sequence: their rows are computed
and never read. Not for steps with adapters, prompt logprobs or more tokens than the largest bucket (those
run eagerly). A decode step of 513-1024 rows, which the decode graphs do not hold, runs here too: its
attention is the paged decode kernel, the same between the pieces as inside a decode graph.

Without CUDA (`capture=False`) the same pieces run eagerly over the same static buffers, which is how the CPU
tests check the cut and the padding against the whole forward.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

# Token counts a step pads up to. A padded token costs what a real one does in the projections and the experts,
# so the buckets are close together. They stop at the fused MoE kernels' limit (kernels/fused_moe.py): larger
# prefills keep the GPU busy on their own.
TOKEN_BUCKETS = (16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


def enabled_by_env(world_size: int = 1) -> bool:
    """On with CUDA graphs on one GPU unless LORAX_STEP_GRAPHS=0. On an H200 (session 7) they cut a chunk
    step's host launch from 31 to 7.7 ms (chunks of 128 beside 32 decodes), and its wall time from 36.3 to 35.2
    ms p50: the step is now bound by the GPU, not by the host (docs/PERF.md). Sharded (tensor or expert
    parallel) only with LORAX_STEP_GRAPHS=1: the pieces capture the layers' all-reduces, and that has not run on
    two GPUs yet (a rank whose capture fails would also run eagerly while the others replay)."""
    setting = os.getenv("LORAX_STEP_GRAPHS")
    if setting is not None:
        return setting != "0"
    return world_size == 1


@dataclass
class StaticStep:
    """What one bucket's pieces read and write (views of the buffers every bucket shares): the step's inputs, then
    what crosses each cut."""

    input_ids: torch.Tensor  # [N] int64
    position_ids: torch.Tensor  # [N] int64
    slots: torch.Tensor  # [N] int64, -1 for padding (no cache write)
    cos: torch.Tensor  # [N, D/2]
    sin: torch.Tensor
    q_and_k: torch.Tensor  # [N, nh + nkv, D], rotated
    v: torch.Tensor  # [N, nkv, D]
    attended: torch.Tensor  # [N, nh, D]: the attention's output
    residual: torch.Tensor  # [N, H]
    hidden: torch.Tensor  # [N, H]: the final norm's output
    meta: object  # what the pieces (not the attention) read of the batch (the model's piece_metadata)
    pieces: List[Callable[[], None]] = field(default_factory=list)  # `StepGraphs.pieces`
    graphs: List[torch.cuda.CUDAGraph] = field(default_factory=list)  # one per piece (empty: run eagerly)


class StepGraphs:
    """The pieces of every bucket met so far, captured (or, with capture=False, run eagerly)."""

    def __init__(self, model, kv_cache, capture: bool = True, buckets: Tuple[int, ...] = TOKEN_BUCKETS):
        self.model = model  # FlashMixtralForCausalLM
        self.kv_cache = kv_cache
        self.capture = capture
        self.buckets = buckets
        self.steps: Dict[int, StaticStep] = {}
        self.buffers: Optional[Dict[str, torch.Tensor]] = None  # `allocate`
        self.pool = None
        self.broken = False  # set when a capture failed: stay eager

    def bucket(self, tokens: int) -> Optional[int]:
        if self.broken or tokens > self.buckets[-1]:
            return None
        return next(b for b in self.buckets if b >= tokens)

    def prepare(self, max_tokens: Optional[int] = None) -> int:
        """Captures every bucket up to `max_tokens` now (at warm-up); returns how many buckets there are."""
        for size in self.buckets:
            if (max_tokens is None or size <= max_tokens) and size not in self.steps and not self.broken:
                self.build(size)
        return len(self.steps)

    def run(self, batch) -> Optional[torch.Tensor]:
        """Logits of this prefill, mixed or decode step (a runner.ForwardBatch, no adapters, last-token logits),
        or None when it must run eagerly. (Decode steps come here above the decode graphs' largest bucket.)"""
        tokens = batch.input_ids.shape[0]
        size = self.bucket(tokens)
        if size is None or batch.lm_head_indices is None:
            return None
        step = self.steps.get(size) or self.build(size)
        if step is None:
            return None
        step.input_ids[:tokens].copy_(batch.input_ids)
        step.position_ids[:tokens].copy_(batch.position_ids)
        step.slots.fill_(-1)[:tokens].copy_(batch.slots)
        attention = self.model.model.attention_metadata(batch.cu_seqlen_prefill, batch.block_tables, batch.slots,
                                                        batch.seqlen)
        layers = self.model.model.layers
        heads = layers[0].self_attn.num_heads if layers else 0
        # Every layer's q, k and v land in the same buffers: one set of views serves all the attentions.
        q, k = step.q_and_k[:tokens].split([heads, step.q_and_k.shape[1] - heads], dim=1)
        v, attended = step.v[:tokens], step.attended[:tokens]
        self.replay(step, 0)
        for i, layer in enumerate(layers):
            attended.copy_(layer.self_attn.attend(q, k, v, attention, self.kv_cache[i]))
            self.replay(step, i + 1)
        return self.model.compute_logits(step.hidden[:tokens].index_select(0, batch.lm_head_indices))

    @staticmethod
    def replay(step: StaticStep, piece: int) -> None:
        if step.graphs:
            step.graphs[piece].replay()
        else:
            step.pieces[piece]()

    def pieces(self, step: StaticStep) -> List[Callable[[], None]]:
        """Piece 0: embedding, rotary tables, layer 0 up to its attention. Piece i: layer i-1 from its attention
        on, then layer i up to its attention. The last piece: the last layer from its attention on and the final
        norm. Each reads and writes only `step`'s buffers (and the cache)."""
        model = self.model.model
        count = len(model.layers)

        def piece(i: int) -> None:
            if i == 0:
                x = model.embed_tokens(step.input_ids)
                cos, sin = model.rotary(step.position_ids, x.dtype)
                step.cos.copy_(cos)
                step.sin.copy_(sin)
                residual = None
            else:
                x, residual = model.layers[i - 1].leave(step.attended, step.residual, step.meta)
            if i == count:
                step.hidden.copy_(model.norm(x, residual)[0])
                return
            q, k, v, residual = model.layers[i].enter(x, residual, step.meta, self.kv_cache[i])
            heads = q.shape[1]
            step.q_and_k[:, :heads].copy_(q)
            step.q_and_k[:, heads:].copy_(k)
            step.v.copy_(v)
            step.residual.copy_(residual)

        return [lambda i=i: piece(i) for i in range(count + 1)]

    def build(self, size: int) -> Optional[StaticStep]:
        """The bucket's buffers and pieces, captured; None (and eager from now on) when that fails: a backend
        that synchronises with the host cannot be captured, and the buffers or the graphs may not fit."""
        try:
            step = self.allocate(size)
            step.pieces = self.pieces(step)
            if self.capture:
                step.graphs = self.record(step.pieces)
        except Exception as error:
            if not self.capture:
                raise
            logger.warning("prefill CUDA graphs disabled: capturing %d tokens failed (%s)", size, error)
            self.broken = True
            torch.cuda.synchronize()
            return None
        self.steps[size] = step
        return step

    def allocate(self, size: int) -> StaticStep:
        """The bucket's buffers: views of one set sized for the largest bucket (steps run one at a time), with
        every slot -1, so that the warm-up and capture that follow write no cache slot."""
        if self.buffers is None:
            self.buffers = self.full_size_buffers()
        view = {name: buffer[:size] for name, buffer in self.buffers.items()}
        view["slots"].fill_(-1)
        return StaticStep(**view, meta=self.model.model.piece_metadata(view["cos"], view["sin"], view["slots"]))

    def full_size_buffers(self) -> Dict[str, torch.Tensor]:
        model = self.model.model
        attn = model.layers[0].self_attn
        heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        hidden, n = model.norm.weight.shape[0], self.buckets[-1]
        device, dtype = model.norm.weight.device, model.embed_tokens.weight.dtype

        def zeros(*shape, dtype=dtype):
            return torch.zeros(*shape, dtype=dtype, device=device)
        return dict(input_ids=zeros(n, dtype=torch.int64), position_ids=zeros(n, dtype=torch.int64),
                    slots=zeros(n, dtype=torch.int64), cos=zeros(n, dim // 2), sin=zeros(n, dim // 2),
                    q_and_k=zeros(n, heads + kv_heads, dim), v=zeros(n, kv_heads, dim), attended=zeros(n, heads, dim),
                    residual=zeros(n, hidden), hidden=zeros(n, hidden))

    def record(self, pieces: List[Callable[[], None]]) -> List[torch.cuda.CUDAGraph]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture (Triton compiles, the allocator settles)
            for piece in pieces:
                piece()
        torch.cuda.current_stream().wait_stream(stream)
        graphs = []
        for piece in pieces:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                piece()
            self.pool = graph.pool()
            graphs.append(graph)
        # One replay each now: a graph's first launch also uploads it to the device, which cost the first chunk
        # step of a bucket ~15 ms on an H200. The buffers' slots are all -1, so no cache slot is written.
        for graph in graphs:
            graph.replay()
        return graphs
