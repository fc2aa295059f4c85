"""Varlen prefill attention in one Triton kernel: each packed sequence's new tokens over its cached prefix
and over themselves, causal, with GQA and an optional sliding window.

Oracle: `lorax_server.layers.attention.reference.prefill_attention` (no prefix) and `paged_attention`.

Shapes: T packed new tokens, B sequences, H query heads, KVH key/value heads, D head dim, NB cache blocks,
BS block size (any; the paged cache is [NB, BS, KVH, D]). Sequence b's i-th new token, row cu_seqlen_q[b] + i
of q, sits at position cache_lengths[b] + i.

A program owns (query head, sequence, tile of BLOCK_M new tokens) and keeps an fp32 online softmax over its
keys in two phases: the cached prefix (positions < cache_lengths[b]) gathered from the paged cache through
the block table, then the sequence's new tokens read from the packed k/v. The new tokens come from the
packed tensors because with a sliding window not every new token is written into the cache. Keys that every
query of the tile sees run without a mask; only the tile's diagonal and the window's far edge pay for one.
The grid is (H, B, tiles of max_q), all host ints the caller has: tiles past a sequence's end return at
once, so nothing synchronises with the host. A few new tokens on a long cached prefix (a chunk of a long
prompt) make too few programs to fill the GPU; then each tile's prefix is split over several programs
(split-KV, `choose_splits`), each writing its unnormalised sum and softmax statistics, and the decode
kernel's `merge_splits_kernel` combines them (the new tokens go with the last split). The query heads sharing
a KV head are neighbours in launch order (their K/V reads then hit L2), and the last tiles of the sequences,
with the longest key runs, start first.
"""

import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from lorax_server.kernels.paged_attention import merge_splits_kernel

LOG2E = 1.4426950408889634  # the kernel's softmax uses exp2: exp(x) = exp2(x * log2(e))
LN2 = tl.constexpr(0.6931471805599453)  # its maxima back to natural-log units, for the split-KV merge


class Tile(NamedTuple):
    block_m: int  # new tokens (query rows) per program
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int
    one_loop: bool = False  # mask every key step (one pipelined loop per phase) instead of only the edges


# bf16/fp16, from `python -m bench.prefill_attention --tune` on one H200 (docs/PERF.md, "Prefill attention"):
# 64 x 64 tiles, 4 warps, 3 stages had the best geometric-mean time over 1x4096, 16x512, 64x128 and
# 64x(2000+128), head dim 128, in two runs (head dim 64 takes it too, unmeasured).
DEFAULT_TILE = Tile(64, 64, 4, 3)
# A long cached prefix (measured: 128 new tokens on 2000 cached, head dim 128): 128 x 128 tiles ran 1.07-1.09 ms
# against 1.17-1.19 for the default, in both runs.
LONG_PREFIX_TILE = Tile(128, 128, 8, 2)
# What `bench.prefill_attention --tune` sweeps (and tests/gpu checks one by one).
TILE_CANDIDATES = (Tile(64, 64, 4, 3), Tile(64, 64, 4, 3, True), Tile(64, 32, 4, 3), Tile(64, 64, 4, 4),
                   Tile(128, 64, 8, 3), Tile(128, 128, 8, 2))
# fp32 (exact IEEE dots, for tests and fp32 models) and head dims over 128: a smaller tile keeps the K/V
# stages in shared memory.
SMALL_TILE = Tile(64, 32, 4, 2)


def choose_tile(head_dim: int, dtype: torch.dtype, max_q: int, max_k: Optional[int] = None) -> Tile:
    """The tile for this launch (max_q: the rows of the longest run, its new tokens times the query heads a
    program packs; max_k: the longest prefix + new run, None without a prefix); short query runs (chunks on a
    long prefix) get short row tiles."""
    if dtype == torch.float32 or head_dim > 128:
        tile = SMALL_TILE
    elif head_dim == 128 and max_k is not None and max_q >= 128 and max_k >= 4 * max_q:
        return LONG_PREFIX_TILE
    else:
        tile = DEFAULT_TILE
    rows = max(16, triton.next_power_of_2(max(1, max_q)))
    if rows < tile.block_m:
        tile = tile._replace(block_m=rows, num_warps=4)
    return tile


