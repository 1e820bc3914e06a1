"""GSM8K task: every gold answer parses and checks against itself; extraction and normalization by hand."""
import json
import re

import pytest

from data.errors import DataError
from data.tasks import gsm8k


def test_every_gold_answer_parses_and_is_correct(shared_data_dir):
  train, test = gsm8k.load("train"), gsm8k.load("test")
  assert (len(train), len(test)) == (7473, 1319)
  for row in train + test:
    # Independent reference: the text after the last "####" with thousands commas removed (GSM8K golds are
    # all integers).
    assert row["target"] == row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    assert re.fullmatch(r"-?\d+", row["target"])
  for row in test:
    assert gsm8k.is_correct(row["answer"], row["target"])
    assert not gsm8k.is_correct(row["answer"], str(int(row["target"]) + 1))
    assert gsm8k.reward(row["answer"], row["target"]) == 1.0


@pytest.mark.parametrize("text, expected", [
    ("#### 1,234", "1234"),
    ("$5.50", "5.5"),
    ("The answer is 42.", "42"),
    ("It costs $1,000,000.00 in total.", "1000000"),
    ("She lost 3 apples, so the change is -3", "-3"),
    ("#### -17", "-17"),
    ("Temperature went from 5 to \u22128", "-8"),
    ("It took 3-4 days; in all 12 days", "12"),
    ("pages 3-4", "4"),  # a range is not a negative number
    ("He has 6 eggs.\n#### 18\n\nQuestion: 7 cats", "18"),  # strict: the number after "####" wins
    ("Working: 2 + 2 = 4\n#### \nso 5 it is", "5"),  # nothing after "####": flexible fallback
    ("no number here", None),
    ("", None),
    ("#### ", None),
])
def test_extract_answer(text, expected):
  assert gsm8k.extract_answer(text) == expected


@pytest.mark.parametrize("s, expected", [
    ("1,234", "1234"), ("$5.50", "5.5"), ("3.50", "3.5"), ("7.0", "7"), ("+5", "5"), ("50%", "50"),
    ("42.", "42"), ("-0", "0"), ("-3.25", "-3.25"), ("0.1", "0.1"), ("1/4", "0.25"), ("2/6", "1/3"),
    (" 18 ", "18"), ("x", None), ("", None), ("1.2.3", None), ("1_000", None), ("nan", None), (None, None),
])
def test_normalize_number(s, expected):
  assert gsm8k.normalize_number(s) == expected


def test_normalize_is_exact_not_float():
  # 0.1 + 0.2 != 0.3 in floats; exact decimals keep distinct numbers distinct and equal ones equal.
  assert gsm8k.normalize_number("0.30000000000000004") == "0.30000000000000004"
  assert gsm8k.normalize_number("0.3000") == "0.3"
  assert gsm8k.normalize_number("12345678901234567890.10") == "12345678901234567890.1"


def test_is_correct_and_reward():
  assert gsm8k.is_correct("so she pays $1,080.00", "1080")
  assert gsm8k.is_correct("#### 7", "7.0")
  assert not gsm8k.is_correct("#### 7.5", "7")
  assert not gsm8k.is_correct("I don't know", "7")
  assert gsm8k.reward("The answer is 3.", "3") == 1.0
  assert gsm8k.reward("The answer is 4.", "3") == 0.0
  with pytest.raises(ValueError, match="not a number"):
    gsm8k.is_correct("3", "three")


def test_fewshot_prompt_format():
  shots = [{"question": "What is 1+1?", "answer": "1+1=2\n#### 2"},
           {"question": "What is 2*3?", "answer": "2*3=6\n#### 6"}]
  assert gsm8k.fewshot_prompt("What is 5-4?", shots) == (
      "Question: What is 1+1?\nAnswer: 1+1=2\n#### 2\n\n"
      "Question: What is 2*3?\nAnswer: 2*3=6\n#### 6\n\n"
      "Question: What is 5-4?\nAnswer:")
  assert gsm8k.fewshot_prompt("Q?", []) == "Question: Q?\nAnswer:"
  assert gsm8k.STOP == ("\n\nQuestion:", "\nQuestion:")


def test_default_shots_are_deterministic_distinct_train_rows(shared_data_dir):
  shots = gsm8k.default_shots()
  assert len(shots) == 8
  assert shots == gsm8k.default_shots(k=8, seed=0)
  assert len({s["question"] for s in shots}) == 8
  train_questions = {r["question"] for r in gsm8k.load("train")}
  assert all(s["question"] in train_questions for s in shots)
  assert [s["question"] for s in gsm8k.default_shots(seed=1)] != [s["question"] for s in shots]
  assert len({s["question"] for s in gsm8k.default_shots(k=3)}) == 3
  with pytest.raises(ValueError, match="k must be"):
    gsm8k.default_shots(k=-1)


def test_load_limit_and_bad_rows(tmp_path):
  good = {"question": "q", "answer": "a\n#### 1,000"}
  path = tmp_path / "g.jsonl"
  path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
  rows = gsm8k.load(path=path)
  assert [r["target"] for r in rows] == ["1000", "1000"]
  assert len(gsm8k.load(path=path, limit=1)) == 1

  cases = {
      "{not json": "invalid JSON",
      json.dumps({"answer": "#### 1"}): "missing field 'question'",
      json.dumps({"question": "q", "answer": 5}): "'answer' must be a string",
      json.dumps({"question": "q", "answer": "no separator 5"}): "no '####",
      json.dumps({"question": "q", "answer": "#### five"}): "cannot parse",
  }
  for line, message in cases.items():
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
      gsm8k.load(path=path)
  with pytest.raises(DataError, match="unknown GSM8K split 'dev'"):
    gsm8k.load("dev")
  with pytest.raises(DataError, match="file not found"):
    gsm8k.load(path=tmp_path / "missing.jsonl")
