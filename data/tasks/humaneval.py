"""HumanEval (Chen et al. 2021): loader, test program, sandboxed check and the unbiased pass@k estimator.

Library module, used by the evaluation harness (`train/evaluate.py`) and as a code verifier for RL; no entry
point. Usage:

  problems = humaneval.load()
  completion = humaneval.truncate(generate(problems[0]["prompt"], stop=humaneval.STOP))
  result = humaneval.check(problems[0], completion)        # sandbox.SandboxResult; result.passed
  results = humaneval.check_many(problems, completions, workers=8)
  humaneval.pass_at_k(n=20, c=3, k=1)

Data: `shared_data_dir()/code/humaneval.jsonl.gz`, 164 problems with `task_id`, `prompt` (signature and
docstring), `canonical_solution` (a body), `test` (a `check(candidate)` function) and `entry_point`. The test
program is built exactly as openai/human-eval's `execution.py` builds it. Completions are model-written code:
they only ever run inside `data.tasks.sandbox`.
"""
from __future__ import annotations

import dataclasses
import pathlib
import secrets
from typing import Any

import numpy as np

from data.tasks import _jsonl, sandbox, shared_data_dir

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")

# The Codex paper's stop sequences (Chen et al. 2021, section 2.3): a new top-level statement ends the body.
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def load(path: str | pathlib.Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
  """The problems as dicts with FIELDS (all strings); DataError naming file:line for a malformed row."""
  path = pathlib.Path(path) if path is not None else shared_data_dir() / "code" / "humaneval.jsonl.gz"
  problems = []
  for line_no, obj in _jsonl.iter_jsonl(path, limit):
    where = f"{path}:{line_no}"
    problems.append({key: _jsonl.require_str(obj, key, where) for key in FIELDS})
  return problems


def truncate(completion: str) -> str:
  """`completion` cut at the first STOP sequence (the text before it is kept)."""
  cut = min((i for i in (completion.find(s) for s in STOP) if i >= 0), default=len(completion))
  return completion[:cut]


def program(problem: dict[str, Any], completion: str) -> str:
  """The test program: prompt + completion, the problem's tests, then `check(<entry point>)`."""
  return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
          + f"check({problem['entry_point']})" + "\n")


def check(problem: dict[str, Any], completion: str, *, timeout_s: float = 10.0) -> sandbox.SandboxResult:
  """Runs `program(problem, completion)` in the sandbox; `status == "passed"` means every assert held.

  A random token printed after `check(...)` must appear in stdout for a pass: a completion that calls
  `exit(0)` (a known reward hack under RL) ends the program early with status 0 but is reported "failed".
  """
  return check_many([problem], [completion], timeout_s=timeout_s, workers=1)[0]


def check_many(problems: list[dict[str, Any]], completions: list[str], *, timeout_s: float = 10.0,
               workers: int | None = None) -> list[sandbox.SandboxResult]:
  """`check` for each (problem, completion) pair, concurrently on `workers` threads, in input order."""
  if len(problems) != len(completions):
    raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
  tokens = [f"humaneval-done-{secrets.token_hex(8)}" for _ in problems]
  codes = [program(p, c) + f"print({t!r})\n" for p, c, t in zip(problems, completions, tokens)]
  results = sandbox.run_many(codes, workers=workers, timeout_s=timeout_s)
  return [dataclasses.replace(r, status="failed", reason="exited before the tests finished")
          if r.status == "passed" and t not in r.stdout else r for r, t in zip(results, tokens)]


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased pass@k estimate 1 - C(n-c, k) / C(n, k) from `c` correct out of `n` samples.

  Chen et al. 2021, eq. 1, in their numerically stable product form
  C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), which never forms the huge binomials.
  """
  if not (n >= 1 and 0 <= c <= n and k >= 1):
    raise ValueError(f"need n >= 1, 0 <= c <= n, k >= 1; got n={n}, c={c}, k={k}")
  if k > n:
    raise ValueError(f"k={k} exceeds the number of samples n={n}")
  if n - c < k:  # Every k-subset holds a correct sample.
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
