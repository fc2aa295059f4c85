"""The varlen prefill attention kernel against the pure-PyTorch reference (fp32 on the same inputs).

Ragged batches (1, 7, 128, 513 new tokens), cached prefixes of zero and non-zero lengths in blocks scattered
at random, windows shorter and longer than the sequences, GQA, head dims 64 and 128, bf16/fp16/fp32.
"""

import pytest
import torch

from tests.gpu.conftest import relative_error, skip_without_gpu

skip_without_gpu()

import triton

from lorax_server.kernels.prefill_attention import (SHORT_ROWS, TILE_CANDIDATES, PackedLaunch, choose_splits,
                                                      varlen_prefill_attention)
from lorax_server.layers.attention import cuda as cuda_attention
from lorax_server.layers.attention import reference
from lorax_server.utils.attention.common import Seqlen

pytestmark = pytest.mark.gpu
DEV = "cuda"
NEW = [1, 7, 128, 513]
BOUND = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}


def packed(lengths, heads, kv_heads, head_dim, dtype, seed=0):
    """q [T, H, D], k/v [T, KVH, D] and cu_seqlens [B+1] int32 for a ragged batch."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    T = sum(lengths)
    q = torch.randn(T, heads, head_dim, device=DEV, generator=g).to(dtype)
    k = torch.randn(T, kv_heads, head_dim, device=DEV, generator=g).to(dtype)
    v = torch.randn(T, kv_heads, head_dim, device=DEV, generator=g).to(dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    return q, k, v, cu


class PrefixProblem:
    """New tokens packed in q/k/v on top of cached prefixes in blocks scattered at random over the cache.

    `cache` holds only the prefixes: the new tokens' slots hold NaN, so a kernel that reads them there
    fails. `full_cache` has the new tokens written too (what the reference, and the all-from-cache path, read).
    """

    def __init__(self, new, cached, block_size, heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, seed=0):
        g = torch.Generator().manual_seed(seed)
        total = [c + n for c, n in zip(cached, new)]
        blocks = [-(-t // block_size) for t in total]
        num_blocks = sum(blocks) + 7
        order = torch.randperm(num_blocks, generator=g).tolist()
        tables = torch.randint(0, num_blocks, (len(new), max(blocks) + 3), generator=g, dtype=torch.int32)
        slots = []
        for b, n in enumerate(blocks):
            mine = [order.pop() for _ in range(n)]
            tables[b, :n] = torch.tensor(mine, dtype=torch.int32)
            slots += [mine[p // block_size] * block_size + p % block_size for p in range(cached[b], total[b])]
        self.tables = tables.to(DEV)
        self.q, self.k, self.v, cu = packed(new, heads, kv_heads, head_dim, dtype, seed)
        self.seqlen = Seqlen(torch.tensor(new, dtype=torch.int32, device=DEV),
                             torch.tensor(cached, dtype=torch.int32, device=DEV), cu)
        shape = (num_blocks, block_size, kv_heads, head_dim)
        gd = torch.Generator(device=DEV).manual_seed(seed + 1)
        self.full_cache = [torch.randn(shape, device=DEV, generator=gd).to(dtype) for _ in range(2)]
        slots = torch.tensor(slots, dtype=torch.int64, device=DEV)
        reference.write_kv(self.k, self.v, *self.full_cache, slots)
        self.cache = [c.clone() for c in self.full_cache]
        for c in self.cache:
            c.view(-1, kv_heads, head_dim)[slots] = float("nan")
        self.scale = head_dim**-0.5

    def want(self, window):
        kc, vc = (c.float() for c in self.full_cache)
        return reference.paged_attention(self.q.float(), kc, vc, self.tables, self.seqlen, self.scale, window)

    def run(self, window, **kwargs):
        s = self.seqlen
        return varlen_prefill_attention(self.q, self.k, self.v, s.cu_seqlen_q, s.max_q, self.scale, window,
                                        s.cache_lengths, *self.cache, self.tables, s.max_k, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("window", [None, 5, 64, 1000])
def test_fresh_prefill_matches_reference(dtype, window):
    q, k, v, cu = packed(NEW, 32, 8, 128, dtype)
    want = reference.prefill_attention(q.float(), k.float(), v.float(), cu, max(NEW), 128**-0.5, window)
    got = cuda_attention.prefill_attention(q, k, v, cu, max(NEW), 128**-0.5, window)
    assert got.dtype == dtype and got.shape == q.shape
    assert relative_error(got, want) < BOUND[dtype]


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 128), (8, 8, 64), (12, 4, 64), (16, 1, 128)])
@pytest.mark.parametrize("window", [None, 100])
def test_fresh_prefill_with_gqa_and_head_dims(heads, kv_heads, head_dim, window):
    lengths = [300, 1, 129, 64]
    q, k, v, cu = packed(lengths, heads, kv_heads, head_dim, torch.bfloat16, seed=heads)
    want = reference.prefill_attention(q.float(), k.float(), v.float(), cu, max(lengths), head_dim**-0.5, window)
    got = cuda_attention.prefill_attention(q, k, v, cu, max(lengths), head_dim**-0.5, window)
    assert relative_error(got, want) < 1e-2


def test_fresh_prefill_takes_strided_views_of_a_fused_qkv():
    """The model splits one [T, (H + 2 KVH) D] projection: k and v arrive as strided views."""
    lengths = [200, 3, 77]
    T, H, KVH, D = sum(lengths), 32, 8, 128
    qkv = torch.randn(T, (H + 2 * KVH) * D, device=DEV).bfloat16()
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], dim=-1))
    cu = torch.tensor([0, 200, 203, 280], dtype=torch.int32, device=DEV)
    want = reference.prefill_attention(q.float(), k.float(), v.float(), cu, 200, D**-0.5, None)
    assert relative_error(cuda_attention.prefill_attention(q, k, v, cu, 200, D**-0.5, None), want) < 1e-2


@pytest.mark.parametrize("block_size", [1, 8, 16, 32, 64, 128])
@pytest.mark.parametrize("window", [None, 37, 700, 5000])
def test_prefix_prefill_reads_the_prefix_from_the_cache_and_new_tokens_from_packed_kv(block_size, window):
    """Prefixes of 0, 2000, 5, 77 and 9 tokens (the last sequence has no new token this step)."""
    problem = PrefixProblem(NEW + [0], [0, 2000, 5, 77, 9], block_size, seed=block_size)
    assert relative_error(problem.run(window), problem.want(window)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("window", [None, 37])
def test_prefix_prefill_dtypes(dtype, window):
    problem = PrefixProblem(NEW, [3, 600, 0, 129], 16, dtype=dtype)
    got = problem.run(window)
    assert got.dtype == dtype and relative_error(got, problem.want(window)) < BOUND[dtype]


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 8, 64), (12, 4, 64), (16, 2, 128)])
def test_prefix_prefill_with_gqa_and_head_dims(heads, kv_heads, head_dim):
    problem = PrefixProblem([130, 5], [70, 1000], 16, heads, kv_heads, head_dim)
    assert relative_error(problem.run(300), problem.want(300)) < 1e-2


@pytest.mark.parametrize("heads, kv_heads", [(32, 8), (16, 2), (12, 4), (48, 8), (8, 8)])
def test_every_row_is_right_whether_or_not_the_group_packs(heads, kv_heads):
    """Float32, every element against the reference (a few wrong rows hide in a relative norm): groups of 4 and 8
    pack their heads into one program's rows; groups of 3 and 6 (Mixtral-8x22B) cannot fill power-of-two tiles
    with whole tokens and take one head a program."""
    problem = PrefixProblem([130, 5, 1, 24], [70, 1000, 600, 0], 16, heads, kv_heads, 64, torch.float32)
    for kwargs in ({}, {"max_cached": 1000, "min_q": 1}):
        got, want = problem.run(None, **kwargs), problem.want(None)
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window", [None, 1000])
def test_short_chunks_on_long_prefixes(window):
    """A few new tokens each over thousands of cached ones: the kernel takes a short row tile."""
    problem = PrefixProblem([1, 3, 16, 9], [4000, 17, 1500, 0], 16)
    assert relative_error(problem.run(window), problem.want(window)) < 1e-2


@pytest.mark.parametrize("window", [None, 37])
def test_paged_attention_prefix_prefill(window):
    """cuda.paged_attention with max_q > 1: all keys from the cache when no packed k/v is given (the new
    tokens are written there), or the new tokens from the packed k/v when given."""
    problem = PrefixProblem(NEW, [11, 0, 300, 2048], 16)
    want = problem.want(window)
    args = (problem.tables, problem.seqlen, problem.scale, window)
    all_cached = cuda_attention.paged_attention(problem.q, *problem.full_cache, *args)
    assert relative_error(all_cached, want) < 1e-2
    with_packed = cuda_attention.paged_attention(problem.q, *problem.cache, *args, key=problem.k, value=problem.v)
    assert relative_error(with_packed, want) < 1e-2


@pytest.mark.parametrize("tile", TILE_CANDIDATES, ids=lambda t: "x".join(map(str, map(int, t))))
@pytest.mark.parametrize("window", [None, 90])
def test_every_tile_candidate_is_correct(tile, window):
    problem = PrefixProblem([1, 200, 64], [130, 70, 0], 16)
    q, k, v, cu = packed([1, 200, 64], 32, 8, 128, torch.bfloat16)
    fresh = reference.prefill_attention(q.float(), k.float(), v.float(), cu, 200, 128**-0.5, window)
    try:
        got = problem.run(window, tile=tile)
    except triton.runtime.errors.OutOfResources as e:
        pytest.skip(f"does not fit this device: {e}")
    assert relative_error(got, problem.want(window)) < 1e-2
    got = varlen_prefill_attention(q, k, v, cu, 200, 128**-0.5, window, tile=tile)
    assert relative_error(got, fresh) < 1e-2


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("window", [None, 37, 700])
def test_split_kv_over_long_prefixes_matches_the_reference(splits, window):
    """The prefix split over several programs per row tile (their partial sums merged after), as a chunk of a
    long prompt next to decode rows: prefixes longer and shorter than a split, rows with no prefix at all."""
    problem = PrefixProblem([256, 1, 1, 7, 0], [3000, 600, 0, 2999, 40], 16, seed=splits)
    got = problem.run(window, max_cached=3000, splits=splits)
    assert relative_error(got, problem.want(window)) < 1e-2


@pytest.mark.parametrize("packed", [True, False], ids=["gqa-packed", "one-head-a-program"])
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("window", [None, 300])
def test_decodes_beside_a_chunk_take_a_launch_of_their_own(splits, window, packed, monkeypatch):
    """Rows of at most SHORT_ROWS new tokens (decodes, a short prefix hit) beside a long chunk get tiles of their
    own in a second launch (min_q known); every row matches the reference, the long chunk's split merged or not,
    with the 4 query heads of a KV head packed into one program's rows (the default on a prefix) or not."""
    monkeypatch.setenv("LORAX_PREFILL_PACK_GQA", "1" if packed else "0")
    launches = []
    launch = PackedLaunch.launch

    def counted(self, min_rows, max_rows, *args, **kwargs):
        launches.append((min_rows, max_rows))
        return launch(self, min_rows, max_rows, *args, **kwargs)
    monkeypatch.setattr(PackedLaunch, "launch", counted)
    new = [1, 200, 1, SHORT_ROWS, 0, SHORT_ROWS + 1, 3]
    problem = PrefixProblem(new, [500, 3000, 0, 2999, 40, 17, 1200], 16, seed=5)
    got = problem.run(window, max_cached=3000, splits=splits, min_q=min(new))
    assert launches == [(SHORT_ROWS + 1, 200), (0, SHORT_ROWS)]
    assert relative_error(got, problem.want(window)) < 1e-2


