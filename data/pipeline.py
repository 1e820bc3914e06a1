"""The Grain input pipeline: token shards -> shuffled, mixed, packed [batch, seq_len] NumPy batches.

Library module, no entry point; `train/` calls it. Usage:

  it = train_iterator(prepared.manifest_path, seq_len=1024, batch_size=8, seed=0,
                      process_index=jax.process_index(), process_count=jax.process_count())
  batch = next(it)                  # dict of np arrays, each [batch_size, seq_len]
  state = it.get_state()            # JSON-serializable; store it with the checkpoint
  it = train_iterator(...same args...); it.set_state(state)   # continues exactly where it was

`batch_size` is per process (host): the global batch is batch_size * process_count.

Recipe (training):
  per domain  MapDataset over its train ArrayRecord files -> this process's records
              (`[process_index::process_count]`, so processes see disjoint documents) -> shuffle(seed)
              -> repeat forever (each epoch reshuffled) -> decode bytes to int32
  mix         MapDataset.mix by weight. Weights are *token* fractions (default: each domain's share of
              the manifest's train tokens); Grain mixes *documents*, so each domain's document rate is
              weight / mean document length, which makes its expected token share equal its weight.
  split       documents longer than seq_len+1 tokens become chunks of seq_len+1 taken every seq_len
              tokens (consecutive chunks share one token), so every next-token pair of the document is
              trained on exactly once and nothing is truncated away; positions restart in each chunk.
  window      chunks are shuffled within consecutive windows of `shuffle_window` chunks (Grain's
              WindowShuffle, checkpointable). Without it a long document's chunks fill consecutive
              batches: a 15k-token stdlib module at seq_len 128 fed ~15 batches of 8 rows from that one
              file in a row, and the loss of a 49k-param model after 2M tokens spread 3.38–3.75 nats
              over three seeds (LOG.md 2026-11-24).
  pack        FirstFitPackIterDataset into rows of seq_len+1 (segment ids 1.., 0 = padding; positions).
  features    inputs = row[:-1], targets = row[1:], segment_ids/positions of row[:-1],
              loss_mask = 1 where the target continues the same segment, 0 at padding/boundaries.
  batch       drop_remainder; then a thread prefetch of `prefetch` batches.

Determinism: every step is a pure function of (manifest, seed, process index/count), so the same seed
gives the same batches, and `set_state` on a fresh iterator replays exactly (packing state points back
to the input position of the last packed group, which is re-packed on restore).
"""
from __future__ import annotations

import atexit
import itertools
import math
import weakref
import zlib
from pathlib import Path
from typing import Any

import grain
import numpy as np

from data.errors import DataError
from data.shards import load_manifest

# Threads that read+decompress records ahead of the packer; reads are ~50 µs each, 2 threads keep up
# with the packer on the 2-core CI machine, more only add contention.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
# First-fit packing bins: more bins -> less padding (stdlib corpus, seq_len 512, batch 8: 16 bins leave
# 2.6% of positions as padding, 64 bins 1.7%), at the cost of restore re-packing up to that many rows.
_MIN_PACKING_BINS = 64
# Chunks shuffled together (`train_iterator(shuffle_window=...)`, config `data.shuffle_window`): 1,024
# chunks hold 130k tokens at seq_len 128 (~25 average stdlib documents) and 4 MB at seq_len 1024;
# 34 MB at 8k. Restore re-reads the current window.
SHUFFLE_WINDOW = 1024


# --- element transforms (classes, not lambdas, so they name themselves in Grain's stats/errors) -----

class _Decode(grain.transforms.Map):

  def __init__(self, dtype: str):
    self._dtype = np.dtype(dtype).newbyteorder("<")

  def map(self, record: bytes) -> np.ndarray:
    return np.frombuffer(record, dtype=self._dtype).astype(np.int32)


