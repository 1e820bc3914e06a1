"""Multiple-choice JSONL: a good file round-trips; every kind of bad line is a DataError naming file:line."""
import gzip
import json
import re

import pytest

from data.errors import DataError
from data.tasks.multiple_choice import MCExample, load_jsonl, write_jsonl

GOOD = {"id": "q1", "context": "The capital of France is", "choices": [" Paris", " Rome", " Oslo"], "gold": 0}


def test_round_trip(tmp_path):
  path = tmp_path / "mc.jsonl"
  lines = [json.dumps(GOOD), "", json.dumps({"context": "", "choices": ["yes", "no \u00e9"], "gold": 1,
                                             "extra": "ignored"})]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  examples = load_jsonl(path)
  assert examples == [
      MCExample(id="q1", context="The capital of France is", choices=(" Paris", " Rome", " Oslo"), gold=0),
      MCExample(id="mc.jsonl:3", context="", choices=("yes", "no \u00e9"), gold=1),  # default id: file:line
  ]
  copy = tmp_path / "sub" / "copy.jsonl"
  write_jsonl(examples, copy)
  assert load_jsonl(copy) == examples
  assert load_jsonl(path, limit=1) == examples[:1]

  zipped = tmp_path / "mc.jsonl.gz"
  zipped.write_bytes(gzip.compress(path.read_bytes()))
  assert [ex.id for ex in load_jsonl(zipped)] == ["q1", "mc.jsonl.gz:3"]
  assert [ex.choices for ex in load_jsonl(zipped)] == [ex.choices for ex in examples]


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "context"}), "missing field 'context'"),
    (json.dumps({**GOOD, "context": 3}), "field 'context' must be a string, got int"),
    (json.dumps({**GOOD, "id": 7}), "field 'id' must be a string, got int"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "choices"}), "missing field 'choices'"),
    (json.dumps({**GOOD, "choices": " Paris"}), "'choices' must be a list of strings, got str"),
    (json.dumps({**GOOD, "choices": [" Paris"]}), "at least 2 choices, got 1"),
    (json.dumps({**GOOD, "choices": [" Paris", 5]}), "choice 1 must be a string, got int"),
    (json.dumps({**GOOD, "choices": [" Paris", "  "]}), "choice 1 is empty"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "gold"}), "missing field 'gold'"),
    (json.dumps({**GOOD, "gold": 3}), "gold index 3 out of range for 3 choices"),
    (json.dumps({**GOOD, "gold": -1}), "gold index -1 out of range"),
    (json.dumps({**GOOD, "gold": "0"}), "'gold' must be an integer, got str"),
    (json.dumps({**GOOD, "gold": True}), "'gold' must be an integer, got bool"),
    (json.dumps({**GOOD, "gold": 0.0}), "'gold' must be an integer, got float"),
]


@pytest.mark.parametrize("line, message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_bad_line_names_file_and_line(tmp_path, line, message):
  path = tmp_path / "mc.jsonl"
  path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
  with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
    load_jsonl(path)


def test_bad_files(tmp_path):
  with pytest.raises(DataError, match="file not found"):
    load_jsonl(tmp_path / "missing.jsonl")
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"context": "caf\xe9"}\n')
  with pytest.raises(DataError, match=re.escape(f"{path}:2: not UTF-8")):
    load_jsonl(path)


def test_write_validates(tmp_path):
  path = tmp_path / "out.jsonl"
  with pytest.raises(DataError, match="example 1: .*gold index 5 out of range"):
    write_jsonl([MCExample("a", "c", ("x", "y"), 0), MCExample("b", "c", ("x", "y"), 5)], path)
  assert not path.exists()
