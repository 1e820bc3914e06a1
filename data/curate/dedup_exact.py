"""Exact deduplication (global stages `exact_dedup`, `url_dedup`) and what all dedup stages share.

Library module, no entry point: list the stages in the curation config (`configs/curate.py`), e.g.
`globals=("exact_dedup", "minhash", "line_dedup")`; `python -m data.curate` runs them. Both stages keep
the first occurrence in shard order (the order the runner gives: input files, then line order) and
drop every later one with reason "duplicate".

  * `exact_dedup`: 64-bit hash of the document text after `normalize` (below), or of the raw text
    (`normalize="none"`), or with only whitespace collapsed (`normalize="space"`). Documents whose
    normalized text is empty (only punctuation) are left to the quality filters, not deduplicated.
  * `url_dedup`: 64-bit hash of `canonical_url(doc.url)`; documents without a url are kept.

Shared with `minhash` and `line_dedup`:

  * `simplify(text) -> bytes`: the CCNet text normalization (Wenzek et al. 2020,
    `cc_net/text_normalizer.py normalize`), which datatrove's `simplify_text` (FineWeb) also follows:
    NFKD + strip accents, lowercase, every digit -> "0", punctuation, symbols and control characters
    -> space. Newlines are kept so line dedup can split afterwards; `.split()` gives the words. ASCII
    goes through one `bytes.translate` (~5 ns/char, against ~60 ns/char for an `re` or
    `str.translate` pass); each maximal run of non-ASCII bytes (curly quotes, accented letters, CJK)
    is normalized on its own and cached, as runs repeat. Differences from datatrove: digits map one
    by one ("1999" -> "0000", as CCNet) where datatrove folds a number to one "0"; every Unicode
    punctuation/symbol goes, where datatrove has a fixed list (it keeps "©", "→", "·"); words are
    split on whitespace, not by a language-specific word tokenizer (so unsegmented scripts such as
    Chinese give few, long "words": MinHash there needs a segmenter).
  * `Spill`: rows (key, doc, payload) partitioned by key into files under the stage's `work_dir`, then
    read back one partition at a time and sorted, to find the rows whose key first appeared in an
    earlier document. Peak memory is one partition (`ROWS_PER_PART` rows, ~50 bytes each while sorting:
    ~200 MB), whatever the corpus size; disk is 20 bytes per row.

Hash width: 64 bits, as CCNet's line hashes (`HASH_SIZE = 8` bytes). The chance that two different texts
collide anywhere among n = 10^9 documents is n^2 / 2^65 ~ 3%, i.e. at worst one wrongly dropped document
in a billion.
"""
from __future__ import annotations

import functools
import math
import re
import string
import unicodedata
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import xxhash

from data.curate.base import Doc, GlobalStage, register
from data.errors import DataError

# ---------------------------------------------------------------------------------- normalization


def _ascii_table() -> bytes:
  table = bytearray(range(256))
  for c in string.ascii_uppercase:
    table[ord(c)] = ord(c.lower())
  for c in string.digits:
    table[ord(c)] = ord("0")
  for c in string.punctuation:
    table[ord(c)] = ord(" ")
  for i in [*range(32), 127]:
    if i != ord("\n"):  # tabs, CR, form feeds and other controls become spaces
      table[i] = ord(" ")
  return bytes(table)


_ASCII = _ascii_table()
_NON_ASCII_RUN = re.compile(rb"[\x80-\xff]+")
_NOT_WORD = re.compile(r"[^\w]|_")  # punctuation, symbols, any whitespace (non-ASCII here)
_DIGIT = re.compile(r"\d")


@functools.lru_cache(maxsize=1 << 16)
def _fix_run(run: bytes) -> bytes:
  """Normalizes one maximal run of non-ASCII UTF-8 bytes (whole characters by construction)."""
  s = unicodedata.normalize("NFKD", run.decode("utf-8", "replace"))
  s = "".join(c for c in s if not unicodedata.combining(c)).lower()  # "é" -> "e" + U+0301 -> "e"
  s = _NOT_WORD.sub(" ", _DIGIT.sub("0", s))
  # NFKD can produce ASCII ("ﬁ" -> "fi", fullwidth "Ａ" -> "A"), which the ASCII table then handles.
  return s.encode("utf-8").translate(_ASCII)


def _fix(m: re.Match) -> bytes:
  return _fix_run(m.group())