class _SplitLong(grain.experimental.FlatMapTransform):
  """Document -> chunks of <= seq_len+1 tokens, stride seq_len (each next-token pair exactly once)."""

  max_fan_out = 1 << 30  # only FlatMapMapDataset preallocates by fan-out; the Iter version does not

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def flat_map(self, tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
    n, L = len(tokens), self._seq_len
    if n <= L + 1:
      return [{"tokens": tokens}]
    return [{"tokens": tokens[s:s + L + 1]} for s in range(0, n - 1, L)]


class _Features(grain.transforms.Map):
  """Packed row of seq_len+1 -> next-token-prediction features of length seq_len."""

  def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tokens = row["tokens"].astype(np.int32)
    seg = row["tokens_segment_ids"].astype(np.int32)
    pos = row["tokens_positions"].astype(np.int32)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": seg[:-1],
        "positions": pos[:-1],
        "loss_mask": ((seg[1:] == seg[:-1]) & (seg[:-1] != 0)).astype(np.float32),
    }


# --- sources ----------------------------------------------------------------------------------------

def _open_split(manifest: dict, domain: str, split: str):
  """ArrayRecordDataSource over one domain's split, checked against the manifest; None if empty."""
  entry = manifest["domains"][domain][split]
  if not entry["files"]:
    return None
  paths = [str(Path(manifest["root"]) / f) for f in entry["files"]]
  try:
    src = grain.sources.ArrayRecordDataSource(paths)
  except Exception as e:  # array_record raises bare RuntimeError/ValueError for corrupt files
    raise DataError(f"corrupt shard among {paths}: {e}") from None
  if len(src) != entry["docs"]:
    raise DataError(f"{paths[0]}...: {len(src)} records on disk, manifest says {entry['docs']} "
                    f"for {domain}/{split}")
  return src


def _domain_seed(seed: int, domain: str) -> int:
  # Keyed by name, not position, so adding a domain leaves the others' order unchanged.
  return int(np.random.SeedSequence([seed, zlib.crc32(domain.encode())]).generate_state(1)[0])


def mixture(manifest: dict, weights: dict[str, float] | None) -> dict[str, float]:
  """Normalized token weights per domain with weight > 0.

  None or {}: the manifest's own "weights" (written by `data.curate`'s mix step) if it has them, else
  each domain's share of training tokens (upsampled domains count their repeats).
  """
  names = list(manifest["domains"])
  train = {n: manifest["domains"][n]["train"] for n in names}
  weights = weights or manifest.get("weights")
  if not weights:
    w = {n: float(train[n]["tokens"]) for n in names}
  else:
    unknown = sorted(set(weights) - set(names))
    if unknown:
      raise DataError(f"weights name unknown domain(s) {unknown}; manifest has {names}")
    bad = {n: v for n, v in weights.items() if not (v >= 0 and math.isfinite(v))}
    if bad:
      raise DataError(f"weights must be finite and >= 0, got {bad}")
    w = {n: float(weights.get(n, 0.0)) for n in names}
    empty = [n for n in names if w[n] > 0 and train[n]["docs"] == 0]
    if empty:
      raise DataError(f"domain(s) {empty} have weight > 0 but no training documents")
  total = sum(w.values())
  if total <= 0:
    raise DataError(f"no domain has positive weight and training data: {w}")
  return {n: v / total for n, v in w.items() if v > 0}


# --- training ---------------------------------------------------------------------------------------

def _check_args(seq_len: int, batch_size: int, process_index: int, process_count: int) -> None:
  if seq_len < 1 or batch_size < 1:
    raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} not in [0, {process_count})")


def _pack(ds: grain.IterDataset, seq_len: int, batch_size: int, seed: int,
          shuffle_bins: bool, shuffle_window: int = 0) -> grain.IterDataset:
  ds = grain.experimental.FlatMapIterDataset(ds, _SplitLong(seq_len))
  if shuffle_window > 1:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed)
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"tokens": seq_len + 1},
      num_packing_bins=max(batch_size, _MIN_PACKING_BINS), seed=seed, shuffle_bins=shuffle_bins)
  return ds.map(_Features())


