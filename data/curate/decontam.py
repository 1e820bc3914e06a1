"""Decontamination: 13-gram overlap between training documents and evaluation sets.

Pipeline stage `decontam` (per document; library module, run by `python -m data.curate` when the
preset lists it). As in GPT-3 (Brown et al. 2020, Appendix C): text is lower-cased, punctuation is
stripped and it is split into word tokens (runs of letters and digits, regex [^\\W_]+); a document is
contaminated by an evaluation set when it shares at least `min_hits` distinct `n`-grams (default 13)
with it. `mode` "remove" drops the document ("contaminated"); "flag" keeps it and sets
`doc.meta["contaminated"]` to the sorted list of set names.

Evaluation sets are registered by name with a loader (`@eval_set(name)`) that reads them from the
shared data folder (`data_dir`, default $SHARED_DATA, else ../shared/data next to the repository, as
tests/conftest.py finds it). Each item is a list of text segments; n-grams never cross a segment
boundary:
  * gsm8k_test (math/gsm8k_test.jsonl, 1,319 items): question + answer, and again with the
    calculator annotations "<<48/2=24>>" removed, since copies on the web often drop them;
  * humaneval (code/humaneval.jsonl.gz, 164 items): prompt + canonical_solution (the solution
    completes the prompt), and the test code;
  * wikitext2_test (text/wikitext2_test.txt, 62 articles): the paragraphs of each article, detokenized
    (" @-@ " -> "-", " @,@ " -> ",", " @.@ " -> ".", spaces before punctuation and clitics removed)
    and cut at every "<unk>": the original word is unknown, so no n-gram may span it;
  * wikitext2_valid (text/wikitext2_valid.txt, 60 articles): the same for the validation split (not
    in the stage's default list; `data.contamination` reports on it).
Eval n-grams in which fewer than half the tokens contain a letter are not indexed: number runs are
generic (a page-number bar "1 2 3 ... 16" on a real Dolma page shared four 13-grams with the number grid
in HumanEval/129's tests), and every item keeps plenty of worded n-grams.
Segments shorter than n tokens give no n-gram and cannot be detected: short eval items are skipped, not
matched whole, because matching shorter n-grams for them would mean hashing every document at several
lengths and short n-grams match ordinary text (GPT-3 drew the same line: n never below 8). With n=13
every GSM8K question (>= 15 tokens) and every HumanEval prompt + solution (>= 18) is covered; 4,934 of
WikiText-2 test's 17,132 <unk>-free paragraph pieces, holding 141k of its 190k tokens, are. The count
of uncovered items per set is in `uncovered` after `setup()`.

Storage: each token is hashed once (BLAKE2b, 64 bits, stable across processes and Python versions),
an n-gram's hash is a polynomial over its token hashes (mod 2^64) finished with MurmurHash3's fmix64,
and each set (`NgramIndex`) keeps a sorted uint64 array of its distinct n-gram hashes with, for each,
the items that have it (CSR: offsets into an item array; n-grams shared by several items are rare:
14 of GSM8K's 144k, 250 of HumanEval's 18k; see `NgramIndex`): ~20 bytes per n-gram,
4.9 MB for the three default sets (244k n-grams: GSM8K 144k, HumanEval 18k, WikiText-2 82k), built in
`setup()` in ~0.6 s, once per process. A document's n-grams first go through a one-hash Bloom filter
over all sets (a 4 MB bool array; `Matcher`, shared with `data.contamination`); the few that pass are
binary-searched (np.searchsorted) in each set. A false hit needs a 64-bit collision: ~1e-14 per
document n-gram. About 2,000 docs/s (14 MB/s) on the real web samples, one core.

Counters (`self.counts`): "docs_contaminated"; per set "docs:<set>" (documents hitting it) and
"ngrams:<set>" (distinct shared n-grams, summed over documents); with `record_items`,
"item:<set>:<item id>" (documents hitting that item; ids are GSM8K row numbers, HumanEval task ids,
WikiText article titles). `contamination_summary(counts)` folds them into a per-set report.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from data.curate.base import Doc, Stage, register, shared_data_dir
from data.curate.minhash import fmix64
from data.errors import DataError

_TOKEN_RE = re.compile(r"[^\W_]+")
_P = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime: an odd multiplier for the polynomial
_CACHE_MAX = 1 << 20  # token -> hash entries kept per process (~100 MB at most); cleared when full


class _TokenHashes(dict):
  """token -> 64-bit BLAKE2b hash, computed on first use (words repeat: most lookups hit)."""

  def __missing__(self, token: str) -> int:
    h = self[token] = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
    return h


_token_cache = _TokenHashes()
EvalLoader = Callable[[Path], Iterator[tuple[str, list[str]]]]
EVAL_SETS: dict[str, EvalLoader] = {}


def eval_set(name: str) -> Callable[[EvalLoader], EvalLoader]:
  """Decorator registering `loader(data_dir) -> iterator of (item id, [segment texts])` as `name`."""
  def wrap(fn: EvalLoader) -> EvalLoader:
    if name in EVAL_SETS and EVAL_SETS[name] is not fn:
      raise ValueError(f"eval set {name!r} registered twice")
    EVAL_SETS[name] = fn
    return fn
  return wrap


def _need(path: Path) -> Path:
  if not path.is_file():
    raise DataError(f"eval file {path} not found (point $SHARED_DATA, or the decontam stage's "
                    "data_dir option, at the shared data folder)")
  return path


def iter_jsonl(path: Path) -> Iterator[dict]:
  """The JSON objects of a JSON-lines file (gzip when named .gz); DataError naming a bad line."""
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(_need(path), "rt", encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      try:
        yield json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path} line {i}: invalid JSON ({e.msg})") from None


_CALC_RE = re.compile(r"<<[^<>]*>>")


@eval_set("gsm8k_test")
def _gsm8k_test(data_dir: Path) -> Iterator[tuple[str, list[str]]]:
  for i, row in enumerate(iter_jsonl(data_dir / "math" / "gsm8k_test.jsonl")):
    q, a = row["question"], row["answer"]
    yield str(i), [f"{q}\n{a}", f"{q}\n{_CALC_RE.sub('', a)}"]


@eval_set("humaneval")
def _humaneval(data_dir: Path) -> Iterator[tuple[str, list[str]]]:
  for row in iter_jsonl(data_dir / "code" / "humaneval.jsonl.gz"):
    yield row["task_id"], [row["prompt"] + row["canonical_solution"], row["test"]]


_WT_HEADING_RE = re.compile(r"^ ?= (?!=)(.*?) = ?$")   # " = Title = " (a subsection is " = = x = = ")
_WT_RULES = [(re.compile(p), r) for p, r in (
    (r" @([-,.])@ ", r"\1"),                # number and hyphen separators: 1 @,@ 000 -> 1,000
    (r" ([.,;:!?%)\]}])", r"\1"),           # no space before closing punctuation
    (r"([(\[{$]) ", r"\1"),                 # nor after opening brackets and currency
    (r" ('(?:s|t|re|ve|m|ll|d)|n't)\b", r"\1"),  # clitics: Teddy 's -> Teddy's, don 't -> don't
)]


def detokenize_wikitext(line: str) -> str:
  """WikiText's tokenized form back to (approximately) raw text; `<unk>` is left in place."""
  for regex, repl in _WT_RULES:
    line = regex.sub(repl, line)
  return line.strip()


