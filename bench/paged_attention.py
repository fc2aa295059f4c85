"""Paged decode attention bandwidth: Mixtral heads (32 query / 8 KV, head 128), bf16, block size 16.

Bytes = the keys and values each sequence attends to (read once) + q and out; percent of the measured
copy bandwidth. Anchor: SDPA over the same keys stored contiguously (no paging) at batch 1 and 32.

    python -m bench.paged_attention
"""

import torch
import torch.nn.functional as F

from bench.common import card, copy_bandwidth, print_table, time_graph_ms
from lorax_server.kernels.paged_attention import paged_decode_attention

H, KVH, D, BS = 32, 8, 128, 16


def problem(batch, context):
    blocks_per_seq = context // BS
    num_blocks = batch * blocks_per_seq
    key_cache = torch.randn(num_blocks, BS, KVH, D, device="cuda").bfloat16()
    value_cache = torch.randn_like(key_cache)
    tables = torch.randperm(num_blocks, device="cuda").view(batch, blocks_per_seq).int()
    lengths = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, H, D, device="cuda").bfloat16()
    return q, key_cache, value_cache, tables, lengths


def main():
    bandwidth = copy_bandwidth()
    rows = []
    for batch in (1, 32, 128):
        for context in (512, 2048, 4096, 8192):
            if batch * context * KVH * D * 4 > 20e9:
                continue
            q, kc, vc, tables, lengths = problem(batch, context)
            ms = time_graph_ms(lambda: paged_decode_attention(q, kc, vc, tables, lengths, context, D**-0.5, None))
            bytes_moved = 2 * batch * context * KVH * D * 2 + 2 * q.numel() * 2
            anchor = "-"
            if batch <= 32:
                k = torch.randn(batch, KVH, context, D, device="cuda").bfloat16()
                v = torch.randn_like(k)
                qs = q.unsqueeze(2)
                sdpa = time_graph_ms(lambda: F.scaled_dot_product_attention(qs, k, v, scale=D**-0.5, enable_gqa=True))
                anchor = f"{sdpa:.3f} ({100 * bytes_moved / (sdpa * 1e-3) / bandwidth:.0f}%)"
            achieved = bytes_moved / (ms * 1e-3)
            rows.append([str(batch), str(context), f"{ms:.3f}", f"{achieved / 1e12:.2f}",
                         f"{100 * achieved / bandwidth:.0f}%", anchor])
    print_table(f"Paged decode attention, bf16, 32/8 heads x 128, block 16, {card()}: copy {bandwidth / 1e12:.2f} TB/s; "
                "CUDA-graph replays",
                ["batch", "context", "ms", "TB/s", "of copy bw", "SDPA contiguous ms (of bw)"], rows)


if __name__ == "__main__":
    main()
