"""Evaluation and RL task definitions with their answer checkers.

Library package shared by the evaluation harness (`train/evaluate.py`) and by alignment (GRPO verifiers);
no entry point of its own. Each module is one task family:

  * `gsm8k`           grade-school maths: loader, few-shot prompt, answer extraction, `is_correct`/`reward`.
  * `humaneval`       Python synthesis: loader, test program, `check` (runs in the sandbox), pass@k.
  * `sandbox`         the sandboxed Python runner behind `humaneval.check` (namespaces, rlimits, timeouts).
  * `multiple_choice` a generic JSONL multiple-choice format (context, choices, gold) for log-likelihood scoring.
  * `heldout`         held-out text (WikiText-2, Tiny Shakespeare) for perplexity, split into articles.
  * `arithmetic`      templated multi-digit arithmetic in GSM8K's answer format (GRPO demo task).

Datasets live outside the repository, under `shared_data_dir()` (see `../shared/data/README.md`). Bad data
raises `data.errors.DataError` naming the file and line. Import the submodules directly
(`from data.tasks import gsm8k`); this package imports nothing heavy.
"""
from __future__ import annotations

import os
import pathlib

from data.errors import DataError

# <repo>/data/tasks/__init__.py -> parents[2] is <repo>.
_REPO = pathlib.Path(__file__).resolve().parents[2]


def shared_data_dir() -> pathlib.Path:
  """The shared datasets folder: `$SHARED_DATA`, else `<repo>/../shared/data`; DataError if it is absent."""
  env = os.environ.get("SHARED_DATA")
  path = pathlib.Path(env) if env else _REPO.parent / "shared" / "data"
  if not path.is_dir():
    raise DataError(f"{path}: shared data folder not found (set SHARED_DATA to the folder holding math/, "
                    "code/, text/)")
  return path
