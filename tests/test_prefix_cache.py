"""Automatic prefix caching: the block manager's hashes, reference counts and LRU, and the engine's reuse of
cached prompt blocks (same greedy tokens as without it, for fp16 and int8 KV, under eviction; fewer blocks;
stats counters). CPU, a tiny random model (test_engine's), 16-token blocks."""
from __future__ import annotations

import random

import pytest
import torch

from pipeline.engine import Engine, SamplingParams
from pipeline.engine.blocks import BlockManager, block_hash
from pipeline.models.sources import save_byte_tokenizer, synthetic_tensors
from pipeline.workspace import write_workspace

from test_engine import ARGS, kv_params

B = 16
PREFIX = [(7 * i + 3) % ARGS.vocab_size for i in range(50)]   # 3 full blocks + 2 tokens


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """An fp16 workspace with static KV qparams (quant_policy 4 overrides: static int8 KV)."""
    root = tmp_path_factory.mktemp("prefix")
    save_byte_tokenizer(root / "tok", ARGS.vocab_size)
    write_workspace(root / "fp16", ARGS, synthetic_tensors(ARGS, 0, torch.float32), root / "tok",
                    kv_qparams=kv_params(), kv_bits=None)
    return root / "fp16"


def engine(ws, **overrides) -> Engine:
    return Engine.from_workspace(ws, "cpu", {"session_len": 256, "cache_block_seq_len": B, **overrides})


# ------------------------------------------------------------------ BlockManager
def test_hashes_are_chained_and_lookup_finds_the_longest_cached_run():
    bm = BlockManager(8, 4, prefix_caching=True)
    a, b = list(range(10)), list(range(8)) + [99, 98, 97, 96]
    ha, hb = bm.prefix_hashes(a), bm.prefix_hashes(b)
    assert len(ha) == 2 and len(hb) == 3                   # full blocks only
    assert ha == hb[:2] and ha[1] == block_hash(ha[0], range(4, 8))
    assert bm.prefix_hashes([4, 5, 6, 7]) != [ha[1]]        # same tokens, other parent: another hash
    assert bm.lookup(ha) == []
    blocks = bm.allocate(10)
    assert [bm.register(blk, h) for blk, h in zip(blocks, ha)] == [True, True]
    assert bm.lookup(hb) == blocks[:2] and bm.cached_blocks == 2
    assert bm.lookup(bm.prefix_hashes([4, 5, 6, 7])) == []   # block 1's tokens without block 0 before them
    other = bm.allocate(4)
    assert bm.register(other[0], ha[0]) is False            # hash already held: the first block keeps it
    assert bm.lookup(ha) == blocks[:2]
    with pytest.raises(ValueError, match="already registered"):
        bm.register(blocks[0], hb[2])
    free = BlockManager(8, 4, prefix_caching=True)
    with pytest.raises(ValueError, match="not allocated"):
        free.register(3, ha[0])
    plain = BlockManager(8, 4)                              # without caching: nothing registers or hits
    x = plain.allocate(8)
    assert plain.register(x[0], ha[0]) is False and plain.lookup(ha) == [] and plain.cached_blocks == 0


