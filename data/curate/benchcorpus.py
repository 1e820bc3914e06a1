"""A reproducible dedup benchmark corpus with planted (near-)duplicates, and its precision/recall.

Library module, no entry point; `python -m data.bench` and `tests/test_curate_dedup.py` use it:

  docs, dup_of = build_bench_corpus(n_docs=10_000, seed=0)
  dropped = ...  # bool per doc, from running a dedup stage over `docs`
  precision_recall(dropped, dup_of)  # {"precision", "recall", "f1", "tp", "fp", "fn", ...}

Sources (real text, read from the shared data folder, never copied): the Common Crawl documents
(CCNet and Dolma samples in `web/`), Tiny Shakespeare, WikiText-2 *valid* (test is held out for
evaluation), and the prose half of the embedded stdlib corpus (`data.corpus.build_stdlib_corpus`:
language reference topics and docstrings). GSM8K and HumanEval are decontamination targets and are
not used. They are cut into ~44k unique sentences (4-60 words; 42k prose, 1.8k web), and each
distinct document samples sentences with a seeded RNG until it reaches 200-1000 words, either
"prose" (paragraphs of 3-6 sentences from prose sources) or "web" (one or two sentences per line,
a third of them from the web pages). Two distinct documents then share a handful of sentences at
most: their 5-gram Jaccard similarity is ~0.01, far below any dedup threshold, so every duplicate in
the corpus is planted.
The pool is finite (630k words against 30M for 50k documents), so each sentence recurs in ~35
documents: line-level dedup finds those repeats, and this corpus scores document-level dedup only.

Planted duplicates (`dup_fraction` of the documents): each copies a random distinct document. A quarter
are exact copies; the rest keep ~`overlap` of the words: 1-3 contiguous spans totalling (1 - overlap)
of the words are replaced by, inserted from, or deleted (other text), as edited and templated copies
on the web look. With overlap 0.9 the near copies' 5-gram Jaccard with their original is 0.79-0.90
(5th-95th percentile; MinHash 14x8 finds a pair at 0.79 with probability 0.90, at 0.9 with 0.9996). All
documents are then shuffled, so a copy can come before its original. `dup_of[i]` is the index of the
original of a planted copy, -1 for a distinct document.

Scoring (`precision_recall`): a cluster is an original and its copies; deduplication should keep
exactly one document per cluster, any one. Per cluster of size s with d documents dropped, min(d, s-1)
drops are true positives and the rest (a whole cluster gone, or any drop of a singleton) are false
positives; s-1-min(d, s-1) copies left are false negatives.

Cost: building 50k documents (30M words) took 3.0 s on the 2-core CI machine, most of it joining
strings; the sentence pool is built once per process (0.7 s, plus ~3 s the first time the stdlib
corpus is cached).
"""
from __future__ import annotations

import functools
import gzip
import json
import re
from pathlib import Path

import numpy as np

from data.curate.base import Doc, shared_data_dir
from data.errors import DataError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MIN_WORDS, _MAX_WORDS = 4, 60          # sentences kept in the pool
_DOC_WORDS = (200, 1000)                # distinct documents' length range
_EXACT_SHARE = 0.25                     # of planted duplicates, exact copies
# WikiText-2's tokenized form, undone so its sentences read like the other sources.
_WIKI_DETOK = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "),
               (" ; ", "; "), (" : ", ": "), (" 's ", "'s "), (" n't ", "n't "), ("( ", "("),
               (" )", ")"), (' " ', ' "')]


def _read(path: Path) -> str:
  if not path.is_file():
    raise DataError(f"{path}: bench corpus source not found (set SHARED_DATA to the data folder)")
  return path.read_text(encoding="utf-8")


def _jsonl_texts(path: Path) -> list[str]:
  if not path.is_file():
    raise DataError(f"{path}: bench corpus source not found (set SHARED_DATA to the data folder)")
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt", encoding="utf-8") as f:
    return [json.loads(line)["text"] for line in f if line.strip()]


def _sentences(paragraphs: list[str]) -> list[str]:
  out = []
  for p in paragraphs:
    for s in _SENTENCE_END.split(" ".join(p.split())):
      n = len(s.split())
      # Mostly letters: leaves out tables, code lines and doctest output from docstrings.
      if _MIN_WORDS <= n <= _MAX_WORDS and sum(c.isalpha() for c in s) >= 0.6 * len(s):
        out.append(s)
  return out


