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


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Stores key/value [T, KVH, D] at `slots` [T] of the caches [NB, BS, KVH, D]; slot -1 is skipped."""
    keep = slots >= 0
    targets = slots[keep]
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
                    key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of new tokens q [T, H, D] over their sequence's cache.

    Serves decode (one token per sequence) and prefill on top of a cached prefix alike: the i-th new
    token of sequence b sits at position cache_lengths[b] + i. Its key and value are read from the cache
    (written already), or from `key`/`value` [T, KVH, D] when given (a sliding window caches only the
    last W tokens of a prompt, so the others are not in the cache).
    """
    block_size = key_cache.shape[1]
    n_blocks = -(-seqlen.max_k // block_size)
    tables = block_tables[:, :n_blocks].long()
    keys = key_cache[tables].flatten(1, 2)  # [B, n_blocks * BS, KVH, D]
    values = value_cache[tables].flatten(1, 2)
    index, valid = pad_index(seqlen.cu_seqlen_q, seqlen.max_q)
    positions = seqlen.cache_lengths.long().unsqueeze(1) + torch.arange(seqlen.max_q, device=q.device)
    if key is not None:
        rows = torch.arange(len(positions), device=q.device).unsqueeze(1).expand_as(positions)[valid]
        keys = keys.index_put((rows, positions[valid]), key[index[valid]].to(keys.dtype))
        values = values.index_put((rows, positions[valid]), value[index[valid]].to(values.dtype))
    out = masked_attention(q[index], keys, values, positions, seqlen.total_lengths, scale, window)
    return out[valid]