def train_iterator(manifest_path: str | Path, *, seq_len: int, batch_size: int,
                   weights: dict[str, float] | None = None, seed: int = 0,
                   process_index: int = 0, process_count: int = 1,
                   prefetch: int = 2, shuffle_window: int = SHUFFLE_WINDOW) -> grain.DatasetIterator:
  """Infinite iterator of packed training batches (see module docstring); `shuffle_window` ≤ 1: off."""
  _check_args(seq_len, batch_size, process_index, process_count)
  if shuffle_window < 0:
    raise DataError(f"shuffle_window must be >= 0 (0 or 1 = off), got {shuffle_window}")
  m = load_manifest(manifest_path)
  mix = mixture(m, weights)
  datasets, rates = [], []
  for name, weight in mix.items():
    src = _open_split(m, name, "train")
    ds = grain.MapDataset.source(src)[process_index::process_count]
    if len(ds) == 0:
      raise DataError(f"domain {name!r}: {len(src)} training documents can't be shared among "
                      f"{process_count} processes")
    ds = ds.shuffle(seed=_domain_seed(seed, name)).repeat(None).map(_Decode(m["dtype"]))
    datasets.append(ds)
    train = m["domains"][name]["train"]
    rates.append(weight / (train["tokens"] / train["docs"]))  # documents per token of weight
  ds = grain.MapDataset.mix(datasets, weights=rates) if len(datasets) > 1 else datasets[0]
  it = _pack(ds.to_iter_dataset(_READ_OPTIONS), seq_len, batch_size, seed, shuffle_bins=True,
             shuffle_window=shuffle_window)
  it = it.batch(batch_size, drop_remainder=True)
  if prefetch <= 0:
    return iter(it)
  iterator = _PrefetchIterator(iter(it), prefetch_buffer_size=prefetch)
  atexit.register(_close, weakref.ref(iterator))
  return iterator


class _PrefetchIterator(grain.experimental.ThreadPrefetchDatasetIterator):
  """Grain's thread prefetch, closed once only.

  Grain 0.2.18's version re-runs close() from __del__ even when already closed; during interpreter
  shutdown (module globals gone) that prints a traceback for every live iterator. Closing live
  iterators at exit (atexit, below) and making close idempotent avoids it.
  """

  def close(self) -> None:
    if not self._closed:
      super().close()


def _close(ref: weakref.ref) -> None:
  iterator = ref()
  if iterator is not None:
    iterator.close()


# --- evaluation -------------------------------------------------------------------------------------

def eval_batches(manifest_path: str | Path, *, seq_len: int, batch_size: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Up to `num_batches` fixed validation batches from every domain's val split, in order.

  Rows are packed once from all val documents (domains in manifest order, no shuffle, no repeat) and
  dealt round-robin to processes, so across processes every val token is evaluated exactly once, and
  every process gets the same number of batches (a collective eval step needs that); short batches
  are padded with all-zero rows (loss_mask 0). Each process packs the rows of all processes (at most
  num_batches * batch_size * process_count rows): cheap next to evaluating them. Returns [] only when
  no domain has val documents.
  """
  _check_args(seq_len, batch_size, process_index, process_count)
  m = load_manifest(manifest_path)
  datasets = []
  for name in m["domains"]:
    src = _open_split(m, name, "val")
    if src is not None:
      datasets.append(grain.MapDataset.source(src).map(_Decode(m["dtype"])))
  if not datasets or num_batches < 1:
    return []
  ds = grain.MapDataset.concatenate(datasets) if len(datasets) > 1 else datasets[0]
  it = _pack(ds.to_iter_dataset(_READ_OPTIONS), seq_len, batch_size, seed=0, shuffle_bins=False)
  iterator = iter(it)
  try:
    rows = list(itertools.islice(iterator, num_batches * batch_size * process_count))
  finally:
    iterator.close()  # stops the read-ahead threads now rather than at garbage collection
  per_process = -(-len(rows) // process_count)
  n_batches = -(-per_process // batch_size)
  mine = rows[process_index::process_count]
  zero = {k: np.zeros_like(v) for k, v in rows[0].items()}
  mine += [zero] * (n_batches * batch_size - len(mine))
  return [_stack(mine[i * batch_size:(i + 1) * batch_size]) for i in range(n_batches)]


def _stack(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
