"""Attention ops for CUDA devices: the Triton kernels for prefill, decode and KV write.

Prefill, fresh or on top of a cached prefix, is one varlen launch over the whole packed batch
(`lorax_server.kernels.prefill_attention`); decode steps (one new token per sequence) use the Triton
split-KV kernel. Nothing here synchronises with the host.
"""

from typing import Optional

import torch

from lorax_server.kernels.paged_attention import paged_decode_attention, write_kv
from lorax_server.kernels.prefill_attention import varlen_prefill_attention
from lorax_server.utils.attention.common import Seqlen

__all__ = ["prefill_attention", "paged_attention", "write_kv"]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_s: int,
                      scale: float, window: Optional[int]) -> torch.Tensor:
    """Causal attention of each packed sequence over its own tokens: q [T, H, D], k/v [T, KVH, D]."""
    return varlen_prefill_attention(q, k, v, cu_seqlens, max_s, scale, window)


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                    seqlen: Seqlen, scale: float, window: Optional[int], key: Optional[torch.Tensor] = None,
                    value: Optional[torch.Tensor] = None, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
    """New tokens q [T, H, D] over their sequence's cache (decode, or prefill on a cached prefix).

    Without key/value the new tokens' keys are read from the cache, so all of them must have been written;
    with key/value [T, KVH, D] (the packed new tokens) only the prefix is read from the cache, which is what
    a sliding window that caches only each prompt's last W tokens needs. Decode (max_q == 1) always reads
    the cache. An FP8 cache's entries are read as entry * k_scale / entry * v_scale.
    """
    if seqlen.max_q != 1:
        return varlen_prefill_attention(q, key, value, seqlen.cu_seqlen_q, seqlen.max_q, scale, window,
                                        cache_lengths=seqlen.cache_lengths, key_cache=key_cache,
                                        value_cache=value_cache, block_tables=block_tables, max_k=seqlen.max_k,
                                        max_cached=seqlen.max_cached, k_scale=k_scale, v_scale=v_scale,
                                        min_q=seqlen.min_q)
    lengths = seqlen.total_lengths.to(torch.int32)
    return paged_decode_attention(q, key_cache, value_cache, block_tables, lengths, seqlen.max_k, scale, window,
                                  k_scale=k_scale, v_scale=v_scale)
