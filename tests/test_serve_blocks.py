"""Block manager of the paged KV cache (serve/blocks.py): allocation, refs, prefix cache, LRU, stress."""
import numpy as np
import pytest

from serve.blocks import BlockManager


def test_allocation_and_free_restore_counts_and_never_hand_out_the_null_page():
  bm = BlockManager(8, 4)
  assert bm.admit("a", [], 10)  # 3 blocks.
  assert bm.grow("a", 13)  # 4th block.
  assert bm.admit("b", [], 16)
  assert bm.num_used == 8 and bm.num_free == 0
  assert 0 not in bm.table("a") + bm.table("b")
  assert sorted(bm.table("a") + bm.table("b")) == list(range(1, 9))
  assert not bm.grow("a", 17)  # nothing left: refused, nothing changed.
  assert len(bm.table("a")) == 4
  assert not bm.admit("c", [], 1)
  assert "c" not in bm
  bm.check()
  bm.free("a")
  bm.free("a")  # idempotent.
  assert bm.num_free == 4 and bm.num_used == 4
  bm.free("b")
  assert bm.num_free == 8
  bm.check()


def test_admit_is_all_or_nothing_and_keeps_the_reserve():
  bm = BlockManager(6, 4)
  assert bm.admit("a", [], 12)
  assert not bm.admit("b", [], 12, reserve=1)  # 3 free, 3 needed + 1 reserved.
  assert bm.num_free == 3 and "b" not in bm
  assert bm.admit("b", [], 8, reserve=1)
  bm.check()


def test_prefix_lookup_hits_committed_full_blocks_only():
  bm = BlockManager(16, 4)
  prompt = list(range(100, 111))  # 11 tokens: 2 full blocks + 3.
  assert bm.lookup(prompt) == []
  assert bm.admit("a", [], len(prompt))
  bm.commit("a", prompt, 7)  # only block 0 fully computed.
  assert bm.lookup(prompt) == bm.table("a")[:1]
  bm.commit("a", prompt, 11)
  assert bm.lookup(prompt) == bm.table("a")[:2]
  assert bm.num_cached == 2
  # The block of the last token is never a hit (its logits are needed): 8 tokens → 1 block.
  assert bm.lookup(prompt[:8]) == bm.table("a")[:1]
  # Keys chain: the same second block after a different first block is a miss.
  assert bm.lookup([0] * 4 + prompt[4:]) == []
  # Sharing: b takes a's two cached blocks plus fresh ones; refs count both.
  hits = bm.lookup(prompt + [1, 2, 3])
  assert hits == bm.table("a")[:2]
  assert bm.admit("b", hits, 14)
  assert bm.table("b")[:2] == hits and len(bm.table("b")) == 4
  assert bm.num_used == 3 + 2
  bm.check()
  bm.free("a")
  assert bm.lookup(prompt) == hits  # still referenced by b, still cached.
  bm.free("b")
  assert bm.num_used == 0 and bm.num_cached == 2
  assert bm.lookup(prompt) == hits  # unreferenced but cached until evicted.
  bm.check()


def test_lru_eviction_of_unreferenced_cached_blocks():
  bm = BlockManager(4, 2)
  old, new = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
  for sid, toks in (("old", old), ("new", new)):
    assert bm.admit(sid, [], 4)
    bm.commit(sid, toks, 4)
    bm.free(sid)
  assert bm.num_cached == 4 and bm.num_free == 4
  assert bm.admit("x", [], 2)  # one block: evicts the least recently freed: old's tail block.
  assert bm.evictions == 1
  assert len(bm.lookup(old)) == 1 and len(bm.lookup(new)) == 2
  hits = bm.lookup(new)
  assert bm.admit("y", hits, 4)  # reviving cached blocks takes them off the evictable list.
  assert not bm.admit("z", [], 4)  # 1 allocatable left.
  bm.check()


def test_duplicate_blocks_from_concurrent_misses_stay_private():
  bm = BlockManager(8, 2)
  toks = [3, 4, 5, 6, 7]
  for sid in ("a", "b"):
    assert bm.admit(sid, [], 5)
  bm.commit("a", toks, 5)
  bm.commit("b", toks, 5)
  assert bm.num_cached == 2
  assert bm.lookup(toks) == bm.table("a")[:2]
  bm.free("b")
  assert bm.num_free == 8 - 3  # b's copies went to the free list, not the cache.
  bm.check()


def test_random_stress_keeps_invariants_and_never_over_allocates():
  rng = np.random.default_rng(0)
  bm = BlockManager(24, 4)
  seqs: dict[str, list[int]] = {}  # id → tokens; computed = all but the last.
  hit_blocks = 0
  for it in range(1500):
    op = rng.integers(4)
    if op == 0 or not seqs:  # admit, with prompts from a small alphabet so prefixes repeat.
      sid = f"s{it}"
      toks = [int(t) for t in rng.integers(0, 2, rng.integers(1, 30))]
      hits = bm.lookup(toks)
      assert len(hits) * 4 <= len(toks) - 1
      hit_blocks += len(hits)
      n = len(hits) * 4 + int(rng.integers(1, len(toks) - len(hits) * 4 + 1))
      free_before = bm.num_free
      need = -(-n // 4) - len(hits) + sum(1 for b in hits if bm._ref[b] == 0)
      ok = bm.admit(sid, hits, n)
      assert ok == (need <= free_before)
      if ok:
        seqs[sid] = toks
        bm.commit(sid, toks, n)
    elif op == 1:  # grow by a few tokens (decode).
      sid = str(rng.choice(list(seqs)))
      seqs[sid] = seqs[sid] + [int(t) for t in rng.integers(0, 2, rng.integers(1, 6))]
      free_before, have = bm.num_free, len(bm.table(sid))
      ok = bm.grow(sid, len(seqs[sid]))
      assert ok == (-(-len(seqs[sid]) // 4) - have <= free_before)
      if ok:
        bm.commit(sid, seqs[sid], len(seqs[sid]) - 1)
    else:  # finish or abort.
      sid = str(rng.choice(list(seqs)))
      bm.free(sid)
      del seqs[sid]
    bm.check()
    assert bm.num_used <= bm.num_blocks
  for sid in list(seqs):
    bm.free(sid)
  bm.check()
  assert bm.num_free == bm.num_blocks and bm.num_used == 0
  assert bm.evictions > 0 and hit_blocks > 0


def test_bad_sizes_are_refused():
  with pytest.raises(ValueError, match="num_blocks"):
    BlockManager(0, 16)
