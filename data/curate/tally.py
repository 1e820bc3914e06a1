"""Per-stage counts for curation: in / kept / dropped-by-reason, extra counters, time, dropped samples.

Library module, no entry point. A tally is a plain JSON-able dict so it crosses process and Ray
boundaries unchanged and is saved beside each shard (resume reads it back):

  {"stages": {name: {"in": n, "kept": n, "dropped": {reason: n}, "counts": {key: n}, "time_s": s}},
   "samples": {"<stage>:<reason>": [{"id", "url", "source", "text"}, ...]}}

`merge` adds tallies in a fixed order (shard order), so the report is identical for any worker count
and for both runners.
"""
from __future__ import annotations

from typing import Any

from data.curate.base import Doc

# Dropped documents kept per reason for the report; 600 chars is enough to see why a filter fired.
SAMPLE_CHARS = 600


def new() -> dict[str, Any]:
  return {"stages": {}, "samples": {}}


def stage(tally: dict, name: str) -> dict:
  return tally["stages"].setdefault(
      name, {"in": 0, "kept": 0, "dropped": {}, "counts": {}, "time_s": 0.0})


def drop(tally: dict, name: str, reason: str, doc: Doc | None, samples_per_reason: int,
         where: str = "") -> None:
  s = stage(tally, name)
  s["dropped"][reason] = s["dropped"].get(reason, 0) + 1
  bucket = tally["samples"].setdefault(f"{name}:{reason}", [])
  if len(bucket) < samples_per_reason:
    if doc is not None:
      bucket.append({"id": doc.id, "url": doc.url, "source": doc.source,
                     "text": (doc.text or doc.html)[:SAMPLE_CHARS]})
    else:
      bucket.append({"id": "", "url": "", "source": where, "text": ""})


def add_counts(tally: dict, name: str, counts: dict[str, int]) -> None:
  c = stage(tally, name)["counts"]
  for k, v in counts.items():
    c[str(k)] = c.get(str(k), 0) + int(v)


def merge(tallies: list[dict], samples_per_reason: int) -> dict:
  """Sum of `tallies` in the given order; samples keep the first `samples_per_reason` per reason."""
  out = new()
  for t in tallies:
    for name, s in t["stages"].items():
      o = stage(out, name)
      o["in"] += s["in"]
      o["kept"] += s["kept"]
      o["time_s"] += s["time_s"]
      for key in ("dropped", "counts"):
        for k, v in s[key].items():
          o[key][k] = o[key].get(k, 0) + v
    for key, items in t["samples"].items():
      bucket = out["samples"].setdefault(key, [])
      bucket.extend(items[:max(0, samples_per_reason - len(bucket))])
  return out


def check(tally: dict) -> list[str]:
  """Stages whose counts do not reconcile (in != kept + dropped); empty when all do."""
  bad = []
  for name, s in tally["stages"].items():
    if s["in"] != s["kept"] + sum(s["dropped"].values()):
      bad.append(f"{name}: in {s['in']} != kept {s['kept']} + dropped {sum(s['dropped'].values())}")
  return bad
