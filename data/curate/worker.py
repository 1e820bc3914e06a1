"""One unit of curation work on one file: the code both runners (local processes, Ray) execute.

Library module, no entry point. `Worker(spec)` builds the stages once (per process or Ray actor) and
is called with task dicts:

  {"kind": "map", "key", "path", "domain"}   input file -> read -> per-document stages before the
      first global stage -> work/map/<key>.jsonl.zst, one .npz of summaries per global stage, and
      work/map/<key>.json (the tally, written last: its presence marks the shard done).
  {"kind": "apply", "key", "domain"}   work/map/<key>.jsonl.zst + work/decisions/<key>.pkl -> the
      global stages' decisions -> per-document stages after them -> work/final/<key>.jsonl.zst and
      work/final/<key>.json.

Each returns {"key", "tally"}. Outputs are written to a temp name and renamed, and a task whose
marker exists returns the saved tally without redoing anything: a completed shard is never redone.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from data.curate import tally as tally_lib
from data.curate.base import STAGES, Doc, GlobalStage, Stage

# zstd level 3 (the library default): ~4x on web text at ~300 MB/s, so writing never dominates.
_ZSTD_LEVEL = 3


def write_docs(path: Path, docs: Iterable[Doc]) -> int:
  """Writes docs as zstd JSON lines via a temp file + rename; returns the count."""
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
  n = 0
  with open(tmp, "wb") as f, zstandard.ZstdCompressor(level=_ZSTD_LEVEL).stream_writer(f) as z:
    for doc in docs:
      z.write(doc.to_json().encode("utf-8") + b"\n")
      n += 1
  os.replace(tmp, path)
  return n


def read_docs(path: Path) -> Iterator[Doc]:
  with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as z:
    for line in io.TextIOWrapper(z, encoding="utf-8"):
      yield Doc.from_json(line)


def _write_json(path: Path, obj: Any) -> None:
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
  tmp.write_text(json.dumps(obj))
  os.replace(tmp, path)


def build_stages(names: Iterable[str], configs: dict[str, dict]) -> list[Stage]:
  return [STAGES[n](**configs.get(n, {})) for n in names]


class Worker:
  """Runs tasks; `spec` is JSON-able: {"work_dir", "pre", "globals", "post", "stages", "samples"}."""

  def __init__(self, spec: dict):
    from data.curate import registry  # noqa: F401  (registers every stage)
    from data.curate import read as read_lib
    self._read = read_lib
    self.spec = spec
    self.work = Path(spec["work_dir"])
    self.k = spec["samples"]
    self.pre = build_stages(spec["pre"], spec["stages"])
    self.globals: list[GlobalStage] = build_stages(spec["globals"], spec["stages"])
    self.post = build_stages(spec["post"], spec["stages"])
    self._ready = False

  def _setup(self) -> None:
    if not self._ready:
      for s in self.pre + self.globals + self.post:
        s.setup()
      self._ready = True

  def __call__(self, task: dict) -> dict:
    if task["kind"] == "map":
      return self.map(task)
    if task["kind"] == "apply":
      return self.apply(task)
    raise ValueError(f"unknown task kind {task['kind']!r}")

  # ------------------------------------------------------------------------------------------ map

  def map(self, task: dict) -> dict:
    key = task["key"]
    out = self.work / "map"
    marker = out / f"{key}.json"
    if marker.exists():
      return {"key": key, "tally": json.loads(marker.read_text())}
    self._setup()
    t = tally_lib.new()
    read = tally_lib.stage(t, "read")

    def on_drop(reason: str, where: str) -> None:
      read["in"] += 1
      tally_lib.drop(t, "read", reason, None, self.k, where)

    docs: list[Doc] = []
    t0 = time.perf_counter()
    for doc in self._read.iter_file(Path(task["path"]), task["domain"], on_drop):
      read["in"] += 1
      read["kept"] += 1
      doc = self._run_stages(self.pre, doc, t)
      if doc is not None:
        docs.append(doc)
    # Reading time is what is left once the stages' own time is taken out.
    read["time_s"] += time.perf_counter() - t0 - sum(
        t["stages"][s.name]["time_s"] for s in self.pre if s.name in t["stages"])
    for g in self.globals:
      t1 = time.perf_counter()
      arrays = g.summarize(docs)
      np.savez(out / f"{key}.{g.name}.npz", **arrays)
      tally_lib.stage(t, g.name)["time_s"] += time.perf_counter() - t1
    write_docs(out / f"{key}.jsonl.zst", docs)
    t["docs"] = len(docs)
    self.flush_counts(t)
    _write_json(marker, t)
    return {"key": key, "tally": t}

  def _run_stages(self, stages: list[Stage], doc: Doc, t: dict) -> Doc | None:
    for s in stages:
      st = tally_lib.stage(t, s.name)
      st["in"] += 1
      t0 = time.perf_counter()
      result = s.process(doc)
      st["time_s"] += time.perf_counter() - t0
      if isinstance(result, str):
        tally_lib.drop(t, s.name, result, doc, self.k)
        return None
      st["kept"] += 1
      doc = result
    return doc

  # ---------------------------------------------------------------------------------------- apply

  def apply(self, task: dict) -> dict:
    key = task["key"]
    out = self.work / "final"
    marker = out / f"{key}.json"
    if marker.exists():
      return {"key": key, "tally": json.loads(marker.read_text())}
    self._setup()
    with open(self.work / "decisions" / f"{key}.pkl", "rb") as f:
      decisions: dict[str, list] = pickle.load(f)
    t = tally_lib.new()

    def survivors() -> Iterator[Doc]:
      for j, doc in enumerate(read_docs(self.work / "map" / f"{key}.jsonl.zst")):
        kept = True
        for g in self.globals:
          st = tally_lib.stage(t, g.name)
          st["in"] += 1
          t0 = time.perf_counter()
          result = g.apply(doc, decisions[g.name][j])
          st["time_s"] += time.perf_counter() - t0
          if isinstance(result, str):
            tally_lib.drop(t, g.name, result, doc, self.k)
            kept = False
            break
          st["kept"] += 1
          doc = result
        if kept:
          doc = self._run_stages(self.post, doc, t)
          if doc is not None:
            yield doc

    t["docs"] = write_docs(out / f"{key}.jsonl.zst", survivors())
    self.flush_counts(t)
    _write_json(marker, t)
    return {"key": key, "tally": t}

  def flush_counts(self, t: dict) -> None:
    """Moves the stages' extra counters into tally `t` (map tasks call it before saving)."""
    for s in self.pre + self.globals + self.post:
      tally_lib.add_counts(t, s.name, s.counts)
      s.counts.clear()

