"""Line-level deduplication across documents (global stage `line_dedup`), as in CCNet.

Library module, no entry point: list "line_dedup" in the curation config's global stages (after the
document-level dedups, so whole duplicates are gone first); `python -m data.curate` runs it.

CCNet (Wenzek et al. 2020, section 3.3) removes every paragraph (a "\\n"-separated line) whose
normalized hash was already seen in the same shard set: navigation menus, cookie notices, "All rights
reserved" footers, "Posted by ... on ..." bylines repeated over a site. Here:

  * a line is the text between "\\n"s; its key is the 64-bit hash of `dedup_exact.simplify` of it with
    whitespace collapsed (CCNet's normalization: case, accents, digits, punctuation ignored, so
    "Posted on 12 May 2020" and "Posted on 3 June 2021" are the same line);
  * a line is removed from a document if an earlier alive document (shard order) holds the same key;
    the first document keeps it, and repeats inside one document are left to the repetition filters;
  * lines whose normalized form is shorter than `min_line_chars` (10) are never removed: short lines
    legitimately recur everywhere ("Chapter 1", "Yes.", "Thanks!", list bullets, headings), while
    the boilerplate that matters is longer ("all rights reserved" is 19);
  * documents of a `skip_domains` domain (default "code": `return None` or `}` repeat across every
    code file and must not be cut out) are neither edited nor used as first occurrences;
  * a document edited down below `min_doc_words` whitespace words (50, datatrove SentenceDedup's
    `min_doc_words`, and Gopher's lower bound) is dropped with reason "empty_after_line_dedup".

The decision for an edited document is a tuple of the line indices (into `text.split("\\n")`) to
remove; counts: `lines_removed`, `docs_edited`. Known effect of first-occurrence order, shared with
CCNet: a line's first document may itself be dropped here (for being short after its other lines
went), and the line is then gone from the corpus.

Memory: summaries hold 20 bytes per kept line; `decide` spills (hash, doc, row) rows to `work_dir`
partitioned by hash and reads one partition at a time (`dedup_exact.Spill`: ~200 MB peak), plus 12
bytes per removed line for assembling the decisions.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import xxhash

from data.curate.base import Doc, GlobalStage, register
from data.curate.dedup_exact import Spill, shard_offsets, simplify
from data.errors import DataError

DROP_REASON = "empty_after_line_dedup"


@register
class LineDedup(GlobalStage):
  """Removes lines seen in an earlier document; see the module docstring."""
  name = "line_dedup"
  defaults: ClassVar[dict[str, Any]] = {
      "min_line_chars": 10, "min_doc_words": 50, "skip_domains": ("code",)}

  def __init__(self, **config: Any):
    super().__init__(**config)
    for k in ("min_line_chars", "min_doc_words"):
      v = self.config[k]
      if not isinstance(v, int) or v < 0:
        raise DataError(f"stage {self.name!r}: {k} must be a non-negative integer, got {v!r}")
    skip = self.config["skip_domains"]
    if isinstance(skip, str) or not all(isinstance(d, str) for d in skip):
      raise DataError(f"stage {self.name!r}: skip_domains must be a tuple of domains, got {skip!r}")
    self.skip = frozenset(skip)

  def summarize(self, docs: list[Doc]) -> dict[str, np.ndarray]:
    keys: list[bytes] = []
    doc_ix, line_ix, words = [], [], []
    doc_words = np.zeros(len(docs), np.int32)
    min_chars = self.config["min_line_chars"]
    for j, doc in enumerate(docs):
      raw = doc.text.split("\n")
      doc_words[j] = sum(len(line.split()) for line in raw)
      if doc.domain in self.skip:
        continue
      norm = simplify(doc.text).split(b"\n")
      if len(norm) != len(raw):  # cannot happen (simplify keeps newlines), but never misalign lines
        norm = [simplify(line) for line in raw]
      for i, (line, n) in enumerate(zip(raw, norm)):
        n = b" ".join(n.split())
        if len(n) >= min_chars:
          keys.append(n)
          doc_ix.append(j)
          line_ix.append(i)
          words.append(len(line.split()))
    return {
        "hash": np.fromiter(map(xxhash.xxh3_64_intdigest, keys), np.uint64, len(keys)),
        "doc": np.array(doc_ix, np.int32), "line": np.array(line_ix, np.int32),
        "words": np.array(words, np.int32), "doc_words": doc_words,
    }

  def decide(self, summaries, alive, work_dir) -> list[list[Any]]:
    offsets = shard_offsets(alive)
    n_rows = sum(len(summaries[s]["doc"]) for s in range(len(alive)))
    spill = Spill(work_dir, n_rows)
    for s, live in enumerate(alive):
      doc = np.asarray(summaries[s]["doc"], dtype=np.int64)
      rows = np.flatnonzero(live[doc])  # lines of documents an earlier stage dropped are skipped
      spill.add(np.asarray(summaries[s]["hash"], np.uint64)[rows], doc[rows] + offsets[s], rows)
    removed_doc, removed_row = [], []
    for _, doc, row in spill.duplicates():
      removed_doc.append(doc)
      removed_row.append(row)
    self.counts["spill_bytes"] += spill.bytes_written
    doc = np.concatenate(removed_doc) if removed_doc else np.zeros(0, np.int64)
    row = np.concatenate(removed_row) if removed_row else np.zeros(0, np.int32)
    order = np.argsort(doc, kind="stable")
    doc, row = doc[order], row[order]
    bounds = np.searchsorted(doc, offsets)

    out: list[list[Any]] = []
    min_words = self.config["min_doc_words"]
    for s in range(len(alive)):
      decisions: list[Any] = [None] * len(alive[s])
      d = doc[bounds[s]:bounds[s + 1]] - offsets[s]
      r = row[bounds[s]:bounds[s + 1]]
      lines = np.asarray(summaries[s]["line"])[r]
      words = np.asarray(summaries[s]["words"])[r]
      doc_words = np.asarray(summaries[s]["doc_words"])
      starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]]) if len(d) else np.zeros(0, np.int64)
      for a, b in zip(starts.tolist(), np.r_[starts[1:], len(d)].tolist()):
        j = int(d[a])
        if doc_words[j] - int(words[a:b].sum()) < min_words:
          decisions[j] = DROP_REASON
        else:
          decisions[j] = tuple(sorted(lines[a:b].tolist()))
          self.counts["lines_removed"] += b - a
          self.counts["docs_edited"] += 1
      out.append(decisions)
    return out

  def apply(self, doc: Doc, decision: Any) -> Doc | str:
    if decision is None or isinstance(decision, str):
      return super().apply(doc, decision)
    drop = set(decision)
    lines = doc.text.split("\n")
    kept = (line for i, line in enumerate(lines) if i not in drop)
    return dataclasses.replace(doc, text="\n".join(kept))
