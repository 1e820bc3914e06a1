"""Block manager of the paged KV cache: which cache pages each sequence owns, with prefix caching.

Pure Python bookkeeping (no JAX), driven by `serve/engine.py`, unit-tested in `tests/test_serve_blocks.py`:

    blocks = BlockManager(num_blocks=512, block_size=16)
    hits = blocks.lookup(prompt)                 # cached pages of the longest cached prefix (full blocks)
    if blocks.admit("r1", hits, len(hits) * 16 + chunk):   # all or nothing: False changes nothing
      ...compute tokens [len(hits)*16, len(hits)*16 + chunk) into blocks.table("r1")...
      blocks.commit("r1", tokens, num_computed)  # full computed blocks become shareable
    blocks.grow("r1", num_tokens)                # more pages as the sequence grows (False: none left)
    blocks.free("r1")                            # drop its references (cached pages stay, evictable)

Page ids run 1..num_blocks; page 0 is the model's null page (padding writes), never handed out.
Every page is in exactly one state:
  free     on the free list, content worthless;
  cached   unreferenced, but holds a full block of known tokens under its hash: reusable by a later
           sequence with the same prefix, evictable (least recently freed first) when pages run out;
  used     referenced by ≥ 1 sequence (ref count); may be hashed too (a shared prefix).
So `num_free` (allocatable = free + cached) + `num_used` == `num_blocks` at all times.

Prefix caching (vLLM's automatic prefix caching, Kwon et al. 2023): a full block is keyed by
sha256(parent block's key, its token ids), so equal keys mean equal whole prefixes, and a lookup walks
the chain from the first block until the first miss. A cryptographic hash, as vLLM moved to after
Python's `hash` proved collidable on purpose: a collision would silently serve another prompt's cache.
Only blocks whose every token's K/V has been computed are committed. A lookup leaves at least the last
token uncached, since its logits are needed, and the block holding it private, since it is rewritten.
"""
from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np

_ROOT = b"jaxlm-prefix-v1"


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
  """Prefix-cache key of a full block: sha256 of its parent block's key and its token ids."""
  return hashlib.sha256(parent + np.asarray(tokens, np.int64).tobytes()).digest()


