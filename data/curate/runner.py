"""The curation driver: plan -> map (per input file) -> decide (global stages) -> apply -> mix/tokenize.

Library module; `python -m data.curate` calls `run(cfg)`. Layout of `cfg.out`:

  run.json                   what was run: inputs (path, size, mtime) and every stage's options;
                             a rerun with different ones is refused (a new `out` starts afresh)
  work/map/<key>.*           per input file: surviving docs, global-stage summaries, tally
  work/global/<stage>/       spill space for `GlobalStage.decide` (band tables, ...)
  work/decisions/<key>.pkl   the global stages' per-document decisions
  work/final/<key>.*         per input file: the curated docs (zstd JSON lines) and tally
  shards/                    tokenized shards + manifest.json for `data.pipeline` (mix step)
  tokenizer.model            the tokenizer of those shards
  stats.json, report.md      counts per stage, drop reasons, tokens per domain, dropped samples

Runners (`cfg.runner`): "local" runs tasks in a spawn process pool (`cfg.workers`, 0 = all CPUs);
"ray" runs the same `Worker` as Ray Data actors, one task per input file (`cfg.ray_address`, "" =
start or join a local Ray). Both write the same files; global decisions are made here, in the driver,
in shard order, so outputs are identical whichever runs the tasks. Inputs are expected on a
filesystem every Ray node sees.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import multiprocessing
import os
import pickle
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from data.curate import tally as tally_lib
from data.curate.base import STAGES, GlobalStage
from data.curate.worker import Worker, build_stages
from data.errors import DataError

log = logging.getLogger("data.curate")


@dataclasses.dataclass(frozen=True)
class Plan:
  pre: tuple[str, ...]      # per-document stages before the global ones (run while reading)
  globals: tuple[str, ...]  # corpus-wide stages (dedup, percentile cuts)
  post: tuple[str, ...]     # per-document stages after them (run on survivors only, e.g. pii)


def plan(pipeline: tuple[str, ...]) -> Plan:
  from data.curate import registry  # noqa: F401
  unknown = [n for n in pipeline if n not in STAGES]
  if unknown:
    raise DataError(f"unknown stage(s) {unknown}; registered: {sorted(STAGES)}")
  dup = [n for n, c in collections.Counter(pipeline).items() if c > 1]
  if dup:
    raise DataError(f"stage(s) listed twice in the pipeline: {dup}")
  is_global = [issubclass(STAGES[n], GlobalStage) for n in pipeline]
  first = is_global.index(True) if any(is_global) else len(pipeline)
  last = len(pipeline) - is_global[::-1].index(True) if any(is_global) else len(pipeline)
  if not all(is_global[first:last]):
    raise DataError(f"per-document stages {[n for n, g in zip(pipeline[first:last], is_global[first:last]) if not g]}"
                    f" sit between global stages; put them before or after {list(pipeline[first:last])}")
  return Plan(tuple(pipeline[:first]), tuple(pipeline[first:last]), tuple(pipeline[last:]))


# A directory source takes the files with these suffixes (optionally .gz/.zst), so a LICENSE or README
# beside the data is not curated as a document; a file or glob given explicitly is read whatever its name.
_DATA_SUFFIXES = (".warc", ".wet", ".jsonl", ".json", ".ndjson", ".parquet", ".txt", ".md")


def _is_data_file(p: Path) -> bool:
  name = p.name.lower()
  for c in (".gz", ".zst"):
    name = name.removesuffix(c)
  return name.endswith(_DATA_SUFFIXES)


def parse_sources(spec: str) -> dict[str, list[Path]]:
  """"web=/cc/*.warc.gz,wiki=/data/wiki/" -> {domain: sorted files}; a directory means every
  non-hidden data file under it (`_DATA_SUFFIXES`)."""
  if not spec.strip():
    raise DataError("no sources: give --config.sources=\"name=glob[,name2=glob2]\"")
  out: dict[str, list[Path]] = {}
  for part in spec.split(","):
    name, sep, pattern = part.strip().partition("=")
    if not sep or not name or not pattern:
      raise DataError(f"bad source {part!r}: expected name=glob")
    if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
      raise DataError(f"bad domain name {name!r}: use letters, digits, '_', '-', '.'")
    files: list[Path] = []
    for m in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) or [pattern]:
      p = Path(m)
      if p.is_dir():
        files += sorted(f for f in p.rglob("*") if f.is_file() and _is_data_file(f)
                        and not any(x.startswith(".") for x in f.relative_to(p).parts))
      elif p.is_file():
        files.append(p)
    if not files:
      raise DataError(f"source {name}={pattern}: no such file or directory")
    out.setdefault(name, [])
    out[name] += [f for f in files if f not in out[name]]
  return out


def _fingerprint(sources: dict[str, list[Path]], cfg) -> dict:
  inputs = {name: [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
            for name, files in sources.items()}
  stages = {n: dict(cfg.stages[n]) if n in cfg.stages else {} for n in cfg.pipeline}
  return json.loads(json.dumps({"inputs": inputs, "pipeline": list(cfg.pipeline), "stages": stages}))


def _check_same_run(out: Path, fp: dict) -> None:
  path = out / "run.json"
  if path.exists():
    old = json.loads(path.read_text())
    if old != fp:
      diff = sorted(k for k in fp if old.get(k) != fp[k])
      detail = ""
      if "stages" in diff:
        detail = " (" + ", ".join(sorted(n for n in set(fp["stages"]) | set(old.get("stages", {}))
                                        if fp["stages"].get(n) != old.get("stages", {}).get(n))) + ")"
      raise DataError(f"{out} holds a curation run with different {', '.join(diff)}{detail}; "
                      f"use a new --config.out (or delete {out})")
  else:
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fp, indent=1))


# --- executors ---------------------------------------------------------------------------------------

_WORKER: Worker | None = None


def _init_local(spec: dict) -> None:
  global _WORKER
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  _WORKER = Worker(spec)


def _call_local(task: dict) -> dict:
  assert _WORKER is not None
  return _WORKER(task)


def run_local(spec: dict, tasks: list[dict], workers: int, desc: str) -> list[dict]:
  if not tasks:
    return []
  workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
  main_file = getattr(sys.modules.get("__main__"), "__file__", None)
  if workers == 1 or (main_file is not None and not os.path.exists(main_file)):
    w = Worker(spec)
    return [w(t) for t in tqdm(tasks, desc=desc, unit="file", disable=None)]
  # spawn, not fork: the driver may hold threads (JAX, grain) that fork would copy mid-lock.
  with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_local, initargs=(spec,)) as pool:
    return list(tqdm(pool.map(_call_local, tasks), total=len(tasks), desc=desc, unit="file",
                     disable=None))


def run_ray(spec: dict, tasks: list[dict], workers: int, desc: str, address: str = "") -> list[dict]:
  """The same tasks as Ray Data actors (one `Worker` per actor, stages set up once per actor)."""
  if not tasks:
    return []
  try:
    import ray
  except ImportError:
    raise DataError("--runner=ray needs Ray: pip install -e '.[ray]'") from None
  if not ray.is_initialized():
    ray.init(address=address or None, num_cpus=None if address else (workers or None),
             include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
  ctx = ray.data.DataContext.get_current()
  ctx.execution_options.preserve_order = True
  ctx.enable_progress_bars = False
  n = max(1, min(workers or int(ray.cluster_resources().get("CPU", 1)), len(tasks)))
  rows = [{"task": json.dumps(t)} for t in tasks]
  ds = ray.data.from_items(rows, override_num_blocks=len(rows))
  ds = ds.map(_RayWorker, fn_constructor_kwargs={"spec": spec}, concurrency=n, num_cpus=1)
  log.info("%s: %d tasks on ray (%d actors)", desc, len(tasks), n)
  results = [json.loads(r["result"]) for r in ds.take_all()]
  order = {t["key"]: i for i, t in enumerate(tasks)}
  return sorted(results, key=lambda r: order[r["key"]])


class _RayWorker:
  def __init__(self, spec: dict):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    self.worker = Worker(spec)

  def __call__(self, row: dict) -> dict:
    return {"result": json.dumps(self.worker(json.loads(row["task"])))}


# --- driver ------------------------------------------------------------------------------------------

def run(cfg, *, runner: str = "", log_fn: Callable[[str], None] = print) -> dict:
  """Runs the whole curation described by `cfg` (see configs/curate.py); returns the stats dict."""
  runner = runner or cfg.runner
  if runner not in ("local", "ray"):
    raise DataError(f"unknown runner {runner!r}: use local or ray")
  if not cfg.out:
    raise DataError("no output directory: give --config.out=DIR")
  p = plan(tuple(cfg.pipeline))
  sources = parse_sources(cfg.sources)
  out = Path(cfg.out)
  fp = _fingerprint(sources, cfg)
  # Constructing every stage here checks all options before any work starts.
  stage_cfgs = {n: dict(cfg.stages[n]) if n in cfg.stages else {} for n in cfg.pipeline}
  build_stages(cfg.pipeline, stage_cfgs)
  _check_same_run(out, fp)
  work = out / "work"
  for sub in ("map", "final", "decisions", "global"):
    (work / sub).mkdir(parents=True, exist_ok=True)
  spec = {"work_dir": str(work), "pre": list(p.pre), "globals": list(p.globals), "post": list(p.post),
          "stages": stage_cfgs, "samples": cfg.report.samples_per_reason}
  tasks = []
  for domain, files in sources.items():
    for i, path in enumerate(files):
      tasks.append({"key": f"{domain}.{i:05d}", "path": str(path.resolve()), "domain": domain})
  execute = (lambda ts, desc: run_ray(spec, ts, cfg.workers, desc, cfg.ray_address)) \
      if runner == "ray" else (lambda ts, desc: run_local(spec, ts, cfg.workers, desc))
  t_start = time.perf_counter()

  # 1. map: read + per-document stages + summaries for the global stages, one task per input file.
  t0 = time.perf_counter()
  mapped = execute([{**t, "kind": "map"} for t in tasks], "map")
  map_s = time.perf_counter() - t0

  # 2. decide: each global stage once over all shards, in shard order, skipping what earlier ones drop.
  t0 = time.perf_counter()
  decide_tally = tally_lib.new()
  n_docs = [r["tally"]["docs"] for r in mapped]
  alive = [np.ones(n, dtype=bool) for n in n_docs]
  decisions: list[dict[str, list]] = [{} for _ in tasks]
  for g in build_stages(p.globals, stage_cfgs):
    g.setup()
    summaries = [np.load(work / "map" / f"{t['key']}.{g.name}.npz") for t in tasks]
    spill = work / "global" / g.name
    spill.mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    per_shard = g.decide(summaries, alive, spill)
    tally_lib.stage(decide_tally, g.name)["time_s"] += time.perf_counter() - t1
    tally_lib.add_counts(decide_tally, g.name, g.counts)
    for i, d in enumerate(per_shard):
      if len(d) != n_docs[i]:
        raise RuntimeError(f"{g.name}.decide returned {len(d)} decisions for {n_docs[i]} docs")
      decisions[i][g.name] = list(d)
      alive[i] &= np.array([not isinstance(x, str) for x in d], dtype=bool)
    for s in summaries:
      s.close()
  for t, d in zip(tasks, decisions):
    path = work / "decisions" / f"{t['key']}.pkl"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
      pickle.dump(d, f)
    os.replace(tmp, path)
  decide_s = time.perf_counter() - t0

  # 3. apply: global decisions + per-document stages after them, one task per shard.
  t0 = time.perf_counter()
  applied = execute([{**t, "kind": "apply"} for t in tasks], "apply")
  apply_s = time.perf_counter() - t0

  k = cfg.report.samples_per_reason
  total = tally_lib.merge([r["tally"] for r in mapped] + [decide_tally] + [r["tally"] for r in applied], k)
  bad = tally_lib.check(total)
  if bad:
    raise RuntimeError("curation counts do not reconcile: " + "; ".join(bad))
  final_files: dict[str, list[Path]] = {}
  per_domain: dict[str, dict[str, int]] = {}
  for t, r in zip(tasks, applied):
    d = per_domain.setdefault(t["domain"], {"files": 0, "docs": 0})
    d["files"] += 1
    d["docs"] += r["tally"]["docs"]
    if r["tally"]["docs"]:
      final_files.setdefault(t["domain"], []).append(work / "final" / f"{t['key']}.jsonl.zst")
  stats = {"pipeline": list(cfg.pipeline), "plan": dataclasses.asdict(p), "runner": runner,
           "inputs": {n: len(f) for n, f in sources.items()}, "domains": per_domain,
           "seconds": {"map": map_s, "decide": decide_s, "apply": apply_s},
           **total}
  stats["docs_out"] = sum(d["docs"] for d in per_domain.values())

  # 4. mix: tokenize the curated docs into the shards the Grain pipeline reads.
  if cfg.mix.tokenize:
    from data.curate import mix
    t0 = time.perf_counter()
    stats["mix"] = mix.tokenize(final_files, out, cfg, domains=list(sources))
    stats["seconds"]["mix"] = time.perf_counter() - t0
  stats["seconds"]["total"] = time.perf_counter() - t_start
  (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
  from data.curate import report
  report.write(out / "report.md", stats)
  log_fn(f"curated {stats['stages'].get('read', {}).get('in', 0)} records -> {stats['docs_out']} docs "
         f"in {stats['seconds']['total']:.1f} s; report: {out / 'report.md'}")
  return stats


def curated_files(out: str | Path) -> dict[str, list[Path]]:
  """Domain -> curated .jsonl.zst files of a finished run (for tests and downstream tools)."""
  stats = json.loads((Path(out) / "stats.json").read_text())
  files: dict[str, list[Path]] = {}
  for key in sorted(p.name[:-len(".jsonl.zst")] for p in (Path(out) / "work" / "final").glob("*.jsonl.zst")):
    files.setdefault(key.rsplit(".", 1)[0], []).append(Path(out) / "work" / "final" / f"{key}.jsonl.zst")
  return {d: files.get(d, []) for d in stats["domains"]}

