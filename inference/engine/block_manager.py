"""Block manager for the paged MLA latent cache, with automatic prefix caching.

Plain Python over block ids; the tensors live in the model runner. The pool holds `num_blocks` blocks of
`block_size` token slots. A block is in exactly one of three states:

- in use: `ref_count > 0`, listed in one or more sequences' block tables;
- cached: `ref_count == 0` but it holds the computed latents of a full block whose content hash is known,
  so a later request with the same prefix can take it back; evicted least-recently-used on demand;
- free: `ref_count == 0`, no content worth keeping.

A full block is identified by a hash chained over every token before it (`block_hash(prev_hash, tokens)`),
so equal hashes mean equal prefixes, never only an equal block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_ROOT_HASH = b""


def block_hash(prev_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Stable 128-bit hash of one full block chained with the hash of the block before it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(prev_hash or _ROOT_HASH)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def chain_block_hashes(
    token_ids: Sequence[int], block_size: int, known: list[bytes] | None = None
) -> list[bytes]:
    """Hashes of every full block of `token_ids`; extends `known` (hashes already computed) in place."""
    hashes = known if known is not None else []
    for i in range(len(hashes), len(token_ids) // block_size):
        prev = hashes[i - 1] if i > 0 else None
        hashes.append(block_hash(prev, token_ids[i * block_size : (i + 1) * block_size]))
    return hashes


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and its latents are computed


class BlockManager:
    """Reference-counted pool of cache blocks with a hash index over full computed blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 with hash, oldest first
        self._hash_to_block: dict[bytes, int] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.num_evictions = 0

    # ---- counters -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that `allocate` can hand out (free plus evictable cached)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a reusable full prefix block (in use or not)."""
        return len(self._hash_to_block)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the pool referenced by live sequences."""
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    # ---- prefix lookup ------------------------------------------------------------------------------
    def match_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Block ids of the longest run of leading full blocks whose hashes are cached (no refs taken)."""
        matched: list[int] = []
        for h in hashes:
            block_id = self._hash_to_block.get(h)
            if block_id is None:
                break
            matched.append(block_id)
        return matched

    def num_evictable_in(self, block_ids: Iterable[int]) -> int:
        """How many of these blocks are evictable (taking them shrinks what `allocate` can give)."""
        return sum(1 for b in block_ids if b in self._evictable)

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_query_tokens += num_query_tokens
        self.prefix_hit_tokens += num_hit_tokens

    # ---- allocation ---------------------------------------------------------------------------------
    def acquire(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on cached blocks (a prefix hit)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.hash is None or self._hash_to_block.get(block.hash) != block_id:
                raise RuntimeError(f"block {block_id} is not a cached block")
            if block.ref_count == 0:
                del self._evictable[block_id]
            block.ref_count += 1

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        """Hand out `num_blocks` empty blocks (ref 1); evicts least-recently-used cached blocks if needed."""
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"out of cache blocks: need {num_blocks}, {self.num_free_blocks} free")
        out: list[int] = []
        for _ in range(num_blocks):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                self._forget(self.blocks[block_id])
                self.num_evictions += 1
            self.blocks[block_id].ref_count = 1
            out.append(block_id)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per block. Done last block first so a sequence's tail is evicted before its
        head: tails are the least likely to be shared."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._evictable[block_id] = None  # newest at the end
                else:
                    self._free.append(block_id)

    def register(self, block_id: int, h: bytes) -> bool:
        """Record that in-use block `block_id` now holds the computed full block with hash `h`.

        Returns False when another block already caches that content (both stay valid; this one is simply
        not indexed and returns to the free pool when released)."""
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"register of unreferenced block {block_id}")
        if block.hash is not None:
            return block.hash == h
        if h in self._hash_to_block:
            return False
        block.hash = h
        self._hash_to_block[h] = block_id
        return True

    def reset_prefix_cache(self) -> int:
        """Drop every unreferenced cached block back to the free pool; returns how many."""
        n = len(self._evictable)
        while self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            self._forget(self.blocks[block_id])
            self._free.append(block_id)
        return n

    def _forget(self, block: Block) -> None:
        if block.hash is not None and self._hash_to_block.get(block.hash) == block.block_id:
            del self._hash_to_block[block.hash]
        block.hash = None

    # ---- consistency --------------------------------------------------------------------------------
    def check(self, *, idle: bool = False) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent; with `idle`, also if any block is still
        referenced (a leak once every sequence is finished)."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "duplicate ids in the free list"
        assert not (free & evictable), f"blocks both free and evictable: {sorted(free & evictable)}"
        for block in self.blocks:
            b = block.block_id
            assert block.ref_count >= 0, f"block {b} has ref_count {block.ref_count}"
            if block.ref_count > 0:
                assert b not in free and b not in evictable, f"in-use block {b} is in a free pool"
            elif block.hash is None:
                assert b in free, f"unreferenced block {b} without hash is not free"
            else:
                assert b in evictable, f"unreferenced cached block {b} is not evictable"
            if block.hash is not None:
                assert self._hash_to_block.get(block.hash) == b, f"block {b} hash not indexed"
        for h, b in self._hash_to_block.items():
            assert self.blocks[b].hash == h, f"index points at block {b} with another hash"
        if idle:
            leaked = [blk.block_id for blk in self.blocks if blk.ref_count != 0]
            assert not leaked, f"blocks still referenced after all sequences ended: {leaked}"
            assert self.num_free_blocks == self.num_blocks
