"""Contamination report: which evaluation examples share an n-gram with a model's training data.

  python -m data.contamination --manifest=~/.cache/jaxlm/shards/<key>/manifest.json
  python -m data.contamination --manifest=runs/curate/v1/shards --eval=gsm8k_test,humaneval \\
      --n=13 --out=contamination.json
  python -m data.contamination --manifest="web=/data/cc/*.jsonl.zst,books=/data/books" \\
      --eval=gsm8k_test,evals/my_set.jsonl

prints a table (per eval set, its most contaminated examples, per training source) and, with --out,
writes the full report as JSON. From Python: `contamination_report(manifest, evals)` returns it.

Matching is the curation stage's (`data.curate.decontam`; one code path: `tokenize`, `NgramIndex`,
`Matcher`): text is lower-cased and split into letter/digit runs, so case, punctuation and whitespace
do not matter, and an eval example is *contaminated* when any one of its n-grams (default 13, GPT-3
Appendix C) occurs in a training document. Eval n-grams that are mostly numbers are not indexed, and
examples with fewer than n words cannot be detected (`uncovered` in the report); decontam's docstring
gives the reasons and the counts.

Training side (`--manifest`, comma-separated items, each `spec` or `label=spec`):
  * a shard manifest, i.e. what training reads (`manifest.json` or the directory holding it, written
    by `data.shards.build_shards` through `python -m data.prepare` or `data.curate`'s mix step): the
    documents of its `train` split (`--splits=train,val` adds the held-out ones) decoded back to text.
    The tokenizer is lossless (decode(encode(s)) == s), so this is exactly the text trained on, after
    every curation filter. The tokenizer is `--tokenizer`, else `tokenizer.model` beside the manifest
    (data.curate), else the model with the manifest's `tokenizer_sha256` in the data.prepare cache
    (<cache>/tokenizers/*.model for <cache>/shards/<key>/manifest.json). Sources are the manifest's
    domains ("label/domain" when labelled). Upsampled copies (a domain's `epochs`) are consecutive
    identical records: each document is scanned once, its copies counted in `records`.
  * anything else: raw documents (`data.readers`: a file, directory or glob of text / JSON lines /
    Parquet), one source named by the label, else by the path's file name.
Documents are streamed one at a time; memory holds the eval indexes (~20 bytes per n-gram) and one
bit per eval n-gram per (source, eval set).

Eval sets (`--eval`, comma-separated, default the four registered ones), each a registered name read
from the shared data folder ($SHARED_DATA, else ../shared/data beside the repository; `--data_dir`):
gsm8k_test (question + answer), humaneval (prompt + canonical solution, and the test code: a copy of
the tests leaks the answers too), wikitext2_test and wikitext2_valid (detokenized: " @-@ " -> "-",
" @,@ " -> ",", ..., and cut at every "<unk>"); or a file:
  * JSON lines (.jsonl / .json, optionally .gz): one example per line, its text the fields it has among
    TEXT_FIELDS ("text", "question", "answer", "prompt", "canonical_solution", "completion", "test"),
    joined by newlines (at least one is required); its id the "id" or "task_id" field, else the
    0-based row number (as the registered gsm8k_test numbers its rows);
  * any other file: plain text, one example per paragraph (blank-line separated), id "line <k>"
    (the paragraph's first line, 1-based).

Report: per eval set `examples`, `uncovered`, `ngrams` (indexed), `contaminated` (examples with >= 1
n-gram in training), `fraction`, `overlap_ngrams` (distinct eval n-grams found in training),
`contaminated_ids` (all of them), `top` (the `--top` examples with most overlapping n-grams: counts,
one matched n-gram as normalized words, the training source and document it was found in); per
training source `docs`, `records`, `chars`, `docs_contaminated`, and per eval set `docs`,
`overlap_ngrams`, `contaminated` (examples). Bad input (missing manifest, shard or tokenizer, unknown
eval set, malformed eval file) exits 2 with one line naming it.

Measured on the 2-core CI machine, one core: the data.prepare stdlib corpus (vocab 4096, 1,439 train
documents, 13.8 M chars) against the four default sets in 5.5 s wall, 80 MB resident: 1.6 s building
the indexes, 2.5 s decoding the shards (1.4 s of it Tokenizer.decode's per-id Python check), 1.6 s
tokenizing and matching. No overlap found (the stdlib holds no GSM8K, HumanEval or WikiText text).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from configs.loader import main_guard
from data.curate import decontam
from data.errors import DataError
from data.readers import expand_paths, iter_documents
from data.shards import SPLITS, load_manifest
from data.tasks import shared_data_dir
from data.tokenizer import Tokenizer

DEFAULT_EVALS = ("gsm8k_test", "humaneval", "wikitext2_test", "wikitext2_valid")
TEXT_FIELDS = ("text", "question", "answer", "prompt", "canonical_solution", "completion", "test")
_LABEL_RE = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$")
_JSONL_RE = re.compile(r"\.jsonl?(\.gz)?$")
# Records per ArrayRecord read call: 256 documents of ~4 KB of ids, ~1 MB per call.
_READ_BATCH = 256


# --- training side ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Source:
  """One training source. `docs()` yields (document id, text), text None for a record that repeats
  the previous one (an upsampled copy: trained on again, not scanned again)."""
  label: str
  kind: str  # "shards" or "raw"
  path: str
  docs: Callable[[], Iterator[tuple[str, str | None]]]


def _shard_docs(root: Path, files: list[str], dtype: np.dtype, tok: Tokenizer,
                expected: int) -> Iterator[tuple[str, str | None]]:
  read, prev = 0, None  # copies may straddle two files of a split
  for rel in files:
    try:
      reader = ArrayRecordReader(str(root / rel), "readahead_buffer_size:16M")
      total = reader.num_records()
    except Exception as e:  # array_record raises bare RuntimeError/ValueError for corrupt files
      raise DataError(f"{root / rel}: corrupt shard: {e}") from None
    if not reader.ok():  # a bad file opens "not ok", reads as 0 records and raises only on close()
      try:
        reader.close()
      except Exception as e:
        raise DataError(f"{root / rel}: corrupt shard: {e}") from None
      raise DataError(f"{root / rel}: corrupt shard")
    try:
      for start in range(0, total, _READ_BATCH):
        try:
          records = reader.read(start, min(start + _READ_BATCH, total))
        except Exception as e:
          raise DataError(f"{root / rel}: corrupt shard at record {start}: {e}") from None
        for j, record in enumerate(records, start):
          if record == prev:
            yield f"{rel}#{j}", None
          else:
            try:
              text = tok.decode(np.frombuffer(record, dtype).tolist())
            except ValueError as e:  # an id outside the vocabulary
              raise DataError(f"{root / rel} record {j}: {e}") from None
            yield f"{rel}#{j}", text
          prev = record
    finally:
      reader.close()
    read += total
  if read != expected:
    raise DataError(f"{root / 'manifest.json'}: {read} records on disk in {files}, manifest says "
                    f"{expected}")


def _raw_docs(files: list[Path]) -> Iterator[tuple[str, str | None]]:
  for path in files:
    for doc in iter_documents(path):
      yield doc.id, doc.text


def find_tokenizer(manifest: dict, tokenizer: str | Path = "") -> Tokenizer:
  """The tokenizer a loaded manifest's shards were built with (lookup order: module docstring)."""
  want, root = manifest["tokenizer_sha256"], Path(manifest["root"])
  if tokenizer:
    tok = Tokenizer.load(Path(tokenizer).expanduser())
    if tok.sha256 != want:
      raise DataError(f"{tokenizer}: tokenizer sha256 {tok.sha256[:12]}, but {root / 'manifest.json'} "
                      f"was built with {want[:12]}")
    return tok
  # data.prepare's cache: <cache>/shards/<key>/manifest.json and <cache>/tokenizers/<key>.model.
  for path in [root / "tokenizer.model", *sorted((root.parent.parent / "tokenizers").glob("*.model"))]:
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == want:
      return Tokenizer.load(path)
  raise DataError(f"{root / 'manifest.json'}: its tokenizer (sha256 {want[:12]}) is neither beside it "
                  "nor in the data.prepare cache; give --tokenizer")


