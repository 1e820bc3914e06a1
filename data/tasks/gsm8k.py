"""GSM8K (Cobbe et al. 2021): loader, few-shot prompt, answer extraction and the exact-match checker.

Library module, used by the evaluation harness (`train/evaluate.py`) and as a GRPO verifier (`reward`);
no entry point. Usage:

  problems = gsm8k.load("test", limit=100)
  prompt = gsm8k.fewshot_prompt(problems[0]["question"], gsm8k.default_shots())
  completion = generate(prompt, stop=gsm8k.STOP)
  gsm8k.is_correct(completion, problems[0]["target"])

Data: `shared_data_dir()/math/gsm8k_{train,test}.jsonl`, fields `question` and `answer` (worked solution
ending in `#### <number>`; 7,473 train / 1,319 test rows). Numbers are compared exactly, as normalized
strings (`normalize_number`): "1,080" == "1080", "3.50" == "3.5", "$7.00" == "7" — no float tolerance, so
0.1 + 0.2 style rounding can never make a wrong answer right.
"""
from __future__ import annotations

import decimal
import fractions
import pathlib
import random
import re
from typing import Any

from data.errors import DataError
from data.tasks import _jsonl, shared_data_dir

SPLITS = ("train", "test")

# Generation stops when the model starts inventing the next few-shot question.
STOP = ("\n\nQuestion:", "\nQuestion:")

# A number as written in GSM8K answers and model outputs: optional sign, optional "$", digits with thousands
# commas, optional decimals. The sign only counts when it does not follow a word character or a digit, so
# the range "3-4" reads as 3 and 4, not 3 and -4 (lm-eval's flexible regex `-?[$0-9.,]{2,}` gets this wrong).
_NUMBER = re.compile(r"(?:(?<![\w.])[-\u2212])?\$?\d[\d,]*(?:\.\d+)?")
_SEPARATOR = "####"


def _default_path(split: str) -> pathlib.Path:
  if split not in SPLITS:
    raise DataError(f"unknown GSM8K split {split!r}: expected one of {SPLITS}")
  return shared_data_dir() / "math" / f"gsm8k_{split}.jsonl"


def load(split: str = "test", path: str | pathlib.Path | None = None,
         limit: int | None = None) -> list[dict[str, Any]]:
  """Rows `{"question", "answer", "target"}`, `target` the gold number after `####`, normalized.

  `path` overrides the shared file for `split`. Raises DataError naming file:line for a malformed row or an
  answer without a `#### <number>` line.
  """
  path = pathlib.Path(path) if path is not None else _default_path(split)
  rows = []
  for line_no, obj in _jsonl.iter_jsonl(path, limit):
    where = f"{path}:{line_no}"
    question = _jsonl.require_str(obj, "question", where)
    answer = _jsonl.require_str(obj, "answer", where)
    if _SEPARATOR not in answer:
      raise DataError(f"{where}: answer has no '{_SEPARATOR} <number>' line")
    target = normalize_number(answer.rsplit(_SEPARATOR, 1)[1])
    if target is None:
      raise DataError(f"{where}: cannot parse the number after '{_SEPARATOR}' in the answer")
    rows.append({"question": question, "answer": answer, "target": target})
  return rows


def fewshot_prompt(question: str, shots: list[dict[str, Any]]) -> str:
  """"Question: {q}\\nAnswer: {full answer}\\n\\n" per shot, then "Question: {question}\\nAnswer:"."""
  parts = [f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots]
  parts.append(f"Question: {question}\nAnswer:")
  return "".join(parts)


def default_shots(k: int = 8, seed: int = 0) -> list[dict[str, Any]]:
  """`k` distinct train rows picked by `random.Random(seed)` (stable across Python versions and runs).

  8 shots as in the GSM8K few-shot setting of Wei et al. 2022 and lm-eval's `gsm8k` task.
  """
  train = load("train")
  if not 0 <= k <= len(train):
    raise ValueError(f"k must be in [0, {len(train)}], got {k}")
  return [train[i] for i in random.Random(seed).sample(range(len(train)), k)]


def normalize_number(s: str | None) -> str | None:
  """A canonical exact string for a number, or None when `s` is not one.

  Strips whitespace, thousands commas, "$", "%", a trailing period and a leading "+"; then parses exactly
  with `fractions.Fraction` (no float): integers print as "7" ("7.0", "-0" → "7", "0"), terminating
  decimals without trailing zeros ("3.50" → "3.5"), other fractions as "p/q" ("2/6" → "1/3").
  """
  if s is None:
    return None
  t = s.strip().replace(",", "").replace("$", "").replace("%", "").replace("\u2212", "-").strip()
  t = t.rstrip(".").strip()
  if t.startswith("+"):
    t = t[1:]
  if not t or "_" in t:  # Fraction accepts "1_000"; a model writing that did not mean a number.
    return None
  try:
    value = fractions.Fraction(t)
  except (ValueError, ZeroDivisionError):
    return None
  if value.denominator == 1:
    return str(value.numerator)
  d = value.denominator
  for p in (2, 5):
    while d % p == 0:
      d //= p
  if d != 1:
    return f"{value.numerator}/{value.denominator}"
  # A denominator 2^a 5^b has a finite decimal expansion with at most (numerator digits + max(a, b)) significant
  # digits, and max(a, b) <= log2(denominator) < 3.33 * its digit count: the precision below always
  # suffices, and the Inexact trap would say so loudly if it did not.
  with decimal.localcontext() as ctx:
    ctx.prec = len(str(abs(value.numerator))) + 4 * len(str(value.denominator)) + 10
    ctx.traps[decimal.Inexact] = True
    exact = decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)
  return format(exact.normalize(), "f")


def extract_answer(text: str) -> str | None:
  """The model's final number, normalized; None if the text holds no number.

  Strict rule first: the first number after the first "####" (the GSM8K answer format; lm-eval's
  "strict-match" filter). If there is no "####" or no number after it: the last number anywhere in the text
  (lm-eval's "flexible-extract" filter), which suits chain-of-thought answers like "... so the answer is 42."
  """
  if _SEPARATOR in text:
    match = _NUMBER.search(text.split(_SEPARATOR, 1)[1])
    if match:
      value = normalize_number(match.group())
      if value is not None:
        return value
  for candidate in reversed(_NUMBER.findall(text)):
    value = normalize_number(candidate)
    if value is not None:
      return value
  return None


def is_correct(completion: str, target: str) -> bool:
  """Exact match of `extract_answer(completion)` with the normalized `target`."""
  gold = normalize_number(target)
  if gold is None:
    raise ValueError(f"target {target!r} is not a number")
  return extract_answer(completion) == gold


def reward(completion: str, target: str) -> float:
  """1.0 if `completion` answers `target` exactly, else 0.0: the verifiable reward for GRPO/RLVR."""
  return 1.0 if is_correct(completion, target) else 0.0
