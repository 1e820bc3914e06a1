"""Tokenized shards: documents -> [bos] + ids + [eos] -> one ArrayRecord record each, plus a manifest.

Library module, no entry point (`data.prepare` calls `build_shards`). Layout of `out_dir`:

  manifest.json                              see below; `load_manifest` validates it
  <domain>/train-00000.array_record ...      one record per document: raw little-endian token ids
  <domain>/val-00000.array_record ...        (uint16 when vocab <= 65536, else uint32)

  {"format": 2, "tokenizer_sha256", "vocab_size", "dtype", "bos_id", "eos_id", "pad_id",
   "val_fraction",
   "domains": {name: {"train": {"files": [relative paths], "docs", "unique_docs", "tokens"},
                      "val": {...}, "epochs", "read", "dropped": {"empty"}, "sources": [input files]}},
   "dropped": {"empty": n}, "read": n, "provenance": {...}, "weights": {name: w} (optional)}

Counts reconcile: read = sum(train.unique_docs + val.unique_docs) + sum(dropped). `epochs` upsamples a
domain's training documents (3.0 = every document three times; 1.5 = every document once plus a
hash-chosen half of them again), so its share of a token-weighted mixture grows by that factor; val
documents are never repeated, so evaluation stays unbiased. A document goes to `val` when a
hash of its id falls below `val_fraction`, so the split of a document never changes when files are
added or reordered. Tokenization runs in a process pool (tokenizer loaded once per worker, documents
sent in ~1 MB chunks); the main process reads, splits and writes, in input order, so the output is
identical for any worker count. Records are written with `group_size:1` because Grain reads them at
random (a larger group would decompress a whole group per document read). The build goes to a temp
directory renamed into place at the end: a crash leaves no half-written shard set behind.
"""
from __future__ import annotations

import collections
from concurrent import futures
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from data.errors import DataError
from data.readers import Document, ReadStats, iter_documents
from data.tokenizer import Tokenizer

FORMAT = 3  # 2: the manifest records the sources' provenance; 3: epochs, unique_docs, weights
SPLITS = ("train", "val")
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# ~1 MB of text per task: ~0.15 s of SentencePiece work (7 MB/s per core), against ~2 ms of pickling
# and IPC; small enough that a 14 MB corpus still splits into enough tasks to keep every worker busy.
_CHUNK_CHARS = 1_000_000
_CHUNK_DOCS = 1024
# group_size:1 = every record its own chunk, which Grain's random access needs (see docstring); zstd:3
# (ArrayRecord's default) stores the stdlib code's 7.2 MB of uint16 ids in 3.1 MB and decodes them at
# ~200 MB/s.
_WRITER_OPTIONS = "group_size:1,zstd:3"


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def is_val(doc_id: str, val_fraction: float) -> bool:
  """Deterministic split: the first 8 bytes of blake2b(id) as a fraction of 2**64."""
  h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")
  return h < val_fraction * 2.0**64


# --- tokenization workers ---------------------------------------------------------------------------

_WORKER_TOK: Tokenizer | None = None


def _init_worker(model_proto: bytes) -> None:
  global _WORKER_TOK
  _WORKER_TOK = Tokenizer.from_bytes(model_proto)


def _tokenize_chunk(args: tuple[list[str], str]) -> list[bytes]:
  texts, dtype = args
  tok = _WORKER_TOK
  assert tok is not None
  out = []
  # One thread: processes are the parallelism. (SentencePiece's own batch threads gave no speedup:
  # 2.05 s with all cores vs 2.09 s with one for the 11 MB of stdlib code.)
  for ids in tok.encode_batch(texts, bos=True, eos=True, num_threads=1):
    out.append(np.asarray(ids, dtype=dtype).tobytes())
  return out


def _spawn_safe() -> bool:
  """False when spawned workers could not re-import __main__ (a script piped to `python -`)."""
  main_file = getattr(sys.modules.get("__main__"), "__file__", None)
  return main_file is None or os.path.exists(main_file)


def _chunks(docs: Iterator[tuple[str, Document]]) -> Iterator[list[tuple[str, Document]]]:
  chunk, chars = [], 0
  for item in docs:
    chunk.append(item)
    chars += len(item[1].text)
    if chars >= _CHUNK_CHARS or len(chunk) >= _CHUNK_DOCS:
      yield chunk
      chunk, chars = [], 0
  if chunk:
    yield chunk


# --- writing ----------------------------------------------------------------------------------------