def test_refcounts_lru_eviction_order_and_free_accounting():
    bm = BlockManager(6, 4, prefix_caching=True)
    s1 = bm.allocate(12)                                     # 3 blocks
    hs = bm.prefix_hashes(list(range(12)))
    for blk, h in zip(s1, hs):
        bm.register(blk, h)
    s2 = bm.allocate(16, bm.lookup(hs[:2]))                  # shares 2, 2 fresh
    assert s2[:2] == s1[:2] and [bm.refcount(b) for b in s1] == [2, 2, 1]
    assert bm.free_blocks == 1
    keep = list(s1)
    bm.free(s1)
    assert s1 == [] and [bm.refcount(b) for b in keep] == [1, 1, 0] and bm.free_blocks == 2   # keep[2] evictable
    bm.free(s2)                                              # s2's two fresh blocks: plain free; keep[:2]: LRU
    assert bm.free_blocks == 6 and bm.cached_blocks == 3
    assert list(bm._lru) == [keep[2], keep[1], keep[0]]      # tail blocks first: evicted before the head
    # a hit takes an evictable block out of the LRU; can_allocate counts that
    hit = bm.lookup(hs)
    assert hit == keep and bm.can_allocate(24, hit) and not bm.can_allocate(28, hit)
    t = bm.allocate(12, hit[:1])                             # keep[0] back in use + 2 fresh (plain free first)
    assert t[0] == keep[0] and bm.evictions == 0 and bm.free_blocks == 3
    u = bm.allocate(12)                                      # 1 plain + evicts keep[2], then keep[1] (LRU order)
    assert u[1:] == [keep[2], keep[1]] and bm.evictions == 2 and bm.cached_blocks == 1
    assert bm.lookup(hs) == [keep[0]] and bm.free_blocks == 0
    with pytest.raises(RuntimeError, match="need 1 KV blocks"):
        bm.allocate(1)
    with pytest.raises(ValueError, match="freed more times"):
        bm.free([u[0], u[0]])


def test_no_referenced_block_is_ever_reallocated():
    """Random admissions (with hits) and frees over a small cache: fresh blocks are never held by anyone."""
    rng = random.Random(0)
    bm = BlockManager(12, 4, prefix_caching=True)
    prompts = [[rng.randrange(3) for _ in range(rng.randrange(1, 30))] for _ in range(8)]
    live, held = [], {}
    for _ in range(400):
        if live and (rng.random() < 0.45 or not bm.can_allocate(32)):
            blocks, _ = live.pop(rng.randrange(len(live)))
            for b in blocks:
                held[b] -= 1
            bm.free(blocks)
        else:
            p = rng.choice(prompts)
            hs = bm.prefix_hashes(p)
            hit = bm.lookup(hs[:(len(p) - 1) // 4])
            n = len(p) + rng.randrange(8)
            if not bm.can_allocate(n, hit):
                continue
            blocks = bm.allocate(n, hit)
            fresh = blocks[len(hit):]
            assert not any(held.get(b, 0) for b in fresh), "a referenced block was handed out again"
            assert len(set(blocks)) == len(blocks)
            for b in blocks:
                held[b] = held.get(b, 0) + 1
            for i in range(len(hit), len(hs)):
                bm.register(blocks[i], hs[i])
            live.append((blocks, p))
        assert all(bm.refcount(b) == held.get(b, 0) for b in range(12))
        assert bm.free_blocks == sum(held.get(b, 0) == 0 for b in range(12))
    assert bm.evictions > 0


# ------------------------------------------------------------------ engine
def run(eng, prompts, n=12):
    """Greedy tokens of each prompt, submitted one after the other (each finishes before the next joins)."""
    return [eng.generate([p], SamplingParams(max_new_tokens=n, ignore_eos=True))[0] for p in prompts]


PROMPTS = [PREFIX + [200, 201, 202], PREFIX + list(range(210, 240)), PREFIX[:48], PREFIX[:33] + [5, 9],
           PREFIX + [200, 201, 202, 203, 204], PREFIX[:17], PREFIX]


@pytest.mark.parametrize("overrides", [{}, {"quant_policy": 4}, {"quant_policy": 4, "kv_mode": "dynamic"}],
                         ids=["fp16", "int8-static", "int8-dynamic"])
def test_greedy_same_with_and_without_prefix_caching(ws, overrides):
    off = engine(ws, prefix_caching=False, **overrides)
    on = engine(ws, max_prefill_tokens=24, **overrides)     # chunks that end mid-block, registered over steps
    assert on.blocks.prefix_caching and not off.blocks.prefix_caching
    want = run(off, PROMPTS)
    assert run(on, PROMPTS) == want
    pc = on.stats()["prefix_cache"]
    # reused: 48 of the 2nd, 32 of the 3rd (48 tokens: the last block is recomputed), 32, 48, 16, 48
    assert pc["hits"] == 48 + 32 + 32 + 48 + 16 + 48 and pc["queries"] == sum(map(len, PROMPTS))
    assert on.stats()["steps"]["prefill_tokens"] == pc["queries"] - pc["hits"]   # reused tokens: not computed
    # the same prompts batched together (all join in one step: only what the sequential runs cached hits)
    assert on.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True)) == want
    assert on.stats()["free_blocks"] == on.stats()["total_blocks"]


