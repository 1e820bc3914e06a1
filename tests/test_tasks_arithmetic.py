"""Templated arithmetic task (data/tasks/arithmetic.py): determinism, disjoint splits, gold answers pass
gsm8k's checker and wrong ones score 0, operand/operator ranges, the SFT JSONL the CLI writes."""
import json
import re

import pytest

from data import sft
from data.tasks import arithmetic, gsm8k

_Q = re.compile(r"^What is (\d+) ([-+*]) (\d+)\?$")


def test_deterministic_by_seed():
  a = arithmetic.make(200, seed=3)
  assert a == arithmetic.make(200, seed=3)
  assert a != arithmetic.make(200, seed=4)
  assert arithmetic.load("test", 50) == arithmetic.load("test", 50)


def test_splits_disjoint_and_distinct():
  train = arithmetic.load("train", 3000)
  test = arithmetic.load("test", 300)
  tq, eq = [p["question"] for p in train], [p["question"] for p in test]
  assert len(set(tq)) == len(tq) and len(set(eq)) == len(eq)  # no duplicates within a split
  assert not set(tq) & set(eq)
  assert {arithmetic.split_of(q) for q in tq} == {"train"}
  assert {arithmetic.split_of(q) for q in eq} == {"test"}
  # Roughly 1 in 5 of all questions is test (the crc32 rule), so neither split is degenerate.
  everything = arithmetic.make(2000, seed=9)
  frac = sum(arithmetic.split_of(p["question"]) == "test" for p in everything) / 2000
  assert 0.15 < frac < 0.25


def test_format_and_ranges():
  problems = arithmetic.make(500, seed=0, digits=(2, 3), ops=("+", "-", "*"))
  ops = set()
  for p in problems:
    a, op, b = _Q.match(p["question"]).groups()
    ops.add(op)
    a, b = int(a), int(b)
    assert 10 <= a <= 999 and 10 <= b <= 999
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    assert value >= 0  # "-" puts the larger operand first
    assert p["target"] == str(value)
    assert p["answer"] == f"{a} {op} {b} = {value}\n#### {value}"
  assert ops == {"+", "-", "*"}
  assert {_Q.match(p["question"]).group(2) for p in arithmetic.make(100, seed=0, ops=("-",))} == {"-"}


def test_gold_answers_correct_and_wrong_answers_score_zero():
  problems = arithmetic.load("train", 300) + arithmetic.load("test", 100)
  for p in problems:
    assert gsm8k.is_correct(p["answer"], p["target"])
    assert arithmetic.reward(p["answer"], p["target"]) == 1.0
    wrong = str(int(p["target"]) + 1)
    assert arithmetic.reward(p["answer"].rsplit("####", 1)[0] + f"#### {wrong}", p["target"]) == 0.0
    assert arithmetic.reward(p["answer"], wrong) == 0.0
  assert arithmetic.reward("I don't know", "7") == 0.0
  assert arithmetic.reward("3 + 4 = 7\n#### 8", "7") == 0.0  # the number after #### decides


def test_bad_arguments():
  with pytest.raises(ValueError, match="digits"):
    arithmetic.make(5, seed=0, digits=(2, 1))
  with pytest.raises(ValueError, match="ops"):
    arithmetic.make(5, seed=0, ops=("/",))
  with pytest.raises(ValueError, match="split"):
    arithmetic.load("val", 5)
  # 1-digit "+" has 100 questions in all; the test split keeps ~20 of them.
  with pytest.raises(ValueError, match="distinct"):
    arithmetic.make(101, seed=0, digits=(1, 1), ops=("+",))
  assert len(arithmetic.make(100, seed=0, digits=(1, 1), ops=("+",))) == 100


def test_cli_writes_sft_jsonl(tmp_path, capsys):
  out = tmp_path / "train.jsonl"
  assert arithmetic.main(["--split=train", "--n=40", "--digits=1,1", f"--out={out}"]) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  expected = arithmetic.load("train", 40, digits=(1, 1))
  assert rows == [{"prompt": p["question"], "response": p["answer"]} for p in expected]
  convs, counts = sft.load_conversations(out)  # what `align.sft --config.align.data=<file>` reads
  assert counts["kept"] == 40 and convs[0][1]["content"] == expected[0]["answer"]
  assert arithmetic.main(["--n=10", "--digits=3,1", f"--out={out}"]) == 2
  assert "error: digits" in capsys.readouterr().err
