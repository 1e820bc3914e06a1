"""The benchmark entry point emits one well-formed JSON object per setup (figures are not asserted)."""
import json
import subprocess
import sys

from conftest import REPO

SCHEMA = ("bench", "setup", "device", "jax", "commit", "tokens_per_s", "step_time_s", "flops_per_token",
          "achieved_tflops", "mfu", "params")


def test_train_bench_prints_one_json_line():
  out = subprocess.run([sys.executable, "-m", "train.bench", "--config=configs/lm.py:tiny,smoke",
                        "--steps=2", "--warmup=1", "--config.mesh.data=2", "--config.mesh.fsdp=4"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if l.strip()]
  assert len(lines) == 1
  row = json.loads(lines[0])
  for key in SCHEMA:
    assert key in row, key
  assert row["tokens_per_s"] > 0 and row["params"] > 0 and "'fsdp': 4" in row["setup"]


def test_train_bench_rejects_bad_config_key():
  out = subprocess.run([sys.executable, "-m", "train.bench", "--config.train.stepz=2"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "train.stepz" in out.stderr
