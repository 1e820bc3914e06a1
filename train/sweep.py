"""`python -m train.sweep --sweep=configs/sweeps/<name>.py[:arg]`: run every point of a sweep, resumably.

A sweep file defines `get_sweep(arg) -> list[dict]` (override sets of `--config.` keys, each with a
unique `run.name`) and optionally `BASE` (the preset they apply to; default `configs/lm.py:tiny`). Each
point trains with `python -m train` in its own process under `<out>/<run.name>/`; a point whose
`result.json` exists is skipped, so rerunning the command after an interruption finishes the rest.
Results are gathered into `<out>/results.csv` (one row per point: overrides, N, D, C, final train and
validation loss, bpb, wall time) and `<out>/curves.csv` (training loss against tokens and FLOPs, for
Approach 1 of `python -m train.scaling`).

    python -m train.sweep --sweep=configs/sweeps/isoflop_cpu.py             # one point after another
    python -m train.sweep --sweep=... --parallel=4                         # 4 local processes at once
    python -m train.sweep --sweep=... --ray [--cpus-per-point=8 --gpus-per-point=1]   # a Ray cluster
    python -m train.sweep --sweep=... --dry-run                            # the plan: N, D, C per point

On Ray, `--out` must be on a filesystem every node sees (NFS, GCS FUSE); the driver only schedules.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import math
import os
import pathlib
import subprocess
import sys
import time

from configs.loader import ConfigError, load_python_file, main_guard
from train import flops as flops_lib
from train.config import DEFAULT_CONFIG, model_config
from train.design import resolve_point

RESULT_COLUMNS = ("name", "status", "N", "N_non_embedding", "N_kaplan", "D", "C", "C_6ND", "flops_per_token",
                  "final_train_loss", "val_loss", "val_bpb", "wall_s", "overrides")


def load_sweep(spec: str) -> tuple[str, list[dict], str]:
  """(base preset, points, sweep name) from `path.py[:arg]`; every point checked against the base."""
  module, arg, file = load_python_file(spec, "get_sweep", kind="sweep")
  path = spec.partition(":")[0]
  base = getattr(module, "BASE", DEFAULT_CONFIG)
  try:
    points = list(module.get_sweep(arg))
  except ValueError as e:
    raise ConfigError(f"{path}: {e}") from None
  if not points:
    raise ConfigError(f"{path} returned no points")
  names = [p.get("run.name") for p in points]
  if None in names or len(set(names)) != len(names):
    raise ConfigError(f"{path}: every point needs a unique run.name (got {names})")
  for p in points:
    try:
      resolve_point(base, {k: v for k, v in p.items() if k != "run.name"})
    except (KeyError, TypeError, ValueError) as e:
      raise ConfigError(f"{path}: point {p['run.name']}: {e}") from None
  return base, points, file.stem


def plan(base: str, point: dict) -> dict:
  """N, D, C of one point before it runs (C is exact: Chinchilla FLOPs per token × tokens)."""
  from model.params import count_params
  cfg = resolve_point(base, point)
  mc = model_config(cfg)
  params = count_params(mc)
  tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
  fpt = flops_lib.chinchilla_flops_per_token(mc, cfg.data.seq_len)
  # N is the count that matters for the fits: every param but position tables (tied: the table once).
  # N_kaplan drops the vocabulary too (input table, and the output head where untied): Kaplan et al.'s
  # non-embedding N, for `python -m train.scaling --n-column N_kaplan`.
  head = 0 if mc.tie_embeddings else mc.vocab_size * mc.d_model
  return dict(N=params["total"] - (params["embedding"] - mc.vocab_size * mc.d_model),
              N_non_embedding=params["non_embedding"], N_kaplan=params["total"] - params["embedding"] - head,
              D=tokens, C=fpt * tokens,
              C_6ND=flops_lib.six_nd(params["total"], tokens), flops_per_token=fpt)


def _as_arg(value) -> str:
  return value if isinstance(value, str) else repr(value)


def command(base: str, point: dict, run_dir: pathlib.Path) -> list[str]:
  args = [sys.executable, "-m", "train", f"--config={base}", f"--config.run.dir={run_dir}",
          "--config.train.progress=false"]
  args += [f"--config.{k}={_as_arg(v)}" for k, v in point.items()]
  return args


def run_point(base: str, point: dict, run_dir: str, env: dict | None = None) -> dict:
  """Trains one point in a child process; returns its result row (also written to result.json)."""
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  with open(run_dir / "train.log", "w") as log:
    proc = subprocess.run(command(base, point, run_dir), stdout=log, stderr=subprocess.STDOUT,
                          env={**os.environ, **(env or {})})
  row = dict(name=point["run.name"], overrides=json.dumps(point, sort_keys=True), **plan(base, point),
             wall_s=round(time.time() - t0, 1))
  if proc.returncode != 0:
    row["status"] = f"failed (exit {proc.returncode}, see {run_dir / 'train.log'})"
    (run_dir / "failed.json").write_text(json.dumps(row, indent=2))  # shown in results.csv until a retry.
    return row
  (run_dir / "failed.json").unlink(missing_ok=True)
  metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
  train_rows = [m for m in metrics if "loss" in m]
  val_rows = [m for m in metrics if "val_loss" in m]
  row.update(status="done", final_train_loss=train_rows[-1]["loss"] if train_rows else math.nan,
             val_loss=val_rows[-1]["val_loss"] if val_rows else math.nan,
             val_bpb=val_rows[-1]["val_bpb"] if val_rows else math.nan)
  (run_dir / "result.json").write_text(json.dumps(row, indent=2))
  return row


def gather(out: pathlib.Path, base: str, points: list[dict]) -> list[dict]:
  """Writes results.csv and curves.csv from every point's result.json / metrics.jsonl."""
  rows, curves = [], []
  for p in points:
    d = out / p["run.name"]
    if (d / "result.json").exists():
      # Plan columns added since the point ran (e.g. N_kaplan) come from its plan; the rest as recorded.
      row = {**plan(base, p), **json.loads((d / "result.json").read_text())}
      rows.append(row)
      fpt = row["flops_per_token"]
      for line in (d / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
          curves.append(dict(name=row["name"], N=row["N"], step=m["step"], tokens=m["tokens_seen"],
                             C=fpt * m["tokens_seen"], loss=m["loss"]))
    elif (d / "failed.json").exists():
      rows.append(json.loads((d / "failed.json").read_text()))
    else:
      rows.append(dict(name=p["run.name"], status="pending", overrides=json.dumps(p, sort_keys=True),
                       **plan(base, p)))
  with open(out / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  with open(out / "curves.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=("name", "N", "step", "tokens", "C", "loss"))
    w.writeheader()
    w.writerows(curves)
  return rows


def _run_ray(base, todo, out, cpus, gpus):
  import ray
  ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)
  # Each point is a task holding its CPUs/GPUs for the whole run; Ray queues the rest until they free up.
  remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(run_point)
  refs = {remote.remote(base, p, str(out / p["run.name"])): p for p in todo}
  while refs:
    done, _ = ray.wait(list(refs), num_returns=1)
    yield ray.get(done[0])
    refs.pop(done[0])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sweep", required=True, help="configs/sweeps/<name>.py[:arg]")
  parser.add_argument("--out", default="", help="sweep directory (default runs/sweeps/<name>)")
  parser.add_argument("--parallel", type=int, default=1, help="local points at once")
  parser.add_argument("--ray", action="store_true", help="run points as Ray tasks (RAY_ADDRESS or local)")
  parser.add_argument("--cpus-per-point", type=float, default=1.0)
  parser.add_argument("--gpus-per-point", type=float, default=0.0)
  parser.add_argument("--only", default="", help="run only points whose name contains this")
  parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
  args = parser.parse_args(argv)

  def go():
    base, points, name = load_sweep(args.sweep)
    if args.only:
      points = [p for p in points if args.only in p["run.name"]]
    out = pathlib.Path(args.out or f"runs/sweeps/{name}")
    if args.dry_run:
      total = 0.0
      for p in points:
        info = plan(base, p)
        total += info["C"]
        print(json.dumps(dict(name=p["run.name"], **info)))
      print(json.dumps(dict(points=len(points), total_C=total)))
      return 0
    todo = [p for p in points if not (out / p["run.name"] / "result.json").exists()]
    changed = [p["run.name"] for p in points if p not in todo and json.loads(
        (out / p["run.name"] / "result.json").read_text())["overrides"] != json.dumps(p, sort_keys=True)]
    if changed:
      raise ConfigError(f"{out} holds finished points with other settings under the same names "
                        f"({', '.join(changed[:5])}); use a new --out or delete those point directories")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(dict(sweep=args.sweep, base=base, points=points), indent=2))
    print(f"sweep {name}: {len(points)} points, {len(points) - len(todo)} already done, "
          f"{len(todo)} to run -> {out}", file=sys.stderr)
    if args.ray:
      results = _run_ray(base, todo, out, args.cpus_per_point, args.gpus_per_point)
    else:
      pool = concurrent.futures.ThreadPoolExecutor(max(1, args.parallel))
      futures = [pool.submit(run_point, base, p, str(out / p["run.name"])) for p in todo]
      results = (f.result() for f in concurrent.futures.as_completed(futures))
    failed = 0
    for row in results:
      failed += row["status"] != "done"
      print(f"  {row['name']}: {row['status']}  val_loss={row.get('val_loss', float('nan')):.4f}  "
            f"{row['wall_s']:.0f}s", file=sys.stderr)
      gather(out, base, points)  # after every point, so results.csv is current while the sweep runs.
    gather(out, base, points)
    print(f"results: {out / 'results.csv'}", file=sys.stderr)
    if failed:
      print(f"error: {failed} point(s) failed; rerun the same command to retry them", file=sys.stderr)
      return 1
    return 0

  return main_guard(go)


if __name__ == "__main__":
  sys.exit(main())
