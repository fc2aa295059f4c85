"""Pure-PyTorch attention ops over packed sequences and the paged KV cache: the oracle for every kernel.

Shapes: T = new tokens in the packed batch, B = sequences, H = query heads, KVH = key/value heads,
D = head dim, NB = cache blocks, BS = block size, L = padded length of the longest run.
Both attention ops gather their sequences into a padded [B, L, ...] view with one index tensor, so the
work is vectorised (no Python loop per token, block or sequence), then SDPA does the maths with GQA.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from lorax_server.utils.attention.common import Seqlen

# The FP8 KV cache (`--kv-cache-dtype fp8`, vLLM's semantics): float8_e4m3fn entries, a K and a V scale per
# layer. Written as clamp(x / scale, -FP8_MAX, FP8_MAX) in e4m3; read as entry * scale. Only keys and values
# read from the cache are scaled; packed new tokens are used as they are.
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_KV_DTYPE


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in e4m3 at `scale`: x / scale, saturated to the format's range. Computed as fp32 x times the fp32
    reciprocal, rounded to nearest even, as the KV-write kernel does (a GPU's fp32 division is not always
    correctly rounded), so that both store the same bytes."""
    return (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slots: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Stores key/value [T, KVH, D] at `slots` [T] of the caches [NB, BS, KVH, D]; slot -1 is skipped.
    An FP8 cache stores key / k_scale and value / v_scale in e4m3 (the scales are ignored otherwise)."""
    keep = slots >= 0
    targets = slots[keep]
    if is_fp8(key_cache):  # as bytes: index_copy_ has no float8 kernel on every device
        key_cache.view(torch.uint8).view(-1, *key_cache.shape[2:]).index_copy_(
            0, targets, quantize_kv(key[keep], k_scale).view(torch.uint8))
        value_cache.view(torch.uint8).view(-1, *value_cache.shape[2:]).index_copy_(
            0, targets, quantize_kv(value[keep], v_scale).view(torch.uint8))
        return
    key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, targets, key[keep].to(key_cache.dtype))
    value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, targets, value[keep].to(value_cache.dtype))


def pad_index(cu_seqlens: torch.Tensor, max_len: int):
    """Index [B, L] into the packed tokens and the mask of real (not padding) entries."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    offsets = torch.arange(max_len, device=cu_seqlens.device)
    valid = offsets.unsqueeze(0) < lengths.unsqueeze(1)
    index = torch.where(valid, cu_seqlens[:-1].long().unsqueeze(1) + offsets, 0)
    return index, valid


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                     k_len: torch.Tensor, scale: float, window: Optional[int]) -> torch.Tensor:
    """q [B, Lq, H, D] at positions q_pos [B, Lq]; k, v [B, Lk, KVH, D] at positions 0..Lk-1.

    A query sees key j when j <= its position, j < k_len of its sequence, and (with a window W) when
    position - j < W, i.e. W keys including itself. Returns [B, Lq, H, D].
    """
    k_pos = torch.arange(k.shape[1], device=q.device)
    mask = (k_pos <= q_pos.unsqueeze(-1)) & (k_pos < k_len.view(-1, 1, 1))
    if window is not None:
        mask &= q_pos.unsqueeze(-1) - k_pos < window
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=True,
    )
    return out.transpose(1, 2)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_s: int,
                      scale: float, window: Optional[int]) -> torch.Tensor:
    """Causal attention of each packed sequence over its own new tokens: q [T, H, D], k/v [T, KVH, D]."""
    index, valid = pad_index(cu_seqlens, max_s)
    lengths = valid.sum(1)
    positions = torch.arange(max_s, device=q.device).expand_as(index)
    out = masked_attention(q[index], k[index], v[index], positions, lengths, scale, window)
    return out[valid]


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seqlen: Seqlen, scale: float, window: Optional[int],
                    key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Attention of new tokens q [T, H, D] over their sequence's cache.

    Serves decode (one token per sequence) and prefill on top of a cached prefix alike: the i-th new
    token of sequence b sits at position cache_lengths[b] + i. Its key and value are read from the cache
    (written already), or from `key`/`value` [T, KVH, D] when given (a sliding window caches only the
    last W tokens of a prompt, so the others are not in the cache). An FP8 cache's entries are read as
    entry * k_scale (keys) and entry * v_scale (values), in q's dtype; `key`/`value` are not scaled.
    """
    block_size = key_cache.shape[1]
    n_blocks = -(-seqlen.max_k // block_size)
    tables = block_tables[:, :n_blocks].long()
    keys = key_cache[tables].flatten(1, 2)  # [B, n_blocks * BS, KVH, D]
    values = value_cache[tables].flatten(1, 2)
    if is_fp8(key_cache):
        keys = (keys.float() * k_scale).to(q.dtype)
        values = (values.float() * v_scale).to(q.dtype)
    index, valid = pad_index(seqlen.cu_seqlen_q, seqlen.max_q)
    positions = seqlen.cache_lengths.long().unsqueeze(1) + torch.arange(seqlen.max_q, device=q.device)
    if key is not None:
        rows = torch.arange(len(positions), device=q.device).unsqueeze(1).expand_as(positions)[valid]
        keys = keys.index_put((rows, positions[valid]), key[index[valid]].to(keys.dtype))
        values = values.index_put((rows, positions[valid]), value[index[valid]].to(values.dtype))
    out = masked_attention(q[index], keys, values, positions, seqlen.total_lengths, scale, window)
    return out[valid]
