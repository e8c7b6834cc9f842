"""Block manager of the paged KV cache: a free list of fixed-size blocks.

A request reserves all the blocks it can ever use (prompt + max_new_tokens, capped at session_len) when it
is admitted, so a running request never waits for memory; requests that do not fit wait in the queue.
"""
from __future__ import annotations


def blocks_for(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the KV cache needs at least one block")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, n_tokens: int) -> bool:
        return blocks_for(n_tokens, self.block_size) <= len(self._free)

    def allocate(self, n_tokens: int) -> list[int]:
        n = blocks_for(n_tokens, self.block_size)
        if n > len(self._free):
            raise RuntimeError(f"need {n} KV blocks for {n_tokens} tokens, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()
