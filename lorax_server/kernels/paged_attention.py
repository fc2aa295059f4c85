"""Triton paged decode attention over the [blocks, block_size, kv_heads, head_dim] cache, and the KV write.

Oracle: `lorax_server.layers.attention.reference.paged_attention` and `write_kv`.

Decode: one query token per sequence. A program owns (sequence, KV head, split): it loads the GROUP
query heads that share that KV head together (so each key and value is read once for all of them),
walks its slice of the sequence's positions through the block table (any block size), and keeps an
online softmax. The splits of a long sequence run in parallel (split-KV) and are merged after. With
a sliding window W, only the last W positions are ever read.
"""

import torch
import triton
import triton.language as tl

KEYS_PER_STEP = 64  # positions loaded per inner iteration
TARGET_PROGRAMS = 528  # about four waves of 132 SMs: enough splits to keep an H100/H200 busy
# e4m3's largest finite value: the FP8 cache saturates there. A constexpr object (a global a kernel reads must be
# one; an annotation `FP8_MAX: tl.constexpr = ...` is refused when the kernel compiles).
FP8_MAX = tl.constexpr(448.0)


@triton.jit(do_not_specialize=["window", "split_len", "stride_tb", "stride_mb"])
def paged_decode_kernel(q_ptr, k_cache, v_cache, tables_ptr, lens_ptr, acc_ptr, max_ptr, sum_ptr,
                        scale, window, split_len, stride_qb, stride_qh, stride_cb, stride_cs, stride_ch,
                        stride_tb, stride_ab, stride_as, stride_ah, stride_mb, stride_ms, v_scale,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                        CACHE_FP8: tl.constexpr = False):
    """fp32 inputs get IEEE dots (PRECISION), as in the prefill kernel: TF32 would cost them ~1e-4 of accuracy.
    CACHE_FP8: the cache holds e4m3 entries, converted to q's dtype where they are loaded; `scale` then
    already carries the K scale (the host folds it in) and the partial sums are multiplied by `v_scale`."""
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    lo = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    start = lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        ok = pos < end
        block = tl.load(tables_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        row = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        k = tl.load(k_cache + row[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        if CACHE_FP8:
            k = k.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_cache + row[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        if CACHE_FP8:
            v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
    if CACHE_FP8:
        acc = acc * v_scale
    out = b * stride_ab + split * stride_as + heads[:, None] * stride_ah + d[None, :]
    tl.store(acc_ptr + out, acc, mask=(g < GROUP)[:, None])
    stats = b * stride_mb + split * stride_ms + heads
    tl.store(max_ptr + stats, m, mask=g < GROUP)
    tl.store(sum_ptr + stats, l, mask=g < GROUP)


# One compile for every split count (split-KV prefill shares it); the statistics' row stride (splits x heads)
# moves with it.
@triton.jit(do_not_specialize=["splits", "stride_mb"])
def merge_splits_kernel(acc_ptr, max_ptr, sum_ptr, out_ptr, splits, stride_ab, stride_as, stride_ah,
                        stride_mb, stride_ms, stride_ob, stride_oh, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """One program per (sequence, head): softmax-weighted sum of the splits' partial outputs."""
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    real = s < splits
    maxima = tl.load(max_ptr + b * stride_mb + s * stride_ms + h, mask=real, other=float("-inf"))
    sums = tl.load(sum_ptr + b * stride_mb + s * stride_ms + h, mask=real, other=0.0)
    top = tl.max(maxima, 0)
    weight = tl.where(real & (maxima > float("-inf")), tl.exp(maxima - top), 0.0)
    acc = tl.load(acc_ptr + b * stride_ab + s[:, None] * stride_as + h * stride_ah + d[None, :], mask=real[:, None],
                  other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(sums * weight, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int, scale: float,
                           window, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q [B, H, D] (one token per sequence), seq_lens [B] keys to attend (new one included) -> [B, H, D].
    An FP8 (e4m3) cache's entries count as entry * k_scale / entry * v_scale."""
    B, H, D = q.shape
    cache_fp8 = key_cache.dtype == torch.float8_e4m3fn
    if cache_fp8:
        scale = scale * k_scale  # s = (q . k_fp8) * scale * k_scale
    _, block_size, kv_heads, _ = key_cache.shape
    group = H // kv_heads
    span = min(max_len, window) if window else max_len
    splits = max(1, min(triton.cdiv(span, KEYS_PER_STEP), TARGET_PROGRAMS // max(1, B * kv_heads)))
    split_len = triton.cdiv(triton.cdiv(span, splits), KEYS_PER_STEP) * KEYS_PER_STEP
    splits = triton.cdiv(span, split_len)
    acc = torch.empty(B, splits, H, D, dtype=torch.float32, device=q.device)
    maxima = torch.empty(B, splits, H, dtype=torch.float32, device=q.device)
    sums = torch.empty_like(maxima)
    paged_decode_kernel[(B, kv_heads, splits)](
        q, key_cache, value_cache, block_tables, seq_lens, acc, maxima, sums,
        scale, window or 0, split_len, q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1),
        key_cache.stride(2), block_tables.stride(0), acc.stride(0), acc.stride(1), acc.stride(2),
        maxima.stride(0), maxima.stride(1), v_scale,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_SIZE=block_size,
        BLOCK_N=KEYS_PER_STEP, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", CACHE_FP8=cache_fp8,
        num_warps=4, num_stages=2)
    out = torch.empty_like(q)
    merge_splits_kernel[(B, H)](acc, maxima, sums, out, splits, acc.stride(0), acc.stride(1), acc.stride(2),
                                maxima.stride(0), maxima.stride(1), out.stride(0), out.stride(1),
                                HEAD_DIM=D, SPLITS_PAD=max(2, triton.next_power_of_2(splits)))
    return out


@triton.jit
def write_kv_kernel(k_ptr, v_ptr, k_cache, v_cache, slots_ptr, stride_k, stride_v, stride_slot, k_inv, v_inv,
                    WIDTH: tl.constexpr, BLOCK: tl.constexpr, CACHE_FP8: tl.constexpr = False):
    """CACHE_FP8: stores clamp(x * (1 / scale), -448, 448) in e4m3, the reference's `quantize_kv` (k_inv, v_inv:
    the reciprocal scales)."""
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    cols = tl.arange(0, BLOCK)
    ok = cols < WIDTH
    target = slot.to(tl.int64) * stride_slot + cols
    if CACHE_FP8:
        k = tl.load(k_ptr + t * stride_k + cols, mask=ok, other=0.0).to(tl.float32) * k_inv
        v = tl.load(v_ptr + t * stride_v + cols, mask=ok, other=0.0).to(tl.float32) * v_inv
        k = tl.minimum(tl.maximum(k, -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
        tl.store(k_cache + target, k.to(k_cache.dtype.element_ty), mask=ok)
        tl.store(v_cache + target, v.to(v_cache.dtype.element_ty), mask=ok)
    else:
        tl.store(k_cache + target, tl.load(k_ptr + t * stride_k + cols, mask=ok), mask=ok)
        tl.store(v_cache + target, tl.load(v_ptr + t * stride_v + cols, mask=ok), mask=ok)


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slots: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """key/value [T, KVH, D] -> cache slots (slot -1 skipped), with no host synchronisation. An FP8 (e4m3) cache
    stores key / k_scale and value / v_scale, saturated."""
    T, kv_heads, D = key.shape
    assert key_cache.is_contiguous() and value_cache.is_contiguous(), "the kernel addresses slots as rows"
    key, value = key.reshape(T, -1), value.reshape(T, -1)
    if T == 0:
        return
    write_kv_kernel[(T,)](key, value, key_cache, value_cache, slots, key.stride(0), value.stride(0),
                          key_cache.stride(1), 1.0 / k_scale, 1.0 / v_scale, WIDTH=kv_heads * D,
                          BLOCK=triton.next_power_of_2(kv_heads * D),
                          CACHE_FP8=key_cache.dtype == torch.float8_e4m3fn)
