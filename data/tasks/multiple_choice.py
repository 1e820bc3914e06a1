"""A generic multiple-choice task format (JSONL) for log-likelihood scoring, with a strict loader and a writer.

Library module, used by the evaluation harness (`train/evaluate.py`): it scores each choice as a continuation
of `context` and counts the example right when the gold choice scores best. No entry point. Format, one JSON
object per line (blank lines ignored, other keys ignored):

  {"id": "q1", "context": "The capital of France is", "choices": [" Paris", " Rome"], "gold": 0}

  id       string, optional (default "<file name>:<line>")
  context  string (may be empty)
  choices  list of >= 2 non-empty strings; each is appended to the context as is, so a leading space
           belongs in the choice (the lm-eval convention for " Paris")
  gold     integer index into choices

Usage: `examples = load_jsonl("arc_easy.jsonl")`, `write_jsonl(examples, "copy.jsonl")`. Every malformed line
raises DataError naming file:line and the problem.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

from data.errors import DataError
from data.tasks import _jsonl


@dataclasses.dataclass(frozen=True)
class MCExample:
  id: str
  context: str
  choices: tuple[str, ...]
  gold: int


def _parse(obj: dict, where: str, default_id: str) -> MCExample:
  context = _jsonl.require_str(obj, "context", where)
  example_id = _jsonl.require_str(obj, "id", where) if "id" in obj else default_id
  if "choices" not in obj:
    raise DataError(f"{where}: missing field 'choices'")
  choices = obj["choices"]
  if not isinstance(choices, list):
    raise DataError(f"{where}: field 'choices' must be a list of strings, got {type(choices).__name__}")
  if len(choices) < 2:
    raise DataError(f"{where}: field 'choices' needs at least 2 choices, got {len(choices)}")
  for i, choice in enumerate(choices):
    if not isinstance(choice, str):
      raise DataError(f"{where}: choice {i} must be a string, got {type(choice).__name__}")
    if not choice.strip():
      raise DataError(f"{where}: choice {i} is empty")
  if "gold" not in obj:
    raise DataError(f"{where}: missing field 'gold'")
  gold = obj["gold"]
  if not isinstance(gold, int) or isinstance(gold, bool):  # bool is an int subclass: `true` is no index.
    raise DataError(f"{where}: field 'gold' must be an integer, got {type(gold).__name__}")
  if not 0 <= gold < len(choices):
    raise DataError(f"{where}: gold index {gold} out of range for {len(choices)} choices")
  return MCExample(id=example_id, context=context, choices=tuple(choices), gold=gold)


def load_jsonl(path: str | pathlib.Path, limit: int | None = None) -> list[MCExample]:
  """The examples of a JSONL file (`.gz` allowed), in file order, at most `limit` of them."""
  path = pathlib.Path(path)
  return [_parse(obj, f"{path}:{line_no}", f"{path.name}:{line_no}")
          for line_no, obj in _jsonl.iter_jsonl(path, limit)]


def write_jsonl(examples: list[MCExample], path: str | pathlib.Path) -> None:
  """Writes `examples` in the format `load_jsonl` reads (UTF-8, one object per line, ids always written).

  Each example is validated first, so an invalid one raises DataError ("example <i>: ...") and never
  reaches the file.
  """
  path = pathlib.Path(path)
  records = []
  for i, ex in enumerate(examples):
    record = {"id": ex.id, "context": ex.context, "choices": list(ex.choices), "gold": ex.gold}
    _parse(record, f"{path}: example {i}", "")
    records.append(record)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