class _SplitWriter:
  """Writes one domain/split as numbered ArrayRecord files of at most `docs_per_shard` records."""

  def __init__(self, root: Path, domain: str, split: str, docs_per_shard: int):
    self._root, self._domain, self._split = root, domain, split
    self._docs_per_shard = docs_per_shard
    self._writer = None
    self._in_file = 0
    self.files: list[str] = []
    self.docs = 0
    self.unique_docs = 0  # docs before upsampling (`epochs` writes one document several times)
    self.tokens = 0

  def write(self, record: bytes, n_tokens: int) -> None:
    if self._writer is None or self._in_file >= self._docs_per_shard:
      self.close()
      rel = f"{self._domain}/{self._split}-{len(self.files):05d}.array_record"
      (self._root / rel).parent.mkdir(parents=True, exist_ok=True)
      self._writer = ArrayRecordWriter(str(self._root / rel), _WRITER_OPTIONS)
      self.files.append(rel)
      self._in_file = 0
    self._writer.write(record)
    self._in_file += 1
    self.docs += 1
    self.tokens += n_tokens

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def summary(self) -> dict:
    return {"files": list(self.files), "docs": self.docs, "unique_docs": self.unique_docs,
            "tokens": self.tokens}


def build_shards(sources: dict[str, list[Path]], tokenizer_path: str | Path, out_dir: str | Path, *,
                 val_fraction: float = 0.01, num_workers: int | None = None,
                 docs_per_shard: int = 16_384, provenance: dict | None = None,
                 epochs: dict[str, float] | None = None, weights: dict[str, float] | None = None
                 ) -> dict:
  """Tokenizes every document of every domain into `out_dir`; returns the manifest (also written).

  `provenance`: recorded as-is under the manifest's "provenance" key (what the sources are, e.g. the
  embedded corpus's Python version and content hash).

  `num_workers`: tokenizer processes; None or 0 = all CPUs, 1 = in this process (no pool; also
  used when __main__ is not re-importable, e.g. a script read from stdin).
  `docs_per_shard`: records per ArrayRecord file (16K documents of ~4 KB tokens = ~64 MB files).
  `epochs`: per-domain upsampling of training documents (default 1.0; see the module docstring).
  `weights`: default mixture weights recorded in the manifest (`data.pipeline.mixture` uses them
  when the training run gives none).
  An existing `out_dir` is replaced only once the new one is complete.
  """
  if not sources:
    raise DataError("no sources given")
  for name, files in sources.items():
    if not _DOMAIN_RE.match(name):
      raise DataError(f"bad domain name {name!r}: use letters, digits, '_', '-', '.'")
    if not files:
      raise DataError(f"domain {name!r} has no files")
  if not 0.0 <= val_fraction < 1.0:
    raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
  epochs = {name: float(e) for name, e in (epochs or {}).items()}
  for what, values in (("epochs", epochs), ("weights", weights or {})):
    unknown = sorted(set(values) - set(sources))
    if unknown:
      raise DataError(f"{what} name unknown domain(s) {unknown}; domains are {sorted(sources)}")
  bad = {n: e for n, e in epochs.items() if not (e >= 1.0 and math.isfinite(e))}
  if bad:
    raise DataError(f"epochs must be finite and >= 1, got {bad}")
  tok = Tokenizer.load(tokenizer_path)
  dtype = token_dtype(tok.vocab_size)
  out_dir = Path(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  os.chmod(tmp, 0o755)
  try:
    manifest = _build(sources, tok, dtype, tmp, val_fraction, num_workers, docs_per_shard, epochs)
    manifest["provenance"] = dict(provenance or {})
    if weights:
      manifest["weights"] = dict(weights)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _replace_dir(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest


def _build(sources, tok: Tokenizer, dtype: np.dtype, root: Path, val_fraction: float,
           num_workers: int | None, docs_per_shard: int, epochs: dict[str, float]) -> dict:
  stats = {name: ReadStats() for name in sources}
  writers = {(name, split): _SplitWriter(root, name, split, docs_per_shard)
             for name in sources for split in SPLITS}

  def docs() -> Iterator[tuple[str, Document]]:
    for name, files in sources.items():
      for path in files:
        for doc in iter_documents(path, stats[name]):
          yield name, doc

  workers = num_workers or os.cpu_count() or 1
  if workers > 1 and not _spawn_safe():
    workers = 1
  tasks = ((chunk, ([d.text for _, d in chunk], dtype.str)) for chunk in _chunks(docs()))
  if workers == 1:
    _init_worker(tok.to_bytes())
    results = ((chunk, _tokenize_chunk(args)) for chunk, args in tasks)
    _write_all(results, writers, val_fraction, dtype, epochs)
  else:
    # spawn, not fork: the parent may hold threads (grain, JAX) that fork would copy mid-lock. An
    # executor, not multiprocessing.Pool: a worker that dies raises BrokenProcessPool here instead of
    # being respawned forever.
    with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_worker,
                                     initargs=(tok.to_bytes(),)) as pool:
      pending: collections.deque = collections.deque()

      def results():
        # Keep ~2 chunks per worker in flight: enough to hide reading, bounded memory.
        for chunk, args in tasks:
          pending.append((chunk, pool.submit(_tokenize_chunk, args)))
          if len(pending) >= 2 * workers:
            c, r = pending.popleft()
            yield c, r.result()
        while pending:
          c, r = pending.popleft()
          yield c, r.result()

      _write_all(results(), writers, val_fraction, dtype, epochs)
  for w in writers.values():
    w.close()

  domains = {}
  for name in sources:
    s = stats[name]
    entry = {split: writers[name, split].summary() for split in SPLITS}
    kept = entry["train"]["unique_docs"] + entry["val"]["unique_docs"]
    if kept == 0:
      raise DataError(f"domain {name!r}: no non-empty documents in {len(sources[name])} file(s) "
                      f"({s.read} read, {s.empty} empty), e.g. {sources[name][0]}")
    assert kept == s.kept, (name, kept, s.kept)
    entry.update(epochs=epochs.get(name, 1.0), read=s.read, dropped={"empty": s.empty},
                 sources=[str(p) for p in sources[name]])
    domains[name] = entry
  return {
      "format": FORMAT,
      "tokenizer_sha256": tok.sha256,
      "vocab_size": tok.vocab_size,
      "dtype": dtype.name,
      "pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
      "val_fraction": val_fraction,
      "domains": domains,
      "dropped": {"empty": sum(s.empty for s in stats.values())},
      "read": sum(s.read for s in stats.values()),
  }


def copies(doc_id: str, epochs: float) -> int:
  """How many times a training document is written: floor(epochs), plus one for a hash-chosen
  fraction (epochs mod 1) of documents, so 1.5 epochs repeats half of them, the same half every build."""
  whole = math.floor(epochs)
  frac = epochs - whole
  if frac <= 0:
    return whole
  h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8, person=b"epochs").digest(),
                     "little")
  return whole + (h < frac * 2.0**64)


