"""JSON-lines reading shared by the task loaders: one object per line, optional gzip, errors name file:line.

Library module (used by `gsm8k`, `humaneval`, `multiple_choice`); no entry point.
"""
from __future__ import annotations

import gzip
import json
import pathlib
import zlib
from collections.abc import Iterator
from typing import Any

from data.errors import DataError


def iter_jsonl(path: str | pathlib.Path, limit: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields `(line_no, object)` for each non-blank line (1-based numbers), at most `limit` objects.

  A `.gz` suffix means gzip. Raises DataError for a missing file, a corrupt gzip stream, non-UTF-8 text,
  invalid JSON or a line that is not a JSON object, naming the file and line.
  """
  path = pathlib.Path(path)
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0, got {limit}")
  if not path.is_file():
    raise DataError(f"{path}: file not found")
  opener = gzip.open if path.suffix == ".gz" else open
  count = 0
  try:
    # Binary lines, decoded one by one, so a bad byte is reported on its own line (a text-mode reader
    # decodes 8 KB chunks ahead and would blame an earlier line).
    with opener(path, "rb") as f:
      for line_no, raw in enumerate(f, start=1):
        if limit is not None and count >= limit:
          return
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise DataError(f"{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
          raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        count += 1
        yield line_no, obj
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise DataError(f"{path}: corrupt gzip stream ({e})") from None


def require_str(obj: dict[str, Any], key: str, where: str) -> str:
  """`obj[key]` if it is a string, else DataError naming `where` (file:line) and the field."""
  if key not in obj:
    raise DataError(f"{where}: missing field {key!r}")
  value = obj[key]
  if not isinstance(value, str):
    raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
  return value