def simplify(text: str) -> bytes:
  """CCNet-normalized UTF-8 bytes of `text`; newlines kept, other whitespace runs not collapsed."""
  b = text.encode("utf-8", "replace").translate(_ASCII)
  if not text.isascii():
    b = _NON_ASCII_RUN.sub(_fix, b)
  return b


def normalize(text: str) -> bytes:
  """`simplify` with all whitespace collapsed to single spaces: the key of exact dedup."""
  return b" ".join(simplify(text).split())


def hash64(data: bytes | str) -> int:
  return xxhash.xxh3_64_intdigest(data)


def canonical_url(url: str) -> str:
  """Lower-cased scheme and host, no default port, no fragment, no trailing slash on the path.

  Query strings are kept as they are: parameter order can matter to the server, and reordering would
  merge pages that differ. "www." is kept too (www.example.com and example.com can be different sites).
  """
  url = url.strip()
  try:
    parts = urlsplit(url)
    port = parts.port
  except ValueError:  # malformed (bad port, bad IPv6 literal): compare it as written
    return url
  scheme = parts.scheme.lower()
  host = (parts.hostname or "").lower()
  if ":" in host:  # IPv6 literal: urlsplit strips its brackets
    host = f"[{host}]"
  if port is not None and {"http": 80, "https": 443}.get(scheme) != port:
    host = f"{host}:{port}"
  if parts.username is not None:
    host = f"{parts.username}{':' + parts.password if parts.password else ''}@{host}"
  path = parts.path.rstrip("/")
  return urlunsplit((scheme, host, path, parts.query, ""))


# ---------------------------------------------------------------------------------------- spilling

# One partition is read and sorted at a time: rows of 20 bytes on disk, ~50 bytes while sorting
# (record + argsort index + sorted copy), so 4M rows ~ 200 MB peak.
ROWS_PER_PART = 4_000_000
# Rows are buffered per partition and appended to disk once the buffers hold this many bytes.
FLUSH_BYTES = 64 << 20
_ROW = np.dtype([("key", "<u8"), ("doc", "<i8"), ("pay", "<i4")])


