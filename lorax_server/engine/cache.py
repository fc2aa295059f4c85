"""The paged KV cache: blocks of key/value slots, a free list, and the sequences that own blocks.

A sequence owns a list of cache blocks; its token at position p lives in slot
`blocks[p // block_size] * block_size + p % block_size` (`engine.runner.pack` computes the slots and
block tables of a forward pass from them).
"""

import random
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch



class CacheFull(RuntimeError):
    """Not enough free blocks for a request: the request is refused, nothing else is touched."""


class BlockInUse(ValueError):
    """Blocks named by the router that this server already gave to another request."""


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
        self.free_blocks = [b for b in range(num_blocks) if b not in self.reserved]
        if shuffle_seed is not None:
            # Tests hand out blocks in a scrambled order so no kernel can rely on contiguity.
            random.Random(shuffle_seed).shuffle(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, num_blocks: int) -> List[int]:
        if num_blocks > len(self.free_blocks):
            raise CacheFull(f"needs {num_blocks} cache blocks, {len(self.free_blocks)} free of {self.num_blocks}")
        taken, self.free_blocks = self.free_blocks[:num_blocks], self.free_blocks[num_blocks:]
        return taken

    @property
    def all_free(self) -> bool:
        """Whether every block is back (no request holds any)."""
        return len(self.free_blocks) + len(self.reserved_free) == self.num_blocks

    def claim(self, blocks: Sequence[int]) -> List[int]:
        """Takes these particular blocks (allocated by the router) out of the free list."""
        free = set(self.free_blocks) | self.reserved_free
        taken = [b for b in blocks if b not in free]
        if taken or len(set(blocks)) != len(blocks):
            raise BlockInUse(f"blocks {taken or list(blocks)} are out of range, repeated or already in use")
        claimed = set(blocks)
        self.free_blocks = [b for b in self.free_blocks if b not in claimed]
        self.reserved_free -= claimed
        return list(blocks)

    def free(self, blocks: Sequence[int]) -> None:
        self.free_blocks.extend(b for b in blocks if b not in self.reserved)
        self.reserved_free.update(b for b in blocks if b in self.reserved)


@dataclass
class PagedSequence:
    """A sequence's tokens, how many of them are already in the cache, and the blocks it owns."""

    tokens: List[int]
    adapter_index: int = 0
    cached: int = 0
    blocks: List[int] = field(default_factory=list)

    def reserve(self, cache: PagedKVCache, total_tokens: int) -> None:
        """Grows the block list so that `total_tokens` fit."""
        missing = cache.blocks_for(total_tokens) - len(self.blocks)
        if missing > 0:
            self.blocks.extend(cache.allocate(missing))