def training_sources(spec: str, tokenizer: str | Path = "",
                     splits: tuple[str, ...] = ("train",)) -> list[Source]:
  """`--manifest`'s items -> sources (see the module docstring); DataError on bad input."""
  bad = sorted(set(splits) - set(SPLITS))
  if bad or not splits:
    raise DataError(f"splits must be a non-empty subset of {SPLITS}, got {list(splits)}")
  items = [s.strip() for s in spec.split(",") if s.strip()]
  if not items:
    raise DataError("no training data given: --manifest takes a shard manifest or corpus path(s)")
  sources: list[Source] = []
  for item in items:
    m = _LABEL_RE.match(item)
    label, path_spec = (m.group(1), m.group(2)) if m and not Path(item).exists() else ("", item)
    path = Path(path_spec).expanduser()
    if path.name == "manifest.json" or (path / "manifest.json").is_file():
      man = load_manifest(path)
      tok = find_tokenizer(man, tokenizer)
      root, dtype = Path(man["root"]), np.dtype(man["dtype"]).newbyteorder("<")
      for domain, entry in man["domains"].items():
        files = [f for s in splits for f in entry[s]["files"]]
        expected = sum(entry[s]["docs"] for s in splits)
        sources.append(Source(
            f"{label}/{domain}" if label else domain, "shards", str(root / "manifest.json"),
            lambda root=root, files=files, expected=expected, tok=tok, dtype=dtype:
                _shard_docs(root, files, dtype, tok, expected)))
    else:
      files = expand_paths(path_spec)
      sources.append(Source(label or path.name, "raw", path_spec,
                            lambda files=files: _raw_docs(files)))
  labels = [s.label for s in sources]
  twice = sorted({x for x in labels if labels.count(x) > 1})
  if twice:
    raise DataError(f"training source name(s) {twice} occur twice; label them: label=path,...")
  return sources