def test_split_kv_is_chosen_for_few_row_tiles_on_a_long_prefix_only():
    assert choose_splits(rows=288, heads=32, row_tiles=2, max_cached=8192, max_q=256) > 1  # a chunk beside decodes
    assert choose_splits(rows=128, heads=32, row_tiles=1, max_cached=2000, max_q=128) > 1  # one prefix-cache hit
    assert choose_splits(rows=8192, heads=32, row_tiles=1, max_cached=2000, max_q=128) == 1  # 64 hits at once
    assert choose_splits(rows=1024, heads=32, row_tiles=1, max_cached=2000, max_q=128) <= 2  # 8 hits at once
    assert choose_splits(rows=64, heads=32, row_tiles=1, max_cached=600, max_q=64) == 1  # a short prefix
    problem = PrefixProblem([128], [5000], 16)
    auto = problem.run(None, max_cached=5000)
    assert relative_error(auto, problem.want(None)) < 1e-2


def test_empty_batch_and_no_host_sync():
    q, k, v, cu = packed([0], 32, 8, 128, torch.bfloat16)
    assert cuda_attention.prefill_attention(q, k, v, cu, 0, 0.1, None).shape == (0, 32, 128)
    q, k, v, cu = packed([64, 3], 32, 8, 128, torch.bfloat16)
    cuda_attention.prefill_attention(q, k, v, cu, 64, 0.1, 16)  # compiles outside the watch
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_attention.prefill_attention(q, k, v, cu, 64, 0.1, 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
