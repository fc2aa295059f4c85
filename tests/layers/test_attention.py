"""Attention ops against a naive oracle written per sequence and per query (no packing, no paging)."""

import math

import pytest
import torch

from lorax_server.layers.attention import reference
from lorax_server.utils.attention.common import Seqlen

H, KVH, D = 4, 2, 8


def naive_attention(q, k, v, positions, window):
    """q [n, H, D] at `positions` over k/v [L, KVH, D] at 0..L-1, causal (+ window), one sequence."""
    rep = H // KVH
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = []
    for i, p in enumerate(positions):
        lo = 0 if window is None else max(0, p - window + 1)
        scores = torch.einsum("hd,lhd->hl", q[i], k[lo:p + 1]) / math.sqrt(D)
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v[lo:p + 1]))
    return torch.stack(out)


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)


@pytest.mark.parametrize("window", [None, 1, 4])
def test_prefill_matches_naive(window):
    lengths = [5, 1, 9]
    q, k, v = torch.randn(15, H, D), torch.randn(15, KVH, D), torch.randn(15, KVH, D)
    got = reference.prefill_attention(q, k, v, cu(lengths), max(lengths), D**-0.5, window)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        torch.testing.assert_close(got[s], naive_attention(q[s], k[s], v[s], range(n), window))
        start += n


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("block_size", [1, 4])
def test_paged_attention_over_shuffled_blocks_matches_naive(window, block_size):
    """Sequences with cached prefixes and several new tokens each (chunked prefill) or one (decode)."""
    cached, new = [7, 0, 12], [3, 4, 1]
    total = [c + n for c, n in zip(cached, new)]
    num_blocks = 48
    key_cache = torch.zeros(num_blocks, block_size, KVH, D)
    value_cache = torch.zeros_like(key_cache)
    free = torch.randperm(num_blocks).tolist()
    keys = [torch.randn(t, KVH, D) for t in total]
    values = [torch.randn(t, KVH, D) for t in total]
    tables = []
    for t, kk, vv in zip(total, keys, values):
        blocks = [free.pop() for _ in range(-(-t // block_size))]
        tables.append(blocks + [0] * (16 - len(blocks)))
        s = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(t)])
        reference.write_kv(kk, vv, key_cache, value_cache, s)
    q = torch.randn(sum(new), H, D)
    seqlen = Seqlen(torch.tensor(new), torch.tensor(cached), cu(new))
    table = torch.tensor(tables, dtype=torch.int32)
    got = reference.paged_attention(q, key_cache, value_cache, table, seqlen, D**-0.5, window)
    start = 0
    for c, n, kk, vv in zip(cached, new, keys, values):
        want = naive_attention(q[start:start + n], kk, vv, range(c, c + n), window)
        torch.testing.assert_close(got[start:start + n], want)
        start += n
    # The new tokens' K/V given packed (a sliding window does not cache every prompt token): the cache's
    # copies of them are never read.
    new_keys = torch.cat([kk[c:] for c, kk in zip(cached, keys)])
    new_values = torch.cat([vv[c:] for c, vv in zip(cached, values)])
    for t, c, blocks in zip(total, cached, tables):
        s = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(c, t)])
        garbage = torch.full((t - c, KVH, D), 1e4)  # finite: padding rows of a table may read these blocks
        reference.write_kv(garbage, garbage, key_cache, value_cache, s)
    packed = reference.paged_attention(q, key_cache, value_cache, table, seqlen, D**-0.5, window,
                                       key=new_keys, value=new_values)
    torch.testing.assert_close(packed, got)


def test_write_kv_skips_padding_slots():
    key_cache = torch.zeros(2, 2, KVH, D)
    value_cache = torch.zeros_like(key_cache)
    k, v = torch.randn(3, KVH, D), torch.randn(3, KVH, D)
    reference.write_kv(k, v, key_cache, value_cache, torch.tensor([3, -1, 0]))
    flat = key_cache.view(4, KVH, D)
    assert torch.equal(flat[3], k[0]) and torch.equal(flat[0], k[2])
    assert flat[1].abs().sum() == 0 and flat[2].abs().sum() == 0
    assert torch.equal(value_cache.view(4, KVH, D)[3], v[0])


def test_seqlen_derives_offsets_and_maxima():
    s = Seqlen(torch.tensor([1, 1]), torch.tensor([4, 9]))
    assert s.cu_seqlen_q.tolist() == [0, 1, 2] and s.max_q == 1 and s.max_k == 10
