"""Attention ops for CUDA devices: SDPA per sequence for prefill, the Triton kernels for decode and KV write.

Prefill runs one SDPA call per packed sequence (its flash/cuDNN path when the window does not cut into
the sequence; with an explicit mask when it does). Decode steps (one new token per sequence) use the
Triton split-KV kernel; a prefill on top of a cached prefix falls back to the reference.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from lorax_server.kernels.paged_attention import paged_decode_attention, write_kv
from lorax_server.layers.attention import reference
from lorax_server.utils.attention.common import Seqlen

__all__ = ["prefill_attention", "paged_attention", "write_kv"]


def window_mask(n: int, window: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_s: int,
                      scale: float, window: Optional[int]) -> torch.Tensor:
    """Causal attention of each packed sequence over its own tokens: q [T, H, D], k/v [T, KVH, D]."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, n, D]
        if window is None or window >= end - start:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = window_mask(end - start, window, q.device)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)
    return out


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                    seqlen: Seqlen, scale: float, window: Optional[int]) -> torch.Tensor:
    if seqlen.max_q != 1:
        return reference.paged_attention(q, key_cache, value_cache, block_tables, seqlen, scale, window)
    lengths = seqlen.total_lengths.to(torch.int32)
    return paged_decode_attention(q, key_cache, value_cache, block_tables, lengths, seqlen.max_k, scale, window)
