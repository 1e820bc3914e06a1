"""The curation record (`Doc`) and the two kinds of stage, chosen by registered name.

Library module, no entry point (`python -m data.curate` runs the stages). A stage is one small class
registered under a name; the pipeline config lists names in order:

  * `Stage` (per document): `process(doc) -> Doc | str`. Return the doc (possibly edited) to keep it,
    or a short drop reason such as "below_alpha_threshold" to drop it. The runner counts every call:
    in = kept + sum(dropped[reason]). Stages run in worker processes over one input file at a time.
  * `GlobalStage` (needs the whole corpus: dedup, percentile cuts) runs in three steps:
      1. `summarize(docs)` per output shard, in workers: small numpy arrays per doc (hashes,
         signatures, scores), saved by the runner as one .npz per shard;
      2. `decide(summaries, alive, work_dir)` once, in the driver, over all shards in shard order;
         `alive[i][j]` is False for docs an earlier global stage already dropped (skip them); returns
         per shard a list with one decision per doc: None (keep as is), a str (drop reason), or a
         stage-specific edit that `apply` understands (e.g. line indices to remove);
      3. `apply(doc, decision) -> Doc | str`, in workers.
    `decide` must bound its memory by spilling to `work_dir` where the data can outgrow RAM.

Extra counters a stage wants in the report (PII redactions by type, lines removed, contamination hits
per eval set) go in `self.counts` (a Counter); the runner collects and resets it after each file.
Stages must be deterministic: the local and Ray runners must produce identical outputs.

Config: every constructor argument has a non-None default of a fixed type (str "" for "no path",
tuples not lists), listed in the class attribute `defaults`, so the preset (`configs/curate.py`) can
expose it as `--config.stages.<name>.<arg>=...`. A bad value raises `DataError` naming the stage.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import numpy as np

from data.errors import DataError


@dataclasses.dataclass
class Doc:
  """One document as it flows through curation; serialized as one JSON line between phases."""
  id: str            # stable across runs: record id, WARC-Record-ID, or "<file>:<line>"
  text: str          # plain text ("" until `extract` fills it for HTML records)
  domain: str        # mixture domain the doc belongs to ("web", "wiki", ...), from the source spec
  url: str = ""
  host: str = ""     # source host from the url, lower-cased, no port ("en.wikipedia.org")
  source: str = ""   # input file path, for the report
  html: str = ""     # raw HTML for WARC responses, dropped (set "") once extracted
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # scores: lang, lang_score, ...

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    if not d["html"]:
      del d["html"]
    return json.dumps(d, ensure_ascii=False)

  @classmethod
  def from_json(cls, line: str | bytes) -> Doc:
    return cls(**json.loads(line))


def shared_data_dir() -> Path:
  """The small real datasets (eval sets, web samples): $SHARED_DATA, else ../shared/data beside the
  repository (the same lookup as tests/conftest.py)."""
  env = os.environ.get("SHARED_DATA")
  return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def host_of(url: str) -> str:
  try:
    return (urlsplit(url).hostname or "").lower()
  except ValueError:
    return ""


class Stage:
  """Per-document stage; see the module docstring."""
  name: ClassVar[str] = ""
  defaults: ClassVar[dict[str, Any]] = {}

  def __init__(self, **config: Any):
    unknown = sorted(set(config) - set(self.defaults))
    if unknown:
      raise DataError(f"stage {self.name!r}: unknown option(s) {unknown}; known: {sorted(self.defaults)}")
    self.config = {**self.defaults, **config}
    self.counts: collections.Counter = collections.Counter()

  def setup(self) -> None:
    """Loads heavy state (models, n-gram sets) once per worker process, before the first doc."""

  def process(self, doc: Doc) -> Doc | str:
    raise NotImplementedError


class GlobalStage(Stage):
  """Corpus-wide stage; see the module docstring."""

  def process(self, doc: Doc) -> Doc | str:  # not used for global stages
    raise TypeError(f"{self.name} is a global stage")

  def summarize(self, docs: list[Doc]) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def decide(self, summaries: list[dict[str, np.ndarray]], alive: list[np.ndarray],
             work_dir) -> list[list[Any]]:
    raise NotImplementedError

  def apply(self, doc: Doc, decision: Any) -> Doc | str:
    if decision is None:
      return doc
    if isinstance(decision, str):
      return decision
    raise TypeError(f"{self.name}: unexpected decision {decision!r}")


STAGES: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
  """Class decorator: makes the stage available under `cls.name`."""
  if not cls.name:
    raise ValueError(f"{cls.__name__} has no name")
  if cls.name in STAGES and STAGES[cls.name] is not cls:
    raise ValueError(f"stage name {cls.name!r} registered twice")
  STAGES[cls.name] = cls
  return cls
