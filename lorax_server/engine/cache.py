"""The paged KV cache: blocks of key/value slots, reference counts, a free list, and the sequences that own blocks.

A sequence owns a list of cache blocks; its token at position p lives in slot
`blocks[p // block_size] * block_size + p % block_size` (`engine.runner.pack` computes the slots and
block tables of a forward pass from them).

Blocks are shared by reference count: with prefix caching (LoRAX's router `--prefix-caching`) the router hands
several live requests the same blocks for a common prompt prefix, and a block goes back to the free list only
when the last request holding it lets go. The cache also remembers, per block, which tokens were last written
there in full (`contents`, a hash chain over the blocks of a prompt): a prefix the router says is cached is
only skipped where the blocks really hold it (a request refused before its prefill never wrote its blocks,
though the router's prefix trie takes them as cached when it frees them).
"""

import itertools
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch


class CacheFull(RuntimeError):
    """Not enough free blocks for a request: the request is refused, nothing else is touched."""


class BlockInUse(ValueError):
    """Blocks named by the router that this server already gave to another request."""


def block_hashes(tokens: Sequence[int], adapter_index: int, block_size: int, num_blocks: int,
                 known: Sequence[int] = ()) -> List[int]:
    """The hash of each of the first `num_blocks` full blocks of `tokens`: block i's hash covers every token
    up to the end of block i and the adapter (whose LoRA changes K/V), as the router's prefix trie keys them.
    `known`: the hashes of the first blocks, computed before from the same tokens (a sequence only grows)."""
    hashes = list(known[:num_blocks])
    previous = hashes[-1] if hashes else hash(("adapter", adapter_index))
    for i in range(len(hashes), num_blocks):
        previous = hash((previous, tuple(tokens[i * block_size:(i + 1) * block_size])))
        hashes.append(previous)
    return hashes


class PagedKVCache:
    """One (key, value) pair per layer, each [num_blocks, block_size, kv_heads, head_dim], and a free list.

    `reserved` blocks are never handed out by `allocate`; only a request that names them (`claim`) gets
    them. LoRAX's router keeps block 0 for its liveness probe, which may arrive while batches are live."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, shuffle_seed: Optional[int] = None, reserved: Sequence[int] = ()):
        if block_size <= 0:
            raise ValueError(f"block_size must be a positive number of tokens, got {block_size}")
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.reserved = {b for b in reserved if b < num_blocks} if len(reserved) < num_blocks else set()
        self.reserved_free = set(self.reserved)
        # An ordered set (a dict's keys): handed out first to last, and a block the router names is taken out
        # in O(1); a list took O(free blocks) per request, seconds per 1000-request batch on a large cache.
        order = [b for b in range(num_blocks) if b not in self.reserved]
        self.refs = [0] * num_blocks  # live requests holding each block
        self.contents: Dict[int, int] = {}  # block -> block_hashes() value of the full block last written there
        if shuffle_seed is not None:
            # Tests hand out blocks in a scrambled order so no kernel can rely on contiguity.
            random.Random(shuffle_seed).shuffle(order)
        self.free_blocks: Dict[int, None] = dict.fromkeys(order)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, num_blocks: int) -> List[int]:
        if num_blocks > len(self.free_blocks):
            raise CacheFull(f"needs {num_blocks} cache blocks, {len(self.free_blocks)} free of {self.num_blocks}")
        taken = list(itertools.islice(self.free_blocks, num_blocks))
        for b in taken:
            del self.free_blocks[b]
            self.refs[b] = 1
            self.contents.pop(b, None)
        return taken

    @property
    def all_free(self) -> bool:
        """Whether every block is back (no request holds any)."""
        return len(self.free_blocks) + len(self.reserved_free) == self.num_blocks

    def claim(self, blocks: Sequence[int], shared: int = 0) -> List[int]:
        """Takes these particular blocks (allocated by the router). The first `shared` may already be held by
        live requests (a cached prefix the router shares between them); every other one must be free."""
        taken = [b for i, b in enumerate(blocks)
                 if not 0 <= b < self.num_blocks or (i >= shared and self.refs[b] > 0)]
        if taken or len(set(blocks)) != len(blocks):
            raise BlockInUse(f"blocks {taken or list(blocks)} are out of range, repeated or already in use")
        newly = {b for b in blocks if self.refs[b] == 0}
        if newly:
            for b in newly:
                self.free_blocks.pop(b, None)
            self.reserved_free -= newly
        for b in blocks:
            self.refs[b] += 1
        return list(blocks)

    def free(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if self.refs[b] <= 0:  # not held: nothing to give back
                continue
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.reserved:
                    self.reserved_free.add(b)
                else:
                    self.free_blocks[b] = None

    # -- what the blocks hold (prefix caching) -------------------------------------------------------

    def cached_prefix(self, seq: "PagedSequence", claimed: int) -> int:
        """How many of the first `claimed` tokens of `seq` its blocks really hold: whole blocks whose last full
        write was these very tokens (under the same adapter), and `claimed` itself when every block it touches
        was such a block."""
        size = self.block_size
        touched = self.blocks_for(claimed)
        whole = min(touched, len(seq.tokens) // size, len(seq.blocks))
        held = 0
        for block, expected in zip(seq.blocks, block_hashes(seq.tokens, seq.adapter_index, size, whole)):
            if self.contents.get(block) != expected:
                break
            held += 1
        return claimed if held == touched else held * size

    def forget(self, blocks: Sequence[int]) -> None:
        """These blocks are about to be written with other tokens: their recorded contents no longer hold."""
        for b in blocks:
            self.contents.pop(b, None)

    def record(self, seq: "PagedSequence", upto: int) -> None:
        """The K/V of `seq`'s tokens [0, upto) are in its blocks: remember every full block of them."""
        full = min(upto // self.block_size, len(seq.blocks))
        if len(seq.hashes) < full:  # only the blocks filled since the last call are hashed (a chunk each step)
            seq.hashes = block_hashes(seq.tokens, seq.adapter_index, self.block_size, full, seq.hashes)
        for block, h in zip(seq.blocks[:full], seq.hashes):
            if block not in self.reserved:
                self.contents[block] = h


@dataclass
class PagedSequence:
    """A sequence's tokens, how many of them are already in the cache, and the blocks it owns."""

    tokens: List[int]
    adapter_index: int = 0
    cached: int = 0
    blocks: List[int] = field(default_factory=list)
    hashes: List[int] = field(default_factory=list)  # `block_hashes` of its full blocks, as far as recorded

    def reserve(self, cache: PagedKVCache, total_tokens: int) -> None:
        """Grows the block list so that `total_tokens` fit."""
        missing = cache.blocks_for(total_tokens) - len(self.blocks)
        if missing > 0:
            self.blocks.extend(cache.allocate(missing))