def _write_all(results, writers, val_fraction: float, dtype: np.dtype,
               epochs: dict[str, float]) -> None:
  for chunk, records in results:
    for (name, doc), record in zip(chunk, records):
      split = "val" if is_val(doc.id, val_fraction) else "train"
      writer = writers[name, split]
      n = copies(doc.id, epochs.get(name, 1.0)) if split == "train" else 1
      for _ in range(n):
        writer.write(record, len(record) // dtype.itemsize)
      writer.unique_docs += 1


def _replace_dir(new: Path, target: Path) -> None:
  if target.exists():
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(new, target)


# --- manifest ---------------------------------------------------------------------------------------

def load_manifest(path: str | Path) -> dict:
  """Reads and validates `manifest.json` (or the directory holding it); DataError if bad.

  Returned dict has `root` (the shard directory, absolute) added; shard files are checked to exist.
  """
  path = Path(path)
  if path.is_dir():
    path = path / "manifest.json"
  try:
    m = json.loads(path.read_text())
  except FileNotFoundError:
    raise DataError(f"{path}: manifest not found (run data.prepare first)") from None
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: unreadable or corrupt manifest: {e}") from None
  if not isinstance(m, dict) or m.get("format") != FORMAT:
    raise DataError(f"{path}: not a format-{FORMAT} shard manifest")
  for key in ("tokenizer_sha256", "vocab_size", "dtype", "domains", "dropped", "read"):
    if key not in m:
      raise DataError(f"{path}: manifest lacks {key!r}")
  if m["dtype"] not in ("uint16", "uint32"):
    raise DataError(f"{path}: unsupported token dtype {m['dtype']!r}")
  if not isinstance(m["domains"], dict) or not m["domains"]:
    raise DataError(f"{path}: manifest lists no domains")
  root = path.parent.resolve()
  kept = 0
  for name, d in m["domains"].items():
    for split in SPLITS:
      s = d.get(split) if isinstance(d, dict) else None
      if not isinstance(s, dict) or not {"files", "docs", "unique_docs", "tokens"} <= set(s):
        raise DataError(f"{path}: domain {name!r} lacks a valid {split!r} entry")
      for rel in s["files"]:
        if not (root / rel).is_file():
          raise DataError(f"{path}: shard {root / rel} is missing")
      kept += s["unique_docs"]
  if kept + sum(m["dropped"].values()) != m["read"]:
    raise DataError(f"{path}: counts don't reconcile: kept {kept} + dropped "
                    f"{sum(m['dropped'].values())} != read {m['read']}")
  m["root"] = str(root)
  return m