@pytest.mark.parametrize("overrides", [{}, {"quant_policy": 4}], ids=["fp16", "int8-static"])
def test_greedy_same_when_a_small_cache_evicts(ws, overrides):
    """8 blocks, each request reserves 4 or 5: cached prefixes are evicted (least recently used first) and
    recomputed, partly hit again, tokens unchanged."""
    b, c = [9] * 40, list(range(100, 140))
    prompts = [PREFIX + [1, 2], b + [3], c + [4], PREFIX + [5], b + [6], c + [7], PREFIX + [8]]
    want = run(engine(ws, prefix_caching=False, **overrides), prompts, n=20)
    on = engine(ws, num_blocks=8, **overrides)
    assert run(on, prompts, n=20) == want
    assert on.blocks.evictions == 5 and on.stats()["prefix_cache"]["hits"] == (2 + 1 + 1 + 2) * B
    assert on.stats()["free_blocks"] == 8


def test_shared_prefix_allocates_fewer_blocks(ws):
    """Two running requests with a 48-token common prefix hold 3 blocks fewer than two unrelated ones."""
    def used_by_two(eng, first, second):
        h1 = eng.submit(first, SamplingParams(max_new_tokens=40, ignore_eos=True))
        eng.step()                                          # admitted and prefilled: its prompt blocks cached
        h2 = eng.submit(second, SamplingParams(max_new_tokens=40, ignore_eos=True))
        eng.step()
        st = eng.stats()
        assert st["running"] == 2
        for h in (h1, h2):
            h.cancel()
        eng.step()
        return st["total_blocks"] - st["free_blocks"]
    eng = engine(ws)
    other = [11] * 50 + [1, 2]
    unrelated = used_by_two(eng, PREFIX + [1, 2], other)
    shared = used_by_two(eng, PREFIX + [3, 4, 5], PREFIX + [6])
    assert unrelated == 2 * 6 and shared == 2 * 6 - 3       # ceil((52 + 40) / 16) = 6 blocks a request
    assert engine(ws, prefix_caching=False).blocks.prefix_caching is False
    assert used_by_two(engine(ws, prefix_caching=False), PREFIX + [3, 4, 5], PREFIX + [6]) == 12
    assert eng.stats()["free_blocks"] == eng.stats()["total_blocks"]


def test_stats_counters(ws):
    eng = engine(ws)
    pc = eng.stats()["prefix_cache"]
    assert pc == dict(enabled=True, queries=0, hits=0, hit_rate=0.0, cached_blocks=0, evictions=0)
    run(eng, [PREFIX, PREFIX + [1], PREFIX[:20]], n=4)
    pc = eng.stats()["prefix_cache"]
    assert pc["queries"] == 50 + 51 + 20 and pc["hits"] == 48 + 16
    assert pc["hit_rate"] == pytest.approx(64 / 121) and pc["cached_blocks"] == 3 and pc["enabled"] is True
    off = engine(ws, prefix_caching=False)
    run(off, [PREFIX, PREFIX], n=2)
    assert off.stats()["prefix_cache"] == dict(enabled=False, queries=0, hits=0, hit_rate=0.0, cached_blocks=0,
                                               evictions=0)