@functools.lru_cache(maxsize=4)
def sentence_pools(data_dir: str = "", cache_dir: str = "") -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(prose sentences, web sentences): unique, in a fixed order (source order, first occurrence)."""
  from data import corpus as corpus_lib
  from data.prepare import default_cache_dir

  root = Path(data_dir) if data_dir else shared_data_dir()
  web_docs = [t for f in sorted((root / "web").glob("ccnet_en_head_*.jsonl")) for t in _jsonl_texts(f)]
  web_docs += _jsonl_texts(root / "web" / "dolma_documents_000.json.gz")
  if len(web_docs) < 2:
    raise DataError(f"{root / 'web'}: expected the CCNet and Dolma samples (ccnet_en_head_*.jsonl)")
  web = _sentences([p for t in web_docs for p in t.split("\n")])

  shakespeare = _read(root / "text" / "tinyshakespeare.txt")
  # Speeches are separated by blank lines and start with the speaker's name line.
  speeches = [" ".join(b.split("\n")[1:]) for b in shakespeare.split("\n\n")]
  wiki = []
  for line in _read(root / "text" / "wikitext2_valid.txt").split("\n"):
    line = line.strip()
    if line and not line.startswith("="):  # "= = Heading = =" lines
      for a, b in _WIKI_DETOK:
        line = line.replace(a, b)
      wiki.append(line)
  cache = Path(cache_dir) if cache_dir else default_cache_dir() / "corpus"
  prose_path = corpus_lib.build_stdlib_corpus(cache) / "prose.jsonl"
  stdlib = [p for t in _jsonl_texts(prose_path) for p in t.split("\n\n")]

  prose = _sentences(speeches) + _sentences(wiki) + _sentences(stdlib)
  return tuple(dict.fromkeys(prose)), tuple(dict.fromkeys(web))


def _stream(rng: np.random.Generator, pool_words: np.ndarray, targets: np.ndarray) -> list[np.ndarray]:
  """Per target length, pool indices drawn with replacement until the words reach the target."""
  need = int(targets.sum())
  idx = rng.integers(0, len(pool_words), size=int(need / pool_words.mean() * 1.1) + 64)
  while pool_words[idx].sum() < need + targets.max():
    idx = np.concatenate([idx, rng.integers(0, len(pool_words), size=len(idx) // 4 + 64)])
  cum = np.cumsum(pool_words[idx])
  cuts = np.searchsorted(cum, np.cumsum(targets)) + 1  # doc k ends with the sentence crossing its total
  return np.split(idx[:cuts[-1]], cuts[:-1])


def _edit(words: list[str], overlap: float, rng: np.random.Generator, filler: list[str]) -> list[str]:
  """~(1 - overlap) of the words changed in 1-3 contiguous spans: replaced, inserted or deleted."""
  budget = max(1, round((1.0 - overlap) * len(words)))
  n_spans = min(int(rng.integers(1, 4)), budget)
  cuts = np.sort(rng.choice(np.arange(1, budget), n_spans - 1, replace=False)).tolist()
  sizes = np.diff([0, *cuts, budget]).tolist()
  out = list(words)
  for size in sizes:
    op = int(rng.integers(3))
    at = int(rng.integers(0, max(1, len(out) - size)))
    new = [filler[int(i)] for i in rng.integers(0, len(filler), size)]
    if op == 0:
      out[at:at + size] = new      # replace
    elif op == 1:
      out[at:at] = new             # insert
    elif len(out) > 2 * size:
      del out[at:at + size]        # delete
  return out


def build_bench_corpus(n_docs: int = 50_000, seed: int = 0, dup_fraction: float = 0.1,
                       overlap: float = 0.9, *, data_dir: str = "", cache_dir: str = ""
                       ) -> tuple[list[Doc], np.ndarray]:
  """Distinct documents plus planted copies, shuffled (module docstring); same args, same corpus."""
  if n_docs < 2:
    raise DataError(f"build_bench_corpus: n_docs must be >= 2, got {n_docs}")
  if not 0.0 <= dup_fraction < 1.0:
    raise DataError(f"build_bench_corpus: dup_fraction must be in [0, 1), got {dup_fraction}")
  if not 0.5 <= overlap <= 1.0:
    raise DataError(f"build_bench_corpus: overlap must be in [0.5, 1], got {overlap}")
  prose, web = sentence_pools(data_dir, cache_dir)
  rng = np.random.default_rng(seed)
  n_dup = round(dup_fraction * n_docs)
  n_orig = n_docs - n_dup

  # Distinct documents: half prose-like, half web-like (a third of a web doc's sentences are web).
  is_web = rng.random(n_orig) < 0.5
  targets = rng.integers(_DOC_WORDS[0], _DOC_WORDS[1] + 1, n_orig)
  prose_words = np.array([len(s.split()) for s in prose])
  # Web sentences are few (~1k against ~60k): repeated so that they are ~1/3 of a web doc's draws.
  mixed = prose + web * max(1, round(len(prose) / (2 * len(web))))
  mixed_words = np.array([len(s.split()) for s in mixed])
  texts: list[str] = [""] * n_orig
  for kind, pool, pool_words in ((False, prose, prose_words), (True, mixed, mixed_words)):
    which = np.flatnonzero(is_web == kind)
    group = rng.integers(3, 7, len(which)) if not kind else rng.integers(1, 3, len(which))
    for j, idx, g in zip(which.tolist(), _stream(rng, pool_words, targets[which]), group.tolist()):
      sents = [pool[i] for i in idx.tolist()]
      sep, join = ("\n", " ") if kind else ("\n\n", " ")
      texts[j] = sep.join(join.join(sents[k:k + g]) for k in range(0, len(sents), g))

  # Planted copies of random distinct documents.
  src = rng.integers(0, n_orig, n_dup)
  exact = rng.random(n_dup) < _EXACT_SHARE
  filler = " ".join(prose[i] for i in rng.integers(0, len(prose), 2000)).split()
  for k in range(n_dup):
    text = texts[src[k]]
    if not exact[k]:
      text = " ".join(_edit(text.split(" "), overlap, rng, filler))
    texts.append(text)

  # Shuffle; dup_of refers to positions after the shuffle.
  perm = rng.permutation(n_docs)           # new position of old index i is inv[i]
  inv = np.empty(n_docs, np.int64)
  inv[perm] = np.arange(n_docs)
  old_dup_of = np.r_[np.full(n_orig, -1), src]
  dup_of = np.where(old_dup_of[perm] >= 0, inv[np.maximum(old_dup_of[perm], 0)], -1)
  web_flag = np.r_[is_web, is_web[src]]
  docs = []
  for i, old in enumerate(perm.tolist()):
    w = bool(web_flag[old])
    docs.append(Doc(id=f"bench-{seed}-{i:06d}", text=texts[old], domain="web" if w else "prose",
                    url=f"https://site{old % 997}.example.com/page/{old}" if w else "",
                    host=f"site{old % 997}.example.com" if w else ""))
  return docs, dup_of


def precision_recall(dropped: np.ndarray, dup_of: np.ndarray) -> dict[str, float | int]:
  """Cluster-level dedup scores of a dropped mask against `dup_of`; see the module docstring."""
  dropped = np.asarray(dropped, dtype=bool)
  dup_of = np.asarray(dup_of)
  if dropped.shape != dup_of.shape:
    raise DataError(f"precision_recall: dropped has shape {dropped.shape}, dup_of {dup_of.shape}")
  cluster = np.where(dup_of >= 0, dup_of, np.arange(len(dup_of)))
  size = np.bincount(cluster, minlength=len(dup_of))
  gone = np.bincount(cluster, weights=dropped, minlength=len(dup_of)).astype(np.int64)
  extra = np.maximum(size - 1, 0)
  tp = int(np.minimum(gone, extra).sum())
  fp = int(np.maximum(gone - extra, 0)[size > 0].sum())
  fn = int(extra.sum()) - tp
  precision = tp / (tp + fp) if tp + fp else 1.0
  recall = tp / (tp + fn) if tp + fn else 1.0
  return {"precision": precision, "recall": recall,
          "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
          "tp": tp, "fp": fp, "fn": fn, "dropped": int(dropped.sum()), "planted": int(extra.sum())}
