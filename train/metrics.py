"""Metric sinks of a run: `metrics.jsonl` (one JSON object per logged step), TensorBoard events, progress bar.

Rows carry at least `step, loss, grad_norm, lr, tokens_seen, tokens_per_s, step_time_s, mfu`; eval rows
add `val_loss, val_bpb`. `loss` is the mean over the steps since the previous row (`last_loss`: that step's
alone); `grad_norm` and `lr` are the logged step's. A resumed run appends to the same file, dropping rows past the restored step
so the file never holds two histories.
"""
from __future__ import annotations

import json
import math
import pathlib

from tensorboardX import SummaryWriter


def _clean(v):
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


class MetricsWriter:

  def __init__(self, run_dir: pathlib.Path, *, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = run_dir / "metrics.jsonl"
    if not enabled:
      return
    if self.path.exists():  # keep only rows up to the restored step (a crash may have logged past it).
      rows = [l for l in self.path.read_text().splitlines() if l.strip()]
      kept = [l for l in rows if json.loads(l).get("step", 0) <= resume_step]
      self.path.write_text("".join(l + "\n" for l in kept))
    self.file = self.path.open("a")
    self.tb = SummaryWriter(str(run_dir / "tensorboard"))

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    row = {k: _clean(v) for k, v in row.items()}
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
        self.tb.add_scalar(k, v, row["step"])

  def close(self) -> None:
    if self.enabled:
      self.file.close()
      self.tb.close()


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
  path = pathlib.Path(run_dir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
