"""HumanEval: all 164 canonical solutions pass and all 164 mutated ones fail in the sandbox; pass@k; STOP.

The two sandbox tests run 164 programs each through `run_many` with 2 workers (about 7 s each on 2 cores).
"""
import gzip
import json
import math
import random

import pytest

from data.errors import DataError
from data.tasks import humaneval, sandbox

# The mutation: the body raises. Every HumanEval `check` calls the candidate, so every program must fail, and
# fail *because of the mutation* (the reason names it) rather than by accident. (`return None` happens to
# fail all 164 too, but a body whose output is never compared would pass it; raising cannot.)
_MUTANT = "    raise NotImplementedError('mutant: body removed')\n"


@pytest.fixture
def problems(shared_data_dir):
  return humaneval.load()


def test_load(problems):
  assert len(problems) == 164
  assert problems[0]["task_id"] == "HumanEval/0"
  assert problems[0]["entry_point"] == "has_close_elements"
  assert all(set(p) == set(humaneval.FIELDS) for p in problems)
  assert len(humaneval.load(limit=3)) == 3


def test_all_canonical_solutions_pass(problems):
  results = sandbox.run_many([humaneval.program(p, p["canonical_solution"]) for p in problems], workers=2)
  failed = [(p["task_id"], r.status, r.reason) for p, r in zip(problems, results) if r.status != "passed"]
  assert failed == []


def test_all_mutated_solutions_fail(problems):
  results = sandbox.run_many([humaneval.program(p, _MUTANT) for p in problems], workers=2)
  wrong = [(p["task_id"], r.status, r.reason) for p, r in zip(problems, results)
           if (r.status, r.reason) != ("failed", "NotImplementedError: mutant: body removed")]
  assert wrong == []


def test_check_passes_and_fails_and_catches_early_exit(problems):
  p = problems[2]  # truncate_number: return number % 1.0
  assert humaneval.check(p, p["canonical_solution"]).status == "passed"
  wrong = humaneval.check(p, "    return number // 1.0\n")
  assert (wrong.status, wrong.reason) == ("failed", "AssertionError")
  # A reward hack: end the program with status 0 as soon as the candidate is called.
  hack = humaneval.check(p, "    import os\n    os._exit(0)\n")
  assert (hack.status, hack.reason) == ("failed", "exited before the tests finished")
  slow = humaneval.check(p, "    while True:\n        pass\n", timeout_s=1.0)
  assert slow.status == "timeout"
  batch = humaneval.check_many(
      [p, p, p], [p["canonical_solution"], "    import sys\n    sys.exit(0)\n", "    return 0.5\n"], workers=2)
  assert [(r.status, r.reason) for r in batch] == [
      ("passed", ""), ("failed", "exited before the tests finished"), ("failed", "AssertionError")]
  with pytest.raises(ValueError, match="1 problems but 2 completions"):
    humaneval.check_many([p], ["a", "b"])


def test_program_format():
  problem = {"task_id": "t/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
             "test": "def check(candidate):\n    assert candidate(1) == 1\n", "entry_point": "f"}
  assert humaneval.program(problem, "    return x\n") == (
      "def f(x):\n    return x\n\ndef check(candidate):\n    assert candidate(1) == 1\n\ncheck(f)\n")
  assert humaneval.check(problem, "    return x\n").passed
  assert not humaneval.check(problem, "    return -x\n").passed


@pytest.mark.parametrize("completion, expected", [
    ("    return x\n\ndef other():\n    pass", "    return x\n"),
    ("    return x\n# comment\nprint(1)", "    return x"),
    ("    y = 1\n    # indented comment stays\n    return y\nif __name__ == '__main__':\n    f()",
     "    y = 1\n    # indented comment stays\n    return y"),
    ("    return x\nclass A: pass", "    return x"),
    ("    print(x)\n    return x\nprint(f(1))", "    print(x)\n    return x"),
    ("    return x", "    return x"),
    ("", ""),
])
def test_truncate(completion, expected):
  assert humaneval.truncate(completion) == expected
  assert humaneval.STOP == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def test_pass_at_k_hand_values():
  assert humaneval.pass_at_k(5, 2, 1) == pytest.approx(0.4)
  assert humaneval.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
  assert humaneval.pass_at_k(5, 0, 3) == 0.0
  assert humaneval.pass_at_k(5, 5, 3) == 1.0
  assert humaneval.pass_at_k(1, 1, 1) == 1.0
  with pytest.raises(ValueError, match="exceeds"):
    humaneval.pass_at_k(5, 2, 6)
  with pytest.raises(ValueError):
    humaneval.pass_at_k(5, 6, 1)


def test_pass_at_k_matches_the_direct_formula():
  rng = random.Random(0)
  for _ in range(300):
    n = rng.randint(1, 200)
    c = rng.randint(0, n)
    k = rng.randint(1, n)
    direct = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(direct, rel=1e-9, abs=1e-12)


def test_load_errors(tmp_path):
  path = tmp_path / "he.jsonl.gz"
  good = {"task_id": "t/0", "prompt": "p", "canonical_solution": "s", "test": "t", "entry_point": "f"}
  with gzip.open(path, "wt") as f:
    f.write(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "test"}) + "\n")
  with pytest.raises(DataError, match=f"{path}:2: missing field 'test'"):
    humaneval.load(path)
  path.write_bytes(b"not gzip at all")
  with pytest.raises(DataError, match="corrupt gzip"):
    humaneval.load(path)