# --- eval side ----------------------------------------------------------------------------------------

def _jsonl_items(path: Path) -> Iterator[tuple[str, list[str]]]:
  for i, row in enumerate(decontam.iter_jsonl(path)):
    texts = [row[f] for f in TEXT_FIELDS if isinstance(row, dict) and isinstance(row.get(f), str)]
    if not texts:
      raise DataError(f"{path} line {i + 1}: no text field (expected one of {', '.join(TEXT_FIELDS)})")
    item_id = next((row[k] for k in ("id", "task_id") if k in row), i)
    yield str(item_id), ["\n".join(texts)]


def _text_items(path: Path) -> Iterator[tuple[str, list[str]]]:
  try:
    lines = path.read_text(encoding="utf-8").split("\n")
  except UnicodeDecodeError:
    raise DataError(f"{path}: not UTF-8 text") from None
  start, para = 0, []
  for k, line in enumerate(lines + [""], 1):
    if line.strip():
      start, para = (start or k), para + [line]
    elif para:
      yield f"line {start}", ["\n".join(para)]
      start, para = 0, []


def eval_indexes(spec: str | tuple[str, ...], n: int = 13,
                 data_dir: str | Path = "") -> list[tuple[decontam.NgramIndex, str]]:
  """`--eval`'s items -> (index, origin) per eval set: registered names, or files (JSONL or text)."""
  if not isinstance(n, int) or n < 3:
    raise DataError(f"n must be an int >= 3, got {n!r}")
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  items = list(dict.fromkeys(s.strip() for s in items if s.strip()))
  if not items:
    raise DataError(f"no eval sets given; known names: {', '.join(sorted(decontam.EVAL_SETS))}")
  out = []
  for item in items:
    path = Path(item).expanduser()
    if item in decontam.EVAL_SETS:
      data_dir = data_dir or shared_data_dir()  # DataError naming the folder when it is absent
      out.append((decontam.named_index(item, n, data_dir), item))
    elif path.is_file():
      loader = _jsonl_items if _JSONL_RE.search(path.name) else _text_items
      out.append((decontam.NgramIndex(path.name, loader(path), n), str(path)))
    else:
      raise DataError(f"unknown eval set {item!r}: not a known name "
                      f"({', '.join(sorted(decontam.EVAL_SETS))}) nor an existing file")
  names = [ix.name for ix, _ in out]
  twice = sorted({x for x in names if names.count(x) > 1})
  if twice:
    raise DataError(f"eval set name(s) {twice} occur twice (files with the same name?)")
  return out


