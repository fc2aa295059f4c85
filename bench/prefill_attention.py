"""Prefill attention: the one-launch varlen Triton kernel against SDPA, Mixtral heads (32 query / 8 KV, head 128), bf16.

Cases: 1 x 4096, 16 x 512 and 64 x 128 new tokens with no prefix, and 64 x 128 new tokens on 2000 cached
ones each (block size 16, blocks scattered). FLOPs count the (query, key) pairs that causality lets through,
4 * D per pair per head, the same for every column. Columns: the kernel; the path it replaced (one SDPA call
per sequence after a host sync for fresh prefill, the pure-torch reference for a prefill on a prefix); and one
SDPA call over the same batch stored dense with K/V already repeated to 32 heads (its FLOP rate is the anchor:
equal lengths, no paging, no GQA). CUDA events, warm-up, medians.

    python -m bench.prefill_attention           # the kernel's own tile choice
    python -m bench.prefill_attention --tune    # also sweeps TILE_CANDIDATES and times the best of them
"""

import argparse
import os

import torch
import torch.nn.functional as F

from bench.common import card, print_table, time_ms
from lorax_server.kernels.prefill_attention import (TILE_CANDIDATES, choose_tile, packs_heads,
                                                      varlen_prefill_attention)
from lorax_server.layers.attention import reference
from lorax_server.utils.attention.common import Seqlen

H, KVH, D, BS = 32, 8, 128, 16
SCALE = D**-0.5
CASES = (("1 x 4096", 1, 4096, 0), ("16 x 512", 16, 512, 0), ("64 x 128", 64, 128, 0),
         ("64 x (2000 + 128)", 64, 128, 2000),
         ("1 x (16000 + 96)", 1, 96, 16000),  # a chunk of a long prompt (chunked prefill)
         ("32 x (600 + 1)", 32, 1, 600))  # decodes beside a chunk (their own launch)


class Case:
    """`batch` sequences of `new` tokens each on `cached` tokens in the paged cache (none when 0)."""

    def __init__(self, name, batch, new, cached):
        self.name, self.batch, self.new, self.cached = name, batch, new, cached
        T = batch * new
        self.q = torch.randn(T, H, D, device="cuda").bfloat16()
        self.k, self.v = (torch.randn(T, KVH, D, device="cuda").bfloat16() for _ in range(2))
        lengths = torch.full((batch,), new, dtype=torch.int32, device="cuda")
        self.seqlen = Seqlen(lengths, torch.full_like(lengths, cached))
        pairs = new * cached + new * (new + 1) // 2
        self.flops = 4 * D * H * batch * pairs
        if cached:
            blocks = -(-(cached + new) // BS)
            self.cache = [torch.randn(batch * blocks, BS, KVH, D, device="cuda").bfloat16() for _ in range(2)]
            self.tables = torch.randperm(batch * blocks, device="cuda").view(batch, blocks).int()

    def kernel(self, tile=None):
        s = self.seqlen
        if not self.cached:
            return lambda: varlen_prefill_attention(self.q, self.k, self.v, s.cu_seqlen_q, s.max_q, SCALE, tile=tile)
        # max_cached and min_q as the engine passes them (Seqlen): split-KV over a long prefix is chosen from it
        return lambda: varlen_prefill_attention(self.q, self.k, self.v, s.cu_seqlen_q, s.max_q, SCALE, None,
                                                s.cache_lengths, *self.cache, self.tables, s.max_k, tile=tile,
                                                max_cached=self.cached, min_q=self.new)

    def replaced(self):
        """The path the kernel replaced: SDPA per sequence (fresh) or the pure-torch reference (prefix)."""
        if self.cached:
            return lambda: reference.paged_attention(self.q, *self.cache, self.tables, self.seqlen, SCALE, None)
        return lambda: sdpa_per_sequence(self.q, self.k, self.v, self.seqlen.cu_seqlen_q)

    def one_sdpa_call(self):
        """SDPA over [B, H, L, D] dense tensors with K/V repeated to H heads (built outside the timing)."""
        L = self.cached + self.new
        q = torch.randn(self.batch, H, self.new, D, device="cuda").bfloat16()
        k, v = (torch.randn(self.batch, H, L, D, device="cuda").bfloat16() for _ in range(2))
        if not self.cached:
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(self.new, L)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=SCALE)


def sdpa_per_sequence(q, k, v, cu_seqlens):
    """What `cuda.prefill_attention` did before the kernel: one causal SDPA call per packed sequence."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=SCALE, enable_gqa=True)[0] \
            .transpose(0, 1)
    return out


def time_or_nan(make, repeat=30):
    """time_ms of the function `make()` builds; NaN (with the reason printed) where it cannot run."""
    try:
        return time_ms(make(), repeat=repeat)
    except Exception as e:  # e.g. a tile too large for shared memory, an SDPA variant this build lacks
        print(f"  not timed: {type(e).__name__}: {str(e)[:160]}")
        return float("nan")


def label(tile) -> str:
    return " ".join(map(str, tile[:4])) + (" one-loop" if tile.one_loop else "")


def tflops(case, ms):
    return case.flops / (ms * 1e-3) / 1e12


def sweep(cases):
    """Times every candidate tile on every case; returns the tile with the best geometric-mean time."""
    rows, best, best_score = [], None, float("inf")
    for tile in TILE_CANDIDATES:
        times = []
        for case in cases:
            times.append(time_or_nan(lambda: case.kernel(tile)))
        score = torch.tensor(times).log().mean().exp().item()
        if score < best_score:  # NaN (a case that did not run) never wins
            best, best_score = tile, score
        rows.append([label(tile)] + [f"{ms:.3f} ({tflops(c, ms):.0f})" for c, ms in zip(cases, times)])
    print_table(f"Tile sweep (BLOCK_M BLOCK_N warps stages), ms (TFLOP/s), {card()}",
                ["tile"] + [c.name for c in cases], rows)
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", action="store_true", help="sweep TILE_CANDIDATES first")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = [Case(*spec) for spec in CASES]
    tiles = {"chosen": None}
    if args.tune:
        tiles["best of sweep"] = sweep(cases)
    baselines = {case.name: (time_or_nan(case.replaced, repeat=10), time_or_nan(case.one_sdpa_call)) for case in cases}
    for name, tile in [*tiles.items(), ("chosen, query heads unpacked", "unpacked")]:
        os.environ["LORAX_PREFILL_PACK_GQA"] = "0" if tile == "unpacked" else "1"
        tile = None if tile == "unpacked" else tile
        rows = []
        for case in cases:
            pack = 4 if packs_heads(4, bool(case.cached), case.new, tile) else 1  # 32 / 8 heads
            used = tile or choose_tile(D, torch.bfloat16, case.new * pack, case.seqlen.max_k if case.cached else None)
            ms = time_ms(case.kernel(tile))
            old, sdpa = baselines[case.name]
            rows.append([case.name, label(used), f"{ms:.3f}", f"{tflops(case, ms):.0f}",
                         f"{old:.3f} ({old / ms:.1f}x)", f"{sdpa:.3f} ({tflops(case, sdpa):.0f})"])
        print_table(f"Prefill attention, bf16, 32/8 heads x 128, {card()}, tile {name}",
                    ["case", "tile", "kernel ms", "TFLOP/s", "replaced path ms (kernel speed-up)",
                     "one SDPA call ms (TFLOP/s)"], rows)


if __name__ == "__main__":
    main()