@triton.jit
def attend(acc, l, m, q, q_pos, lo, hi, end, window, qk_scale, k_base, v_base, stride_kn, stride_vn, pos0,
           table, block_size, stride_block, FROM_CACHE: tl.constexpr, MASKED: tl.constexpr,
           WINDOWED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
           v_scale=1.0, CACHE_FP8: tl.constexpr = False):
    """Online-softmax steps over keys at positions [lo, hi), BLOCK_N at a time; `end` bounds the keys that exist.

    From the cache, position j is slot j % BS of block table[j // BS]; from the packed tensors it is row
    j - pos0 past k_base/v_base. Unmasked steps must only see keys that every query row may see.
    CACHE_FP8 (the cache phase over an e4m3 cache): entries are converted to q's dtype where they are loaded,
    `qk_scale` already carries the K scale and each step's p @ v is multiplied by `v_scale`.
    """
    d = tl.arange(0, HEAD_DIM)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        exists = pos < end
        if FROM_CACHE:
            if MASKED:
                block = tl.load(table + pos // block_size, mask=exists, other=0)
            else:
                block = tl.load(table + pos // block_size)
            k_rows = block.to(tl.int64) * stride_block + (pos % block_size) * stride_kn
            v_rows = k_rows
        else:
            k_rows = (pos - pos0) * stride_kn
            v_rows = (pos - pos0) * stride_vn
        if MASKED:
            k = tl.load(k_base + k_rows[:, None] + d[None, :], mask=exists[:, None], other=0.0)
        else:
            k = tl.load(k_base + k_rows[:, None] + d[None, :])
        if CACHE_FP8:
            k = k.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASKED:
            visible = exists[None, :] & (pos[None, :] <= q_pos[:, None])
            if WINDOWED:
                visible = visible & (q_pos[:, None] - pos[None, :] < window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        else:
            m_new = tl.maximum(m, tl.max(s, 1))
            shift = m_new
        p = tl.math.exp2(s - shift[:, None])
        alpha = tl.math.exp2(m - shift)
        if MASKED:
            v = tl.load(v_base + v_rows[:, None] + d[None, :], mask=exists[:, None], other=0.0)
        else:
            v = tl.load(v_base + v_rows[:, None] + d[None, :])
        if CACHE_FP8:
            v = v.to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION) * v_scale
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
    return acc, l, m


@triton.jit
def attend_span(acc, l, m, q, q_pos, base, lo, end, first, last, window, qk_scale, k_base, v_base, stride_kn,
                stride_vn, table, block_size, stride_block, FROM_CACHE: tl.constexpr, WINDOWED: tl.constexpr,
                ONE_LOOP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                v_scale=1.0, CACHE_FP8: tl.constexpr = False):
    """Keys at positions [lo, end), lo - base a multiple of BLOCK_N, for query rows at positions first..last.

    The steps whose keys every row sees (at most `first`; with a window, at least last - window + 1) run
    unmasked; the steps before them (window edge) and after them (diagonal, end of the keys) run masked.
    With ONE_LOOP every step is masked: one pipelined loop, which can win when there are few steps.
    """
    if ONE_LOOP:
        acc, l, m = attend(acc, l, m, q, q_pos, lo, end, end, window, qk_scale, k_base, v_base, stride_kn,
                           stride_vn, base, table, block_size, stride_block, FROM_CACHE, True, WINDOWED, HEAD_DIM,
                           BLOCK_N, PRECISION, v_scale, CACHE_FP8)
    else:
        full_hi = tl.maximum(base + (tl.minimum(end, first + 1) - base) // BLOCK_N * BLOCK_N, lo)
        full_lo = lo
        if WINDOWED:
            oldest = tl.maximum(last - window + 1, lo)
            full_lo = tl.minimum(base + tl.cdiv(oldest - base, BLOCK_N) * BLOCK_N, full_hi)
            acc, l, m = attend(acc, l, m, q, q_pos, lo, full_lo, end, window, qk_scale, k_base, v_base, stride_kn,
                               stride_vn, base, table, block_size, stride_block, FROM_CACHE, True, WINDOWED, HEAD_DIM,
                               BLOCK_N, PRECISION, v_scale, CACHE_FP8)
        acc, l, m = attend(acc, l, m, q, q_pos, full_lo, full_hi, end, window, qk_scale, k_base, v_base, stride_kn,
                           stride_vn, base, table, block_size, stride_block, FROM_CACHE, False, WINDOWED, HEAD_DIM,
                           BLOCK_N, PRECISION, v_scale, CACHE_FP8)
        acc, l, m = attend(acc, l, m, q, q_pos, full_hi, end, end, window, qk_scale, k_base, v_base, stride_kn,
                           stride_vn, base, table, block_size, stride_block, FROM_CACHE, True, WINDOWED, HEAD_DIM,
                           BLOCK_N, PRECISION, v_scale, CACHE_FP8)
    return acc, l, m


@triton.jit
def attend_new(acc, l, m, q, q_pos, ctx, lo, first, last, window, qk_scale, k_ptr, v_ptr, q_start, kvh, stride_kt,
               stride_kh, stride_vt, stride_vh, tables_ptr, block_size, stride_cb, WINDOWED: tl.constexpr,
               ONE_LOOP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Phase 2: the sequence's new tokens (positions ctx + i), from the packed k/v."""
    lo_new = ctx + tl.maximum(lo - ctx, 0) // BLOCK_N * BLOCK_N
    return attend_span(acc, l, m, q, q_pos, ctx, lo_new, last + 1, first, last, window, qk_scale,
                       k_ptr + q_start * stride_kt + kvh * stride_kh, v_ptr + q_start * stride_vt + kvh * stride_vh,
                       stride_kt, stride_vt, tables_ptr, block_size, stride_cb, False, WINDOWED, ONE_LOOP, HEAD_DIM,
                       BLOCK_N, PRECISION)


# One compile for every window, block size and split: none of them is specialised on.
@triton.jit(do_not_specialize=["window", "block_size", "splits", "split_len", "min_rows", "max_rows", "stride_tb",
                                "stride_mt"])
def varlen_prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, cu_q_ptr, cache_len_ptr, k_cache, v_cache, tables_ptr,
                          part_acc_ptr, part_max_ptr, part_sum_ptr,
                          qk_scale, window, block_size, splits, split_len, min_rows, max_rows, stride_qt, stride_qh,
                          stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_tb,
                          stride_pt, stride_ps, stride_ph, stride_mt, stride_ms,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, HAS_PREFIX: tl.constexpr, NEW_IN_CACHE: tl.constexpr,
                          WINDOWED: tl.constexpr, ONE_LOOP: tl.constexpr, PRECISION: tl.constexpr,
                          SPLIT_KV: tl.constexpr, cache_qk_scale=1.0, v_scale=1.0, CACHE_FP8: tl.constexpr = False,
                          PACK: tl.constexpr = 1):
    """PACK 1: a program owns one query head (program_id 0) and BLOCK_M new tokens. PACK = GROUP: it owns one KV
    head and the GROUP query heads that share it, BLOCK_M // GROUP new tokens each (row r: token r // GROUP,
    head r % GROUP of the group), so each key and value it loads serves GROUP heads."""
    TILE_T: tl.constexpr = BLOCK_M // PACK  # new tokens per tile
    h, b = tl.program_id(0), tl.program_id(1)
    if SPLIT_KV:  # `splits` programs share a row tile, each over its own slice of the cached prefix
        split = tl.program_id(2) % splits
        m0 = (tl.num_programs(2) // splits - 1 - tl.program_id(2) // splits) * TILE_T
    else:
        m0 = (tl.num_programs(2) - 1 - tl.program_id(2)) * TILE_T  # last tiles first: they have the most keys
    q_start = tl.load(cu_q_ptr + b)
    n_q = tl.load(cu_q_ptr + b + 1) - q_start
    if m0 >= n_q:
        return
    if n_q < min_rows:  # another launch takes this sequence (decodes beside a chunk: `PackedLaunch`)
        return
    if n_q > max_rows:
        return
    q_start = q_start.to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    if PACK == 1:
        kvh = h // GROUP
        heads = h + r * 0  # [BLOCK_M], every row the program's head
    else:
        kvh = h
        heads = h * GROUP + r % GROUP
    if HAS_PREFIX:
        ctx = tl.load(cache_len_ptr + b).to(tl.int32)
    else:
        ctx = 0
    rows = m0 + r // PACK  # [BLOCK_M] each row's new token
    real = rows < n_q
    q_pos = ctx + rows  # [BLOCK_M] positions of the tile's queries
    first = ctx + m0
    last = ctx + tl.minimum(m0 + TILE_T, n_q) - 1  # the last real query
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=real[:, None], other=0.0)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    lo = 0
    if WINDOWED:
        lo = tl.maximum(first - window + 1, 0)  # the oldest key any row of the tile sees
    if HAS_PREFIX:
        # Phase 1: the paged cache; it also holds this step's tokens when no packed k/v was given.
        cache_end = ctx
        if NEW_IN_CACHE:
            cache_end = last + 1
        cache_lo = lo
        if SPLIT_KV:  # this split's keys: [split * split_len, (split + 1) * split_len), split_len a BLOCK_N multiple
            cache_lo = tl.maximum(lo, split * split_len)
            cache_end = tl.minimum(cache_end, (split + 1) * split_len)
        if CACHE_FP8:  # e4m3 entries: the K scale folded into the softmax scale, the V scale applied to p @ v
            acc, l, m = attend_span(acc, l, m, q, q_pos, 0, cache_lo // BLOCK_N * BLOCK_N, cache_end, first, last,
                                    window, cache_qk_scale, k_cache + kvh * stride_ch, v_cache + kvh * stride_ch,
                                    stride_cs, stride_cs, tables_ptr + b * stride_tb, block_size, stride_cb, True,
                                    WINDOWED, ONE_LOOP, HEAD_DIM, BLOCK_N, PRECISION, v_scale, True)
        else:
            acc, l, m = attend_span(acc, l, m, q, q_pos, 0, cache_lo // BLOCK_N * BLOCK_N, cache_end, first, last,
                                    window, qk_scale, k_cache + kvh * stride_ch, v_cache + kvh * stride_ch, stride_cs,
                                    stride_cs, tables_ptr + b * stride_tb, block_size, stride_cb, True, WINDOWED,
                                    ONE_LOOP, HEAD_DIM, BLOCK_N, PRECISION)
    if SPLIT_KV:
        if split == splits - 1:  # the last split also takes the new tokens
            acc, l, m = attend_new(acc, l, m, q, q_pos, ctx, lo, first, last, window, qk_scale, k_ptr, v_ptr,
                                   q_start, kvh, stride_kt, stride_kh, stride_vt, stride_vh, tables_ptr, block_size,
                                   stride_cb, WINDOWED, ONE_LOOP, HEAD_DIM, BLOCK_N, PRECISION)
    elif not NEW_IN_CACHE:
        acc, l, m = attend_new(acc, l, m, q, q_pos, ctx, lo, first, last, window, qk_scale, k_ptr, v_ptr, q_start,
                               kvh, stride_kt, stride_kh, stride_vt, stride_vh, tables_ptr, block_size, stride_cb,
                               WINDOWED, ONE_LOOP, HEAD_DIM, BLOCK_N, PRECISION)
    if not SPLIT_KV:
        out = acc / l[:, None]
        tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=real[:, None])
    else:  # the split's unnormalised sum and softmax statistics, merged by paged_attention.merge_splits_kernel
        part = (q_start + rows)[:, None] * stride_pt + split * stride_ps + heads[:, None] * stride_ph + d[None, :]
        tl.store(part_acc_ptr + part, acc, mask=real[:, None])
        stats = (q_start + rows) * stride_mt + split * stride_ms + heads
        tl.store(part_max_ptr + stats, m * LN2, mask=real)  # natural-log units, as the merge weighs with exp
        tl.store(part_sum_ptr + stats, l, mask=real)


# Split-KV for new tokens on a long cached prefix (a chunk of a long prompt, or a short request on a long shared
# prefix): one sequence's 128-256 new tokens make only 32-64 programs (heads x row tiles), each walking the
# whole prefix, where an H200 has 132 SMs. Measured before this existed (docs/PERF.md, session 5): a 256-token
# chunk at prefix 8192 beside 32 decodes took 444 us a layer in this kernel. The partial sums cost
# T x splits x H x D floats of scratch written and read once, so splits are only taken while that stays small.
SPLIT_TARGET_PROGRAMS = 264  # about two waves of 132 SMs for the longest sequence's row tiles
SPLIT_MIN_KEYS = 512  # prefix keys per split, at least
SPLIT_MAX_ROWS = 4096  # T x splits at most: 64 MB of fp32 partial sums at 32 heads of 128
MAX_SPLITS = 16


def choose_splits(rows: int, heads: int, row_tiles: int, max_cached: int, max_q: int) -> int:
    """How many programs share a row tile's prefix: enough for the tiles of the sequences that carry the work
    (about rows / max_q of them) to fill the GPU, each split with at least SPLIT_MIN_KEYS keys; 1 when the
    batch already makes enough programs (many requests on a shared prefix, say)."""
    programs = heads * row_tiles * max(1, rows // max(1, max_q))
    if os.getenv("LORAX_PREFILL_SPLIT_KV", "1") == "0":  # the escape hatch: one program per row tile, as before
        return 1
    if programs >= SPLIT_TARGET_PROGRAMS or max_cached < 2 * SPLIT_MIN_KEYS:
        return 1
    splits = min(triton.cdiv(SPLIT_TARGET_PROGRAMS, programs), max_cached // SPLIT_MIN_KEYS, MAX_SPLITS,
                 SPLIT_MAX_ROWS // max(1, rows))
    return max(1, splits)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def varlen_prefill_attention(q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
                             cu_seqlen_q: torch.Tensor, max_q: int, scale: float, window: Optional[int] = None,
                             cache_lengths: Optional[torch.Tensor] = None, key_cache: Optional[torch.Tensor] = None,
                             value_cache: Optional[torch.Tensor] = None, block_tables: Optional[torch.Tensor] = None,
                             max_k: Optional[int] = None, tile: Optional[Tile] = None,
                             max_cached: Optional[int] = None, splits: Optional[int] = None, k_scale: float = 1.0,
                             v_scale: float = 1.0, min_q: Optional[int] = None) -> torch.Tensor:
    """Causal attention of the packed new tokens q [T, H, D] (cu_seqlen_q [B+1], max_q the longest run).

    Keys: with key_cache/value_cache [NB, BS, KVH, D], block_tables [B, max_blocks] and cache_lengths [B],
    each sequence's cached prefix; then its new tokens from k/v [T, KVH, D], or, when k/v are None, from the
    cache too (they must all have been written there). A window W lets a query at position p see keys j with
    p - j < W. max_k (the longest prefix + new run), when given, drops a window that cannot cut. Returns
    [T, H, D] in q's dtype; fp32 inputs get IEEE (not TF32) dots.

    Split-KV: with `max_cached` (the longest cached prefix, a host int), a few new tokens on a long prefix
    spread the prefix over `splits` programs per row tile (`choose_splits` when None), merged after.
    With `min_q` (the shortest run, a host int), sequences of at most SHORT_ROWS new tokens beside longer ones
    on a prefix (decodes beside a chunk) get a launch of 16-row tiles of their own.

    An FP8 (float8_e4m3fn) cache's entries count as entry * k_scale (keys) and entry * v_scale (values); the
    packed k/v are used as given.
    """
    T, H, D = q.shape
    has_prefix = key_cache is not None
    new_in_cache = k is None
    if new_in_cache and not has_prefix:
        raise ValueError("without a cache the new tokens' k and v are needed")
    kv_heads = (key_cache if new_in_cache else k).shape[-2]
    assert H % kv_heads == 0 and D >= 16 and D & (D - 1) == 0, (H, kv_heads, D)
    q = last_dim_contiguous(q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if T == 0 or max_q == 0:
        return out
    longest = max_k if has_prefix else max_q
    windowed = window is not None and (longest is None or window < longest)
    if new_in_cache:
        k = v = q  # not read
    else:
        k, v = last_dim_contiguous(k), last_dim_contiguous(v)
        assert k.dtype == q.dtype and v.dtype == q.dtype, (q.dtype, k.dtype, v.dtype)
    if has_prefix:
        assert key_cache.is_contiguous() and value_cache.is_contiguous() and value_cache.shape == key_cache.shape
        cache_fp8 = key_cache.dtype == torch.float8_e4m3fn
        assert key_cache.dtype == value_cache.dtype and (cache_fp8 or key_cache.dtype == q.dtype), \
            (q.dtype, key_cache.dtype, value_cache.dtype)
        block_size = key_cache.shape[1]
        cache_strides = (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0))
    else:
        cache_fp8 = False
        key_cache = value_cache = block_tables = cache_lengths = cu_seqlen_q  # not read
        block_size, cache_strides = 1, (0, 0, 0, 0)
    group = H // kv_heads
    pack = group if packs_heads(group, has_prefix, max_q, tile) else 1
    chosen = tile or choose_tile(D, q.dtype, max_q * pack, max_k if has_prefix else None)
    short_apart = (tile is None and has_prefix and min_q is not None and min_q <= SHORT_ROWS < max_q
                   and chosen.block_m > SHORT_ROWS)
    batch = PackedLaunch(q, k, v, out, cu_seqlen_q, cache_lengths, key_cache, value_cache, block_tables, scale,
                         window if windowed else 0, block_size, cache_strides, group, has_prefix,
                         new_in_cache, windowed, k_scale, v_scale, cache_fp8, max_k, pack)
    split_prefix = max_cached if has_prefix and not new_in_cache else None  # split-KV reads only the cache
    if short_apart:
        # A chunk beside decodes: the decodes' single rows would each fill a 128-row tile of the long-prefix
        # launch, as much work as the chunk itself (32 decodes beside a 256-token chunk). They get 16-row tiles
        # in a launch of their own, after the other's split merge (which writes every row).
        batch.launch(SHORT_ROWS + 1, max_q, max_q, split_prefix, splits, chosen)
        # its tile sized by the shortest run (a decode's one token: `pack` rows), not by SHORT_ROWS
        batch.launch(0, SHORT_ROWS, SHORT_ROWS, None, 1, choose_tile(D, q.dtype, min_q * pack, max_k))
    else:
        batch.launch(0, max_q, max_q, split_prefix, splits, chosen)
    return out


SHORT_ROWS = 16  # sequences with at most this many new tokens (decodes) take 16-row tiles beside long chunks
# Query heads packed into a program's rows (GQA) for launches with a cached prefix and at most this many new
# tokens a sequence: chunks and decodes on long prefixes, where the prefix's K/V reads are the cost.
PACK_MAX_Q = 1024


def packs_heads(group: int, has_prefix: bool, max_q: int, tile: Optional[Tile]) -> bool:
    """Whether a program takes the `group` query heads of one KV head together (`varlen_prefill_kernel`'s PACK):
    then each prefix key and value is read once for all of them, where one program per query head read it
    `group` times. LORAX_PREFILL_PACK_GQA=0 turns it off."""
    if os.getenv("LORAX_PREFILL_PACK_GQA", "1") == "0" or group == 1 or not has_prefix or max_q > PACK_MAX_Q:
        return False
    # A tile's rows must hold whole tokens (BLOCK_M a multiple of the group): the tiles have power-of-two rows,
    # 16 at least, so groups of 3 or 6 (Mixtral-8x22B: 48 / 8 heads) take one head a program.
    if group & (group - 1) or group > 16:
        return False
    return tile is None or (tile.block_m % group == 0 and tile.block_m >= group)


@dataclass
class PackedLaunch:
    """What every launch of the kernel over one packed batch shares (`varlen_prefill_attention` checks it)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    cu_seqlen_q: torch.Tensor
    cache_lengths: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    scale: float
    window: int  # 0: none
    block_size: int
    cache_strides: Tuple[int, int, int, int]
    group: int  # query heads per KV head
    has_prefix: bool
    new_in_cache: bool
    windowed: bool
    k_scale: float
    v_scale: float
    cache_fp8: bool
    max_k: Optional[int]
    pack: int = 1  # query heads per program (`packs_heads`)

    def launch(self, min_rows: int, max_rows: int, max_q: int, max_cached: Optional[int], splits: Optional[int],
               tile: Optional[Tile] = None) -> None:
        """The sequences with min_rows..max_rows new tokens (max_q the longest of them): their tile, the split
        of long prefixes (`max_cached` None: no split) and the splits' merge."""
        q, out = self.q, self.out
        T, H, D = q.shape
        tile = tile or choose_tile(D, q.dtype, max_q * self.pack, self.max_k if self.has_prefix else None)
        tiles = triton.cdiv(max_q, tile.block_m // self.pack)
        heads = H // self.pack  # programs along the grid's first axis: query heads, or KV heads when packed
        if not max_cached:
            splits = 1
        else:
            splits = choose_splits(T, heads, tiles, max_cached, max_q) if splits is None else splits
            splits = min(splits, MAX_SPLITS, max(1, max_cached // tile.block_n))
        split_len = 0
        if splits > 1:  # whole key steps per split; rounding up may leave fewer splits
            split_len = triton.cdiv(triton.cdiv(max_cached, splits), tile.block_n) * tile.block_n
            splits = triton.cdiv(max_cached, split_len)
        if splits > 1:
            part_acc = torch.empty(T, splits, H, D, dtype=torch.float32, device=q.device)
            part_max = torch.empty(T, splits, H, dtype=torch.float32, device=q.device)
            part_sum = torch.empty_like(part_max)
            part_strides = (*part_acc.stride()[:3], *part_max.stride()[:2])
        else:
            part_acc = part_max = part_sum = out  # not written
            part_strides = (0, 0, 0, 0, 0)
        k, v = self.k, self.v
        varlen_prefill_kernel[(heads, self.cu_seqlen_q.shape[0] - 1, tiles * splits)](
            q, k, v, out, self.cu_seqlen_q, self.cache_lengths, self.key_cache, self.value_cache, self.block_tables,
            part_acc, part_max, part_sum, self.scale * LOG2E, self.window, self.block_size, splits, split_len,
            min_rows, max_rows, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), *self.cache_strides, *part_strides, GROUP=self.group, HEAD_DIM=D,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, HAS_PREFIX=self.has_prefix, NEW_IN_CACHE=self.new_in_cache,
            WINDOWED=self.windowed, ONE_LOOP=tile.one_loop, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            SPLIT_KV=splits > 1, cache_qk_scale=self.scale * self.k_scale * LOG2E, v_scale=self.v_scale,
            CACHE_FP8=self.cache_fp8, PACK=self.pack, num_warps=tile.num_warps, num_stages=tile.num_stages)
        if splits > 1:
            merge_splits_kernel[(T, H)](part_acc, part_max, part_sum, out, splits, *part_acc.stride()[:3],
                                        *part_max.stride()[:2], out.stride(0), out.stride(1), HEAD_DIM=D,
                                        SPLITS_PAD=MAX_SPLITS)