# --- scanning -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class _SourceTally:
  docs: int = 0
  records: int = 0
  chars: int = 0
  docs_contaminated: int = 0
  set_docs: dict[str, int] = dataclasses.field(default_factory=dict)
  seen: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # per set: eval n-gram found


class _Tally:
  """Counts over the training documents; memory is bounded by the eval indexes, not the corpus."""

  def __init__(self, indexes: list[decontam.NgramIndex], labels: list[str]):
    self.indexes = {ix.name: ix for ix in indexes}
    self.matcher = decontam.Matcher(indexes)
    self.n = self.matcher.n
    self.sources = {
        label: _SourceTally(set_docs={ix.name: 0 for ix in indexes},
                            seen={ix.name: np.zeros(len(ix.hashes), bool) for ix in indexes})
        for label in labels}
    # Per set: item index -> (matched n-gram, source, doc id) of the first training hit.
    self.examples: dict[str, dict[int, tuple[str, str, str]]] = {ix.name: {} for ix in indexes}

  def add(self, label: str, doc_id: str, text: str | None) -> None:
    st = self.sources[label]
    st.records += 1
    if text is None:  # an upsampled copy of the previous document
      return
    st.docs += 1
    st.chars += len(text)
    tokens = decontam.tokenize(text)
    found = self.matcher.find(tokens)
    if not found:
      return
    st.docs_contaminated += 1
    for name, (hits, _, where) in found.items():
      ix, examples = self.indexes[name], self.examples[name]
      st.set_docs[name] += 1
      st.seen[name][np.searchsorted(ix.hashes, hits)] = True
      rows, items = ix.items_of(hits)
      for r, k in zip(rows.tolist(), items.tolist()):
        if k not in examples:
          w = int(where[r])
          examples[k] = (" ".join(tokens[w:w + self.n]), label, doc_id)

  def per_item(self, name: str, seen: np.ndarray) -> np.ndarray:
    """Distinct overlapping n-grams of each item of set `name`, given which of its n-grams were seen."""
    ix = self.indexes[name]
    _, items = ix.items_of(ix.hashes[seen])
    return np.bincount(items, minlength=len(ix.item_ids))


def contamination_report(manifest: str, evals: str | tuple[str, ...] = DEFAULT_EVALS, *, n: int = 13,
                         tokenizer: str = "", splits: tuple[str, ...] = ("train",),
                         data_dir: str = "", top: int = 5) -> dict[str, Any]:
  """Scans the training data named by `manifest` for the eval sets' n-grams; the report dict (see the
  module docstring)."""
  indexes = eval_indexes(evals, n, data_dir)
  sources = training_sources(manifest, tokenizer, splits)
  tally = _Tally([ix for ix, _ in indexes], [s.label for s in sources])
  for source in sources:
    for doc_id, text in source.docs():
      tally.add(source.label, doc_id, text)

  sets = {}
  for ix, origin in indexes:
    seen = np.logical_or.reduce([st.seen[ix.name] for st in tally.sources.values()])
    per_item = tally.per_item(ix.name, seen)
    item_ngrams = np.bincount(ix.item_owners, minlength=len(ix.item_ids))
    hit = np.flatnonzero(per_item)
    ranked = sorted(hit.tolist(), key=lambda k: (-per_item[k], k))[:top]
    examples = tally.examples[ix.name]
    assert set(examples) == set(hit.tolist()), ix.name  # the same hits, counted two ways
    sets[ix.name] = {
        "origin": origin,
        "examples": len(ix.item_ids),
        "uncovered": ix.uncovered,
        "ngrams": len(ix.hashes),
        "contaminated": len(hit),
        "fraction": len(hit) / len(ix.item_ids),
        "overlap_ngrams": int(seen.sum()),
        "contaminated_ids": [ix.item_ids[k] for k in hit],
        "top": [{"id": ix.item_ids[k], "ngrams": int(per_item[k]), "item_ngrams": int(item_ngrams[k]),
                 "ngram": examples[k][0], "source": examples[k][1], "doc": examples[k][2]}
                for k in ranked],
    }
  by_source = {}
  for source in sources:
    st = tally.sources[source.label]
    by_source[source.label] = {
        "kind": source.kind, "path": source.path, "docs": st.docs, "records": st.records,
        "chars": st.chars, "docs_contaminated": st.docs_contaminated,
        "sets": {name: {"docs": st.set_docs[name], "overlap_ngrams": int(st.seen[name].sum()),
                        "contaminated": int(np.count_nonzero(tally.per_item(name, st.seen[name])))}
                 for name in tally.indexes},
    }
  return {"n": tally.n, "manifest": manifest, "splits": list(splits), "eval_sets": sets,
          "sources": by_source}


