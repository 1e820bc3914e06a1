"""Templated integer arithmetic in GSM8K's answer format: a verifiable task sized for a tiny model.

Library module (GRPO's `align.task=arithmetic`, SFT data), and a small CLI that writes a split as SFT
JSONL (`{"prompt", "response"}` lines, what `python -m align.sft --config.align.data=<file>` reads):

    python -m data.tasks.arithmetic --split=train --n=5000 --out=/tmp/arith_train.jsonl
    python -m data.tasks.arithmetic --split=test --n=200 --digits=1,2 --ops=+,-,* --out=/tmp/arith_test.jsonl

  problems = arithmetic.make(100, seed=0, digits=(1, 2), ops=("+", "-"))
  problems[0]  # {"question": "What is 23 + 58?", "answer": "23 + 58 = 81\\n#### 81", "target": "81"}
  arithmetic.reward("23 + 58 = 81\\n#### 81", "81")  # 1.0: gsm8k's checker (number after ####)

Operands have between `digits[0]` and `digits[1]` decimal digits (the count drawn uniformly, then the
operand uniformly among numbers with that many digits; "1 digit" includes 0), so with digits=(1, 2) a
one-digit operand is as likely as a two-digit one although there are 10× fewer of them. For "-" the
larger operand comes first: results are never negative (one less thing for a tiny model to learn).

Splits: a question belongs to "test" when crc32(question) % 5 == 0 (~20% of the space), to "train"
otherwise, so the two splits never share a question whatever their sizes and seeds; `load(split, n)`
draws each split with its own seed. Within one `make` call questions are distinct; asking for more than
the space holds (e.g. 200 one-digit "+" questions: 100 exist) is a ValueError.
"""
from __future__ import annotations

import argparse
import json
import operator
import pathlib
import random
import sys
import zlib
from typing import Any, Sequence

from data.tasks.gsm8k import is_correct, reward  # noqa: F401  (re-exported: the task's checker)

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
SPLITS = ("train", "test")
SEEDS = {"train": 0, "test": 1}  # different streams per split (disjointness comes from the hash rule).
_TEST_BUCKETS = 5  # 1 of 5 crc32 buckets is test: ~20% of the question space.
MAX_DIGITS = 9


def split_of(question: str) -> str:
  """"test" or "train": a fixed function of the question text (crc32, stable across runs and platforms)."""
  return "test" if zlib.crc32(question.encode()) % _TEST_BUCKETS == 0 else "train"


def _check(digits: Sequence[int], ops: Sequence[str]) -> tuple[tuple[int, int], tuple[str, ...]]:
  digits = tuple(int(d) for d in digits)
  if len(digits) != 2 or not 1 <= digits[0] <= digits[1] <= MAX_DIGITS:
    raise ValueError(f"digits must be (min, max) with 1 <= min <= max <= {MAX_DIGITS}, got {digits}")
  ops = tuple(ops)
  bad = [o for o in ops if o not in OPS]
  if not ops or bad:
    raise ValueError(f"ops must be a non-empty subset of {tuple(OPS)}, got {ops}")
  return digits, ops


def _operand(rng: random.Random, digits: tuple[int, int]) -> int:
  n = rng.randint(*digits)
  low = 0 if n == 1 else 10 ** (n - 1)
  return rng.randint(low, 10 ** n - 1)


def problem(a: int, op: str, b: int) -> dict[str, Any]:
  """One problem {"question", "answer", "target"}; the answer shows the equation, then `#### result`."""
  value = OPS[op](a, b)
  return {"question": f"What is {a} {op} {b}?", "answer": f"{a} {op} {b} = {value}\n#### {value}",
          "target": str(value)}


def make(n: int, *, seed: int, digits: Sequence[int] = (1, 2), ops: Sequence[str] = ("+", "-"),
         split: str | None = None) -> list[dict[str, Any]]:
  """`n` distinct problems drawn by `random.Random(seed)`; with `split`, only that split's questions."""
  digits, ops = _check(digits, ops)
  if split is not None and split not in SPLITS:
    raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  rng = random.Random(seed)
  out, seen = [], set()
  # Rejection sampling: 50 draws per problem is far above what a space with room for n needs (the
  # test split keeps 1 in 5), and bounds the loop when it has no room.
  for _ in range(50 * n + 1000):
    if len(out) == n:
      break
    op = rng.choice(ops)
    a, b = _operand(rng, digits), _operand(rng, digits)
    if op == "-" and b > a:
      a, b = b, a
    p = problem(a, op, b)
    if p["question"] in seen or (split is not None and split_of(p["question"]) != split):
      continue
    seen.add(p["question"])
    out.append(p)
  if len(out) < n:
    raise ValueError(f"only {len(out)} distinct {split or ''} questions found for digits={digits}, "
                     f"ops={ops}; asked for {n}")
  return out


def load(split: str, n: int, *, digits: Sequence[int] = (1, 2), ops: Sequence[str] = ("+", "-"),
         seed: int | None = None) -> list[dict[str, Any]]:
  """`make(n)` restricted to `split` with that split's seed (SEEDS) unless `seed` is given."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
  return make(n, seed=SEEDS[split] if seed is None else seed, digits=digits, ops=ops, split=split)


def write_sft_jsonl(problems: Sequence[dict[str, Any]], path: str | pathlib.Path) -> None:
  """One `{"prompt": question, "response": answer}` line per problem (align.sft's JSONL format)."""
  with open(path, "w") as f:
    for p in problems:
      f.write(json.dumps({"prompt": p["question"], "response": p["answer"]}) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data.tasks.arithmetic", description=__doc__.split("\n")[0])
  parser.add_argument("--split", choices=SPLITS, default="train")
  parser.add_argument("--n", type=int, required=True, help="number of problems")
  parser.add_argument("--digits", default="1,2", help="min,max operand digits")
  parser.add_argument("--ops", default="+,-", help="comma-separated subset of + - *")
  parser.add_argument("--seed", type=int, default=None, help="default: the split's own seed")
  parser.add_argument("--out", required=True, help="output JSONL path")
  args = parser.parse_args(argv)
  try:
    digits = tuple(int(d) for d in args.digits.split(","))
    problems = load(args.split, args.n, digits=digits, ops=tuple(args.ops.split(",")), seed=args.seed)
    write_sft_jsonl(problems, args.out)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {len(problems)} {args.split} problems to {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