def _wikitext2(data_dir: Path, split: str) -> Iterator[tuple[str, list[str]]]:
  title, paragraphs = "", []
  with open(_need(data_dir / "text" / f"wikitext2_{split}.txt"), encoding="utf-8") as f:
    for line in f:
      line = line.rstrip("\n")
      heading = _WT_HEADING_RE.match(line)
      if heading:
        if paragraphs:
          yield title, paragraphs
        title, paragraphs = detokenize_wikitext(heading.group(1)), []
      elif line.strip() and not line.strip().startswith("="):
        paragraphs.extend(detokenize_wikitext(line).split("<unk>"))
  if paragraphs:
    yield title, paragraphs


@eval_set("wikitext2_test")
def _wikitext2_test(data_dir: Path) -> Iterator[tuple[str, list[str]]]:
  return _wikitext2(data_dir, "test")


@eval_set("wikitext2_valid")
def _wikitext2_valid(data_dir: Path) -> Iterator[tuple[str, list[str]]]:
  return _wikitext2(data_dir, "valid")


# --- hashing ----------------------------------------------------------------------------------------

def tokenize(text: str) -> list[str]:
  """Lower-cased letter/digit runs; punctuation and underscores separate tokens."""
  return _TOKEN_RE.findall(text.lower())


def _token_hashes(tokens: list[str]) -> np.ndarray:
  if len(_token_cache) > _CACHE_MAX:
    _token_cache.clear()
  return np.fromiter(map(_token_cache.__getitem__, tokens), dtype=np.uint64, count=len(tokens))


