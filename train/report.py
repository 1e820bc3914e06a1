"""End-of-run report: `report.md` with the loss curve (`loss.png`), final metrics and sample generations.

Written by the training loop when it finishes; can be rebuilt for any run with
`python -m train.report --run=runs/<name>` (no samples then, unless the run wrote them).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or pods.
import matplotlib.pyplot as plt  # noqa: E402

from train.metrics import read_metrics  # noqa: E402


def plot_loss(rows: list[dict], path: pathlib.Path) -> None:
  train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
  val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
  fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
  if train:
    ax.plot(*zip(*train), label="train loss", lw=1.2)
  if val:
    ax.plot(*zip(*val), "o-", label="validation loss", lw=1.2)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_report(run_dir: pathlib.Path, *, samples: Sequence[tuple[str, str]] = (),
                 summary: dict | None = None) -> pathlib.Path:
  run_dir = pathlib.Path(run_dir)
  rows = read_metrics(run_dir)
  plot_loss(rows, run_dir / "loss.png")
  config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
  train_rows = [r for r in rows if r.get("loss") is not None]
  val_rows = [r for r in rows if r.get("val_loss") is not None]
  lines = [f"# Run report: {config.get('run', {}).get('name', run_dir.name)}", ""]
  if train_rows:
    first, last = train_rows[0], train_rows[-1]
    lines += ["| | first logged | last logged |", "|---|---|---|",
              f"| step | {first['step']} | {last['step']} |",
              f"| train loss | {first['loss']:.4f} | {last['loss']:.4f} |",
              f"| tokens seen | {first.get('tokens_seen', 0):,} | {last.get('tokens_seen', 0):,} |",
              f"| tokens/s | {first.get('tokens_per_s') or 0:,.0f} | {last.get('tokens_per_s') or 0:,.0f} |"]
  if val_rows:
    v = val_rows[-1]
    lines += [f"| val loss (step {v['step']}) | | {v['val_loss']:.4f} |",
              f"| val bits/byte | | {v['val_bpb']:.4f} |"]
  lines += ["", "![loss curve](loss.png)", ""]
  if summary:
    lines += ["## Summary", ""] + [f"- {k}: {v}" for k, v in summary.items()] + [""]
  if samples:
    lines += ["## Samples", ""]
    for prompt, text in samples:
      lines += [f"**Prompt:** `{prompt!r}`", "", "```", prompt + text, "```", ""]
  if config:
    m = config.get("model", {})
    lines += ["## Config", "", f"model: d_model={m.get('d_model')} n_layers={m.get('n_layers')} "
              f"n_heads={m.get('n_heads')} n_kv_heads={m.get('n_kv_heads')} vocab={m.get('vocab_size')}",
              "", "Full resolved config: `config.json`.", ""]
  path = run_dir / "report.md"
  path.write_text("\n".join(lines))
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.report")
  parser.add_argument("--run", required=True, help="run directory")
  args = parser.parse_args(argv)
  run = pathlib.Path(args.run)
  if not (run / "metrics.jsonl").exists():
    print(f"error: no metrics.jsonl in {run}", file=sys.stderr)
    return 2
  print(write_report(run))
  return 0


if __name__ == "__main__":
  sys.exit(main())
