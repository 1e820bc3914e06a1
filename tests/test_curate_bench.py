"""`python -m data.bench` runs end to end on a small corpus and prints every figure as a JSON line.

The figures themselves are recorded in README/LOG from full runs; this keeps the command working.
Run: python -m pytest tests/test_curate_bench.py -q
"""
import json
import subprocess
import sys

from conftest import REPO, require, shared_data


def test_data_bench_prints_every_figure():
  require((shared_data() / "web").is_dir(), f"shared data not found at {shared_data()}")
  r = subprocess.run([sys.executable, "-m", "data.bench", "--docs=600", "--stage_docs=60",
                      "--compare_docs=300", "--filter_docs=60", "--workers=2"],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in r.stdout.splitlines()]
  kinds = {row["bench"] for row in rows}
  assert kinds == {"corpus", "stage", "dedup", "end_to_end", "minhash_vs_datasketch",
                   "filter_vs_datatrove"}
  stages = {row["stage"] for row in rows if row["bench"] == "stage"}
  assert {"extract", "langid", "gopher_quality", "c4", "pii", "minhash"} <= stages
  assert all(row["docs_per_s"] > 0 for row in rows if "docs_per_s" in row)
  corpus = next(row for row in rows if row["bench"] == "corpus")
  assert corpus["docs"] == 600 and corpus["planted_copies"] == 60
  dedup = [row for row in rows if row["bench"] == "dedup"][-1]
  assert dedup["precision"] >= 0.95 and dedup["recall"] >= 0.9, dedup
  filters = {row["name"]: row for row in rows if row["bench"] == "filter_vs_datatrove"}
  assert set(filters) == {"gopher_repetition", "gopher_quality", "c4", "fineweb"}
  assert all(f["agreement"] >= 0.95 for f in filters.values()), filters