class BlockManager:
  """Fixed-size KV-cache blocks: free list, per-sequence block tables, ref counts, prefix cache."""

  def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
    if num_blocks < 1 or block_size < 1:
      raise ValueError(f"need num_blocks ≥ 1 and block_size ≥ 1, got {num_blocks}, {block_size}")
    self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
    self._free = collections.deque(range(1, num_blocks + 1))
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first.
    self._ref = [0] * (num_blocks + 1)
    self._hash_of: dict[int, bytes] = {}
    self._by_hash: dict[bytes, int] = {}
    self._tables: dict[str, list[int]] = {}
    self._chains: dict[str, list[bytes]] = {}  # keys of each sequence's committed full blocks.
    self.evictions = 0

  # ------------------------------------------------------------------ counts

  @property
  def num_free(self) -> int:
    """Pages an allocation can take now: free ones plus unreferenced cached ones (evicted on demand)."""
    return len(self._free) + len(self._evictable)

  @property
  def num_used(self) -> int:
    return self.num_blocks - self.num_free

  @property
  def num_cached(self) -> int:
    """Pages holding a committed, hashed block (referenced or not)."""
    return len(self._by_hash)

  def blocks_for(self, num_tokens: int) -> int:
    return -(-num_tokens // self.block_size)

  def table(self, seq_id: str) -> list[int]:
    return self._tables.get(seq_id, [])

  def __contains__(self, seq_id: str) -> bool:
    return seq_id in self._tables

  # ------------------------------------------------------------------ allocation

  def lookup(self, tokens: Sequence[int]) -> list[int]:
    """Pages of the longest cached prefix of `tokens`, in order (read-only: nothing is referenced yet)."""
    if not self.prefix_caching:
      return []
    # Leave the last token's block uncached: its logits must be computed, and it will be written to.
    limit = (len(tokens) - 1) // self.block_size
    hits, parent = [], _ROOT
    for i in range(limit):
      parent = block_key(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
      block = self._by_hash.get(parent)
      if block is None:
        break
      hits.append(block)
    return hits

  def admit(self, seq_id: str, hits: Sequence[int], num_tokens: int, *, reserve: int = 0) -> bool:
    """A new sequence sharing the cached pages `hits` (from `lookup`) plus fresh pages for `num_tokens`
    in all, if `reserve` pages stay allocatable after; all or nothing (False: nothing changed)."""
    if seq_id in self._tables:
      raise ValueError(f"sequence {seq_id!r} already holds blocks")
    hits = list(hits)
    new = max(0, self.blocks_for(num_tokens) - len(hits))
    reviving = sum(1 for b in hits if b in self._evictable)  # cached pages we take off the free side.
    if new + reserve > self.num_free - reviving:
      return False
    for b in hits:
      self._take(b)
    self._tables[seq_id] = hits + self._allocate(new)
    self._chains[seq_id] = [self._hash_of[b] for b in hits]
    return True

  def grow(self, seq_id: str, num_tokens: int) -> bool:
    """Extends the table to hold `num_tokens`; False (nothing changed) when the pages cannot be had."""
    table = self._tables.setdefault(seq_id, [])
    self._chains.setdefault(seq_id, [])
    new = self.blocks_for(num_tokens) - len(table)
    if new > self.num_free:
      return False
    table.extend(self._allocate(max(0, new)))
    return True

  def commit(self, seq_id: str, tokens: Sequence[int], num_computed: int) -> None:
    """Makes the sequence's full blocks within its first `num_computed` tokens reusable by later ones."""
    if not self.prefix_caching:
      return
    table, chain = self._tables[seq_id], self._chains[seq_id]
    full = min(num_computed // self.block_size, len(table))
    if full <= len(chain):
      return
    for i in range(len(chain), full):
      key = block_key(chain[-1] if chain else _ROOT, tokens[i * self.block_size:(i + 1) * self.block_size])
      chain.append(key)
      block = table[i]
      # A block computed twice by concurrent misses keeps the first copy; this one stays private.
      if block not in self._hash_of and key not in self._by_hash:
        self._hash_of[block], self._by_hash[key] = key, block

  def free(self, seq_id: str) -> None:
    """Drops the sequence's references; unreferenced hashed pages stay cached (idempotent)."""
    table = self._tables.pop(seq_id, None)
    self._chains.pop(seq_id, None)
    for b in reversed(table or ()):  # tail first, so a chain's tail is evicted before its head.
      self._ref[b] -= 1
      if self._ref[b] == 0:
        if b in self._hash_of:
          self._evictable[b] = None
        else:
          self._free.append(b)

  def _take(self, block: int) -> None:
    if self._ref[block] == 0:
      del self._evictable[block]
    self._ref[block] += 1

  def _allocate(self, n: int) -> list[int]:
    out = []
    for _ in range(n):
      if self._free:
        b = self._free.popleft()
      else:  # evict the least recently freed cached page.
        b, _ = self._evictable.popitem(last=False)
        del self._by_hash[self._hash_of.pop(b)]
        self.evictions += 1
      self._ref[b] = 1
      out.append(b)
    return out

  # ------------------------------------------------------------------ checks

  def check(self) -> None:
    """Asserts the invariants (for tests): states partition the pages, refs match the tables."""
    refs = collections.Counter(b for t in self._tables.values() for b in t)
    free, evictable = set(self._free), set(self._evictable)
    assert len(free) == len(self._free), "a page is on the free list twice"
    assert not free & evictable, "a page is both free and cached-evictable"
    assert 0 not in free | evictable | set(refs), "the null page was handed out"
    for b in range(1, self.num_blocks + 1):
      assert self._ref[b] >= 0, f"page {b} has ref count {self._ref[b]}"
      assert self._ref[b] == refs[b], f"page {b}: ref count {self._ref[b]} but {refs[b]} table entries"
      states = (b in free) + (b in evictable) + (self._ref[b] > 0)
      assert states == 1, f"page {b} is in {states} states (free/cached/used)"
      assert b not in evictable or b in self._hash_of, f"evictable page {b} has no hash"
    assert all(self._by_hash[h] == b for b, h in self._hash_of.items()), "hash maps disagree"
    assert len(self._by_hash) == len(self._hash_of)
    assert self.num_free + self.num_used == self.num_blocks
