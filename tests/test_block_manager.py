"""Block manager: reference counts, prefix hashes, LRU eviction of cached blocks, consistency checks."""

from __future__ import annotations

import random

import pytest
from helpers import fresh_seed

from deepseek_mcp.inference.engine.block_manager import BlockManager, block_hash, chain_block_hashes


def test_allocate_free_refcounts() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = bm.allocate(3)
    assert len(set(a)) == 3 and bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    assert all(bm.blocks[b].ref_count == 1 for b in a)
    bm.check()
    bm.free(a)
    bm.check(idle=True)
    with pytest.raises(RuntimeError, match="double free of block"):
        bm.free([a[0]])
    with pytest.raises(RuntimeError, match="out of cache blocks: need 9, 8 free"):
        bm.allocate(9)
    bm.check(idle=True)


def test_chained_hash_depends_on_whole_prefix() -> None:
    rng = random.Random(0)
    block = [rng.randrange(1000) for _ in range(4)]
    h1 = block_hash(None, [1, 2, 3, 4])
    assert block_hash(h1, block) != block_hash(None, block)
    assert block_hash(h1, block) == block_hash(block_hash(None, [1, 2, 3, 4]), list(block))
    tokens = [rng.randrange(1000) for _ in range(11)]
    hashes = chain_block_hashes(tokens, 4)
    assert len(hashes) == 2  # only full blocks
    assert hashes[1] == block_hash(hashes[0], tokens[4:8])
    known = hashes[:1]
    assert chain_block_hashes(tokens, 4, known) is known and known == hashes
    # the same content at a different place in the sequence hashes differently
    assert chain_block_hashes([5, 5, 5, 5, 5, 5, 5, 5], 4)[0] != chain_block_hashes([5, 5, 5, 5, 5, 5, 5, 5], 4)[1]


def test_register_match_acquire_and_shared_refcounts() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    tokens = [7, 8, 9, 10, 11]
    hashes = chain_block_hashes(tokens, 2)
    table = bm.allocate(3)
    for b, h in zip(table, hashes, strict=False):
        assert bm.register(b, h)
    assert bm.match_prefix(hashes) == table[:2]
    assert bm.match_prefix([block_hash(None, [0, 0])] + hashes[1:]) == []  # a miss stops the match
    bm.acquire(table[:2])  # a second sequence shares the two full blocks
    assert [bm.blocks[b].ref_count for b in table] == [2, 2, 1]
    other = bm.allocate(1)
    # a duplicate of cached content is not indexed twice
    assert not bm.register(other[0], hashes[0])
    assert bm.blocks[other[0]].hash is None
    bm.check()
    bm.free(table)
    assert [bm.blocks[b].ref_count for b in table] == [1, 1, 0]
    assert bm.num_cached_blocks == 2
    bm.free(table[:2] + other)
    bm.check(idle=True)
    # unreferenced cached blocks stay findable and can be taken back
    assert bm.match_prefix(hashes) == table[:2]
    assert bm.num_evictable_in(table[:2] + other) == 2
    bm.acquire(table[:2])
    bm.check()
    bm.free(table[:2])
    bm.check(idle=True)
    with pytest.raises(RuntimeError, match="is not a cached block"):
        bm.acquire([other[0]])


def test_lru_eviction_order() -> None:
    bm = BlockManager(num_blocks=6, block_size=1)
    seq_a, seq_b = bm.allocate(2), bm.allocate(2)
    ha, hb = chain_block_hashes([1, 2], 1), chain_block_hashes([3, 4], 1)
    for b, h in zip(seq_a + seq_b, ha + hb, strict=True):
        bm.register(b, h)
    bm.free(seq_a)  # A finishes first: its blocks are the oldest; its tail block goes before its head
    bm.free(seq_b)
    bm.check(idle=True)
    assert bm.num_cached_blocks == 4
    fresh = bm.allocate(2)  # the two never-used blocks come first, no eviction
    assert bm.num_evictions == 0 and bm.num_cached_blocks == 4
    evicted_first = bm.allocate(1)
    assert evicted_first == [seq_a[1]] and bm.match_prefix(ha) == [seq_a[0]]
    evicted_next = bm.allocate(1)
    assert evicted_next == [seq_a[0]] and bm.match_prefix(ha) == []
    assert bm.match_prefix(hb) == seq_b  # B, used more recently, is still cached
    # touching B's head again makes it the most recently used
    bm.acquire([seq_b[0]])
    bm.free([seq_b[0]])
    assert bm.allocate(1) == [seq_b[1]]
    assert bm.num_evictions == 3
    bm.free(fresh + evicted_first + evicted_next + [seq_b[1]])
    bm.check(idle=True)
    assert bm.reset_prefix_cache() == 1 and bm.num_cached_blocks == 0
    bm.check(idle=True)


def test_random_operations_keep_invariants() -> None:
    rng = random.Random(fresh_seed())
    bm = BlockManager(num_blocks=16, block_size=2)
    tables: list[list[int]] = []
    for step in range(400):
        op = rng.random()
        if op < 0.4 and bm.num_free_blocks:
            n = rng.randint(1, min(3, bm.num_free_blocks))
            table = bm.allocate(n)
            tokens = [rng.randrange(3) for _ in range(2 * n)]
            for b, h in zip(table, chain_block_hashes(tokens, 2), strict=True):
                bm.register(b, h)
            tables.append(table)
        elif op < 0.6 and tables:
            hit = bm.match_prefix(chain_block_hashes([rng.randrange(3) for _ in range(4)], 2))
            if bm.num_evictable_in(hit) <= bm.num_free_blocks:
                bm.acquire(hit)
                tables.append(hit)
        elif tables:
            bm.free(tables.pop(rng.randrange(len(tables))))
        bm.check()
        refs = [0] * bm.num_blocks
        for t in tables:
            for b in t:
                refs[b] += 1
        assert refs == [blk.ref_count for blk in bm.blocks], f"step {step}"
    for t in tables:
        bm.free(t)
    bm.check(idle=True)


def test_bad_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="num_blocks > 0"):
        BlockManager(0, 16)
