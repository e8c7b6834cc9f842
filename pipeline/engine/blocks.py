"""Block manager of the paged KV cache: reference-counted fixed-size blocks, with automatic prefix caching.

A request reserves all the blocks it can ever use (prompt + max_new_tokens, capped at session_len) when it
is admitted, so a running request never waits for memory; requests that do not fit wait in the queue.

Prefix caching (prefix_caching=True): a full block whose K/V rows are all written can be registered under the
hash of its token prefix (chained: hash(parent block's hash, this block's token ids)), so a later prompt that
starts with the same tokens reuses it instead of computing it again. Blocks are reference counted: a block
shared by several sequences is written by none of them (only full prompt blocks are shared, and a sequence
writes only past its cached prefix). A registered block whose last reference goes keeps its content and hash
in an LRU of evictable blocks; allocation takes plain free blocks first and then evicts the least recently
used cached block (its hash dropped); a cache hit takes an evictable block back out of the LRU. A block that
is still referenced is never handed out again. `free_blocks` counts what can be allocated: free + evictable.

Reuse is valid for every KV kind (fp16, int8, int4; static scales, or dynamic per-token scales kept per slot
in the cache's side tensors): a block's rows (and their scales) are a function of the tokens and positions up
to its end only, and the same prefix at the same positions writes the same rows.

Usage:
    bm = BlockManager(num_blocks=64, block_size=16, prefix_caching=True)
    hashes = bm.prefix_hashes(prompt)                  # one per full block of the prompt
    hit = bm.lookup(hashes[:(len(prompt) - 1) // 16])  # blocks of the longest cached prefix (maybe [])
    if bm.can_allocate(n_tokens, hit):
        blocks = bm.allocate(n_tokens, hit)            # the hit blocks (shared) + fresh ones for the rest
    bm.register(blocks[i], hashes[i])                  # once every KV row of block i is written
    bm.free(blocks)                                    # reference counts - 1; cached blocks -> the LRU
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Sequence


def blocks_for(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash of a block's token prefix: 16-byte blake2b of (the parent block's hash, this block's token ids).

    Not Python's hash() of tuples: that is 64 bits and not collision resistant (a crafted prompt could collide
    with another request's prefix and be served its KV); blake2b costs ~1 us a block and is stable across
    processes."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the KV cache needs at least one block")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, bool(prefix_caching)
        self._free = list(range(num_blocks - 1, -1, -1))   # unreferenced, no hash; allocated from the end
        self._ref = [0] * num_blocks                        # sequences holding each block
        self._hash: dict[int, bytes] = {}                   # registered block -> its prefix hash
        self._by_hash: dict[bytes, int] = {}                # prefix hash -> block
        self._lru: OrderedDict[int, None] = OrderedDict()   # unreferenced registered blocks, least recent first
        self.evictions = 0

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take: free + cached but unreferenced (evictable)."""
        return len(self._free) + len(self._lru)

    @property
    def cached_blocks(self) -> int:
        """Blocks holding a registered prefix hash (referenced or evictable)."""
        return len(self._by_hash)

    def refcount(self, block: int) -> int:
        return self._ref[block]

    # ------------------------------------------------------------------ prefix cache
    def prefix_hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        """The chained hash of every full block of `token_ids` (len(token_ids) // block_size of them)."""
        B, h, out = self.block_size, b"", []
        for i in range(len(token_ids) // B):
            h = block_hash(h, token_ids[i * B:(i + 1) * B])
            out.append(h)
        return out

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of `hashes` from the first one ([] without prefix caching).
        Changes nothing: pass the result to can_allocate / allocate."""
        if not self.prefix_caching:
            return []
        hit = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def register(self, block: int, h: bytes) -> bool:
        """Cache a referenced block whose KV rows are all written under its prefix hash. False (nothing
        changes) without prefix caching or when another block already holds `h` (the existing one is kept)."""
        if not self.prefix_caching or h in self._by_hash:
            return False
        if self._ref[block] < 1:
            raise ValueError(f"block {block} is not allocated: only a block a sequence holds can be registered")
        if block in self._hash:
            raise ValueError(f"block {block} is already registered under another prefix hash")
        self._hash[block], self._by_hash[h] = h, block
        return True

    # ------------------------------------------------------------------ allocation
    def can_allocate(self, n_tokens: int, cached: Sequence[int] = ()) -> bool:
        """Whether allocate(n_tokens, cached) would succeed: the blocks past the cached ones fit in what is
        left once the cached ones that sit in the LRU are taken out of it."""
        need = blocks_for(n_tokens, self.block_size) - len(cached)
        return need <= self.free_blocks - sum(self._ref[b] == 0 for b in cached)

    def allocate(self, n_tokens: int, cached: Sequence[int] = ()) -> list[int]:
        """Blocks for n_tokens: `cached` (from lookup: shared, reference count + 1) first, then fresh ones."""
        n = blocks_for(n_tokens, self.block_size)
        if len(cached) > n:
            raise ValueError(f"{len(cached)} cached blocks for {n_tokens} tokens ({n} blocks)")
        if any(b not in self._hash for b in cached):
            raise ValueError(f"cached blocks {list(cached)} are not all registered (evicted since lookup?)")
        if not self.can_allocate(n_tokens, cached):
            raise RuntimeError(f"need {n - len(cached)} KV blocks for {n_tokens} tokens ({len(cached)} cached), "
                               f"{self.free_blocks} free")
        for b in cached:
            if self._ref[b] == 0:
                del self._lru[b]
            self._ref[b] += 1
        return list(cached) + [self._take() for _ in range(n - len(cached))]

    def _take(self) -> int:
        """A fresh block: a plain free one, else the least recently used cached one (evicted: hash dropped)."""
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._lru.popitem(last=False)
            del self._by_hash[self._hash.pop(b)]
            self.evictions += 1
        self._ref[b] = 1
        return b

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block (and clear the list). Unreferenced blocks go back last first:
        plain ones to the free list, cached ones to the LRU's recent end, so a sequence's tail blocks are
        evicted before its head blocks (the ones other prompts share)."""
        for b in reversed(blocks):
            if self._ref[b] < 1:
                raise ValueError(f"block {b} freed more times than it was allocated")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash:
                    self._lru[b] = None
                else:
                    self._free.append(b)
        blocks.clear()