class Spill:
  """Rows (key uint64, doc int64, payload int32) partitioned by key into files under `directory`.

  Add rows in increasing `doc` order (shard order); `duplicates()` then yields, one partition at a
  time, the rows whose key already appeared in an earlier document, with that first document:
  (first_doc, doc, payload) arrays. Repeats of a key inside its first document are not duplicates.
  Each partition file is deleted once read. `n_rows` (an upper bound is fine) sets the partition count.
  """

  def __init__(self, directory: str | Path, n_rows: int, rows_per_part: int | None = None,
               flush_bytes: int | None = None):
    self.dir = Path(directory)
    self.dir.mkdir(parents=True, exist_ok=True)
    per_part = rows_per_part or ROWS_PER_PART
    self.n_parts = max(1, math.ceil(n_rows / per_part))
    # A unique prefix: several spills may share a work_dir (minhash has one per band).
    self._prefix = f"spill-{uuid.uuid4().hex[:8]}"
    self._buffers: list[list[np.ndarray]] = [[] for _ in range(self.n_parts)]
    self._buffered = 0
    self.flush_bytes = flush_bytes or FLUSH_BYTES
    self.bytes_written = 0

  def path(self, part: int) -> Path:
    return self.dir / f"{self._prefix}-{part:05d}.bin"

  def add(self, key: np.ndarray, doc: np.ndarray, pay: np.ndarray | None = None) -> None:
    if not len(key):
      return
    rows = np.empty(len(key), dtype=_ROW)
    rows["key"], rows["doc"] = key, doc
    rows["pay"] = 0 if pay is None else pay
    # Partition by the key's top 32 bits scaled to n_parts (keys are hashes, so parts are even).
    part = ((key >> np.uint64(32)) * np.uint64(self.n_parts)) >> np.uint64(32)
    if self.n_parts == 1:
      self._buffers[0].append(rows)
    else:
      order = np.argsort(part, kind="stable")  # stable: rows stay in doc order within a part
      bounds = np.searchsorted(part[order], np.arange(self.n_parts + 1, dtype=np.uint64))
      for p in range(self.n_parts):
        if bounds[p] < bounds[p + 1]:
          self._buffers[p].append(rows[order[bounds[p]:bounds[p + 1]]])
    self._buffered += rows.nbytes
    if self._buffered >= self.flush_bytes:
      self.flush()

  def flush(self) -> None:
    for p, chunks in enumerate(self._buffers):
      if chunks:
        with open(self.path(p), "ab") as f:
          for c in chunks:
            f.write(c.tobytes())
            self.bytes_written += c.nbytes
        chunks.clear()
    self._buffered = 0

  def duplicates(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    self.flush()
    for p in range(self.n_parts):
      path = self.path(p)
      if not path.exists():
        continue
      rows = np.fromfile(path, dtype=_ROW)
      path.unlink()
      if not len(rows):
        continue
      order = np.argsort(rows["key"], kind="stable")  # equal keys keep doc order: first = earliest
      key, doc, pay = rows["key"][order], rows["doc"][order], rows["pay"][order]
      del rows, order
      starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
      first_doc = np.repeat(doc[starts], np.diff(np.r_[starts, len(key)]))
      dup = doc != first_doc
      yield first_doc[dup], doc[dup], pay[dup]


# ------------------------------------------------------------------------------------------ stages


def shard_offsets(alive: Sequence[np.ndarray]) -> np.ndarray:
  """Global index of each shard's first document (shard order), plus the total at the end."""
  return np.concatenate([[0], np.cumsum([len(a) for a in alive])]).astype(np.int64)


def split_decisions(dropped: np.ndarray, offsets: np.ndarray, reason: str) -> list[list[Any]]:
  """Per-shard decision lists from a global dropped mask."""
  out = []
  for s in range(len(offsets) - 1):
    part = dropped[offsets[s]:offsets[s + 1]]
    out.append([reason if d else None for d in part.tolist()])
  return out


class _HashDedup(GlobalStage):
  """Keeps the first document of each hash (shard order); summaries: `hash` uint64, `ok` bool."""

  def key(self, doc: Doc) -> bytes | None:
    raise NotImplementedError

  def summarize(self, docs: list[Doc]) -> dict[str, np.ndarray]:
    keys = [self.key(d) for d in docs]
    ok = np.array([k is not None for k in keys], dtype=bool)
    hashes = np.fromiter((hash64(k) if k is not None else 0 for k in keys), np.uint64, len(keys))
    return {"hash": hashes, "ok": ok}

  def decide(self, summaries, alive, work_dir) -> list[list[Any]]:
    offsets = shard_offsets(alive)
    spill = Spill(work_dir, int(offsets[-1]))
    for s, live in enumerate(alive):
      use = np.asarray(summaries[s]["ok"], dtype=bool) & live
      idx = np.flatnonzero(use)
      spill.add(np.asarray(summaries[s]["hash"], dtype=np.uint64)[idx], idx + offsets[s])
    dropped = np.zeros(int(offsets[-1]), dtype=bool)
    for _, doc, _ in spill.duplicates():
      dropped[doc] = True
    self.counts["spill_bytes"] += spill.bytes_written
    return split_decisions(dropped, offsets, "duplicate")


@register
class ExactDedup(_HashDedup):
  """Drops documents whose normalized text equals an earlier document's."""
  name = "exact_dedup"
  # "words": `normalize` (CCNet: case, accents, digits, punctuation ignored); "space": NFKC, whitespace
  # runs collapsed, nothing else; "none": the text byte for byte.
  defaults: ClassVar[dict[str, Any]] = {"normalize": "words"}
  _MODES = ("words", "space", "none")

  def __init__(self, **config: Any):
    super().__init__(**config)
    if self.config["normalize"] not in self._MODES:
      raise DataError(f"stage {self.name!r}: normalize={self.config['normalize']!r}; use one of "
                      f"{list(self._MODES)}")

  def key(self, doc: Doc) -> bytes | None:
    mode = self.config["normalize"]
    if mode == "none":
      k = doc.text.encode("utf-8", "replace")
    elif mode == "space":
      k = " ".join(unicodedata.normalize("NFKC", doc.text).split()).encode("utf-8", "replace")
    else:
      k = normalize(doc.text)
    return k or None  # empty after normalizing: not a duplicate of every other empty document


@register
class UrlDedup(_HashDedup):
  """Drops documents whose canonical url equals an earlier document's; no url: kept."""
  name = "url_dedup"
  defaults: ClassVar[dict[str, Any]] = {}

  def key(self, doc: Doc) -> bytes | None:
    return canonical_url(doc.url).encode("utf-8", "replace") if doc.url.strip() else None