def worded(tokens: list[str], n: int) -> np.ndarray:
  """For each n-gram of `tokens`: True when at least half (ceil(n/2)) of its tokens are not numbers."""
  has_letter = np.fromiter((not t.isdigit() for t in tokens), dtype=np.int32, count=len(tokens))
  c = np.concatenate([[0], np.cumsum(has_letter)])
  return (c[n:] - c[:-n]) >= (n + 1) // 2


def ngram_hashes(tokens: list[str], n: int) -> np.ndarray:
  """uint64 hash of every n-gram of `tokens`, in order (empty when fewer than n tokens)."""
  m = len(tokens) - n + 1
  if m <= 0:
    return np.empty(0, dtype=np.uint64)
  h = _token_hashes(tokens)
  acc = h[:m].copy()
  for i in range(1, n):  # integer array arithmetic wraps mod 2^64 without warnings
    acc *= _P
    acc += h[i:i + m]
  return fmix64(acc)  # spreads the polynomial's low-bit structure over all bits


class NgramIndex:
  """Distinct n-gram hashes of one eval set (sorted) and the items that have each.

  `hashes[i]` is held by items `item_owners[starts[i]:starts[i + 1]]` (ascending), `owners[i]` being
  the first of them. Most n-grams belong to one item, but some items are variants of one another
  (GSM8K test 418 and 558 are one locker problem asked forwards and backwards, sharing 11 13-grams;
  HumanEval/56 and /61 are one bracket-matching task with "<>" and "()"; 23 HumanEval tests share a
  boilerplate line), and a report of which items leaked must name every one that holds a match.
  """

  def __init__(self, name: str, items: Iterator[tuple[str, list[str]]], n: int):
    self.name = name
    self.n = n
    self.item_ids: list[str] = []
    self.uncovered = 0  # items left with no indexed n-gram
    hashes, owners = [], []
    for item_id, segments in items:
      k = len(self.item_ids)
      self.item_ids.append(item_id)
      grams = []
      for segment in segments:
        tokens = tokenize(segment)
        if len(tokens) >= n:
          g = ngram_hashes(tokens, n)[worded(tokens, n)]
          if len(g):
            grams.append(g)
      if not grams:
        self.uncovered += 1
        continue
      g = np.concatenate(grams)
      hashes.append(g)
      owners.append(np.full(len(g), k, dtype=np.int32))
    if not self.item_ids:
      raise DataError(f"eval set {name!r} has no items")
    all_h = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
    all_o = np.concatenate(owners) if owners else np.empty(0, np.int32)
    # Distinct (hash, item) pairs sorted by hash, then item: each hash's first owner is its lowest
    # item index, so owners are deterministic.
    order = np.lexsort((all_o, all_h))
    all_h, all_o = all_h[order], all_o[order]
    new_hash = np.ones(len(all_h), dtype=bool)
    new_hash[1:] = all_h[1:] != all_h[:-1]
    new_pair = new_hash.copy()
    new_pair[1:] |= all_o[1:] != all_o[:-1]
    all_h, all_o, new_hash = all_h[new_pair], all_o[new_pair], new_hash[new_pair]
    self.hashes = all_h[new_hash]
    self.item_owners = all_o
    self.starts = np.append(np.flatnonzero(new_hash), len(all_o)).astype(np.int32)
    self.owners = all_o[self.starts[:-1]]

  def locate(self, grams: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct hashes of `grams` found in this set, index of each one's first owning item, position
    in `grams` of its first occurrence)."""
    empty = np.empty(0, np.uint64), np.empty(0, np.int32), np.empty(0, np.int64)
    if not len(self.hashes) or not len(grams):
      return empty
    idx = np.searchsorted(self.hashes, grams)
    idx[idx == len(self.hashes)] = 0
    found = np.flatnonzero(self.hashes[idx] == grams)
    if not len(found):
      return empty
    hits, first = np.unique(grams[found], return_index=True)
    return hits, self.owners[idx[found[first]]], found[first]

  def lookup(self, grams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct hashes of `grams` found in this set, indices of their owning items)."""
    hits, owners, _ = self.locate(grams)
    return hits, owners

  def items_of(self, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (row of `hits`, item index) pair with that item holding that n-gram; `hits` must be
    hashes of this set (as `locate` returns them)."""
    idx = np.searchsorted(self.hashes, hits)
    lo, hi = self.starts[idx], self.starts[idx + 1]
    counts = (hi - lo).astype(np.int64)
    rows = np.repeat(np.arange(len(hits)), counts)
    # Position j of the flattened ranges: lo of its row plus j minus the row's start in the output.
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, self.item_owners[np.repeat(lo, counts) + offsets]


_indexes: dict[tuple[str, str, int], NgramIndex] = {}


def _index(name: str, data_dir: Path, n: int) -> NgramIndex:
  """The set's index, built once per process (stages constructed again in one worker reuse it)."""
  key = (name, str(data_dir.resolve()), n)
  if key not in _indexes:
    _indexes[key] = NgramIndex(name, EVAL_SETS[name](data_dir), n)
  return _indexes[key]


def named_index(name: str, n: int = 13, data_dir: str | Path = "") -> NgramIndex:
  """The registered eval set `name`'s index (cached per process); data_dir "" = the shared folder."""
  if name not in EVAL_SETS:
    raise DataError(f"unknown eval set {name!r}; known: {sorted(EVAL_SETS)}")
  return _index(name, Path(data_dir) if data_dir else shared_data_dir(), n)


class Matcher:
  """Several sets' NgramIndexes behind one Bloom prefilter: the n-grams of a text each set holds.

  One code path for the `decontam` stage and the contamination report (`data.contamination`).
  """

  def __init__(self, indexes: list[NgramIndex]):
    ns = {ix.n for ix in indexes}
    if len(ns) != 1:
      raise ValueError(f"indexes built with different n: {sorted(ns)}")
    self.indexes = list(indexes)
    self.n = ns.pop()
    # A one-hash Bloom filter over all sets, 16+ slots per n-gram (<= 6% occupied): nearly every
    # document n-gram is rejected by one array read instead of a binary search per set (3x faster).
    total = sum(len(ix.hashes) for ix in self.indexes)
    bits = min(max(16, (16 * total).bit_length()), 30)
    self._shift = np.uint64(64 - bits)
    self._prefilter = np.zeros(1 << bits, dtype=bool)
    for ix in self.indexes:
      self._prefilter[ix.hashes >> self._shift] = True

  def find(self, tokens: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{set: `NgramIndex.locate` of the n-grams of `tokens` (positions are token offsets)} for the
    sets sharing at least one n-gram; `tokens` as `tokenize` gives them."""
    if len(tokens) < self.n:
      return {}
    grams = ngram_hashes(tokens, self.n)
    where = np.flatnonzero(self._prefilter[grams >> self._shift])
    if not len(where):
      return {}
    out = {}
    for ix in self.indexes:
      hits, owners, first = ix.locate(grams[where])
      if len(hits):
        out[ix.name] = (hits, owners, where[first])
    return out


@register
class Decontaminate(Stage):
  """Removes (or flags) documents sharing >= min_hits n-grams with an evaluation set."""
  name = "decontam"
  defaults = {
      "eval_sets": ("gsm8k_test", "humaneval", "wikitext2_test"),
      "data_dir": "",        # "" = $SHARED_DATA or ../shared/data next to the repository
      "n": 13,               # GPT-3, Appendix C
      "mode": "remove",      # or "flag": keep, set meta["contaminated"]
      "min_hits": 1,         # distinct shared n-grams with one set that make a document contaminated
      "record_items": True,  # count documents per eval item ("item:<set>:<id>")
  }

  def __init__(self, **config: Any):
    super().__init__(**config)
    c = self.config
    sets = c["eval_sets"]
    if isinstance(sets, str) or not isinstance(sets, (tuple, list)) or not sets:
      raise DataError(f"stage 'decontam': eval_sets must be a non-empty tuple of names, got {sets!r}")
    unknown = sorted(set(sets) - set(EVAL_SETS))
    if unknown:
      raise DataError(f"stage 'decontam': unknown eval set(s) {unknown}; known: {sorted(EVAL_SETS)}")
    for opt, lo in (("n", 3), ("min_hits", 1)):
      v = c[opt]
      if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise DataError(f"stage 'decontam': {opt} must be an int >= {lo}, got {v!r}")
    if c["mode"] not in ("remove", "flag"):
      raise DataError(f"stage 'decontam': mode must be 'remove' or 'flag', got {c['mode']!r}")
    if not isinstance(c["data_dir"], str):
      raise DataError(f"stage 'decontam': data_dir must be a string, got {c['data_dir']!r}")
    self.eval_sets = tuple(dict.fromkeys(sets))  # drop repeats, keep order
    self.indexes: list[NgramIndex] | None = None
    self.uncovered: dict[str, int] = {}
    self.matcher: Matcher | None = None

  def setup(self) -> None:
    self.indexes = [named_index(name, self.config["n"], self.config["data_dir"])
                    for name in self.eval_sets]
    self.uncovered = {ix.name: ix.uncovered for ix in self.indexes}
    self.matcher = Matcher(self.indexes)

  def matches(self, text: str) -> dict[str, tuple[int, list[str]]]:
    """{set: (distinct shared n-grams, ids of the items they come from)} for sets with >= min_hits."""
    if self.matcher is None:
      self.setup()
    out = {}
    found = self.matcher.find(tokenize(text))
    for ix in self.indexes:
      if ix.name in found and len(found[ix.name][0]) >= self.config["min_hits"]:
        hits, owners, _ = found[ix.name]
        out[ix.name] = (len(hits), [ix.item_ids[k] for k in np.unique(owners)])
    return out

  def process(self, doc: Doc) -> Doc | str:
    found = self.matches(doc.text)
    if not found:
      return doc
    self.counts["docs_contaminated"] += 1
    for name, (n_hits, items) in found.items():
      self.counts[f"docs:{name}"] += 1
      self.counts[f"ngrams:{name}"] += n_hits
      if self.config["record_items"]:
        for item in items:
          self.counts[f"item:{name}:{item}"] += 1
    if self.config["mode"] == "remove":
      return "contaminated"
    doc.meta["contaminated"] = sorted(found)
    return doc


def contamination_summary(counts: Mapping[str, int]) -> dict[str, Any]:
  """Folds the stage's counters into {"docs_contaminated": n, "sets": {set: {"docs", "ngrams",
  "items": {item id: docs}}}}, items sorted by document count (then id)."""
  sets: dict[str, dict[str, Any]] = {}
  for key, value in counts.items():
    kind, _, rest = key.partition(":")
    if kind in ("docs", "ngrams"):
      sets.setdefault(rest, {"docs": 0, "ngrams": 0, "items": {}})[kind] += value
    elif kind == "item":
      name, _, item = rest.partition(":")
      sets.setdefault(name, {"docs": 0, "ngrams": 0, "items": {}})["items"][item] = value
  for s in sets.values():
    s["items"] = dict(sorted(s["items"].items(), key=lambda kv: (-kv[1], kv[0])))
  return {"docs_contaminated": int(counts.get("docs_contaminated", 0)),
          "sets": dict(sorted(sets.items()))}