# --- output -------------------------------------------------------------------------------------------

def format_report(report: dict[str, Any]) -> str:
  """The report as a few fixed-width tables."""
  n, sets, sources = report["n"], report["eval_sets"], report["sources"]
  docs = sum(s["docs"] for s in sources.values())
  chars = sum(s["chars"] for s in sources.values())
  splits = (f", shard splits {','.join(report['splits'])}"
            if any(s["kind"] == "shards" for s in sources.values()) else "")
  lines = [f"{n}-gram overlap of {len(sets)} eval set(s) with {docs:,} training documents "
           f"({chars / 1e6:,.1f} M chars, {len(sources)} source(s){splits})", ""]
  w = max(len("eval set"), *map(len, sets))
  lines.append(f"{'eval set':<{w}}  {'examples':>8}  {'uncovered':>9}  {'contaminated':>12}  "
               f"{'fraction':>8}  {'overlap n-grams':>21}")
  for name, s in sets.items():
    lines.append(f"{name:<{w}}  {s['examples']:>8,}  {s['uncovered']:>9,}  {s['contaminated']:>12,}  "
                 f"{s['fraction']:>8.2%}  {s['overlap_ngrams']:>9,} / {s['ngrams']:>9,}")
  tops = [(name, t) for name, s in sets.items() for t in s["top"]]
  if tops:
    lines += ["", "most contaminated examples (n-grams found / indexed; one match; where):"]
    for name, t in tops:
      ngram = t["ngram"] if len(t["ngram"]) <= 60 else t["ngram"][:57] + "..."
      lines.append(f"  {name} {t['id']}: {t['ngrams']}/{t['item_ngrams']}  \"{ngram}\"  "
                   f"{t['source']}: {t['doc']}")
  w = max(len("source"), *map(len, sources))
  head = "".join(f"  {name:>{max(len(name), 9)}}" for name in sets)
  lines += ["", f"{'source':<{w}}  {'docs':>9}  {'contam.':>7}{head}   (contaminated docs / examples)"]
  for label, s in sources.items():
    cells = "".join(f"  {'%d/%d' % (c['docs'], c['contaminated']):>{max(len(name), 9)}}"
                    for name, c in s["sets"].items())
    lines.append(f"{label:<{w}}  {s['docs']:>9,}  {s['docs_contaminated']:>7,}{cells}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m data.contamination", description=__doc__.split("\n")[0])
  p.add_argument("--manifest", required=True,
                 help="shard manifest (file or dir) or corpus path(s): [label=]spec,...")
  p.add_argument("--eval", default=",".join(DEFAULT_EVALS), help="eval set names or files, a,b,...")
  p.add_argument("--n", type=int, default=13, help="n-gram length in words (GPT-3: 13)")
  p.add_argument("--out", default="", help="write the JSON report here")
  p.add_argument("--tokenizer", default="", help="the shards' tokenizer.model (default: found)")
  p.add_argument("--splits", default="train", help="manifest splits to scan: train[,val]")
  p.add_argument("--data_dir", default="", help="shared data folder (default $SHARED_DATA)")
  p.add_argument("--top", type=int, default=5, help="examples listed per eval set")
  args = p.parse_args(argv)

  def go() -> int:
    report = contamination_report(
        args.manifest, args.eval, n=args.n, tokenizer=args.tokenizer, data_dir=args.data_dir,
        splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()), top=args.top)
    print(format_report(report))
    if args.out:
      out = Path(args.out).expanduser()
      try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
      except OSError as e:
        raise DataError(f"{out}: cannot write the report: {e.strerror}") from None
    return 0

  return main_guard(go)


if __name__ == "__main__":
  sys.exit(main())
