"""Held-out text for perplexity and bits-per-byte: named corpora and WikiText article splitting.

Library module, used by the evaluation harness (`train/evaluate.py`); no entry point. Usage:

  text = heldout.load_text("wikitext2_test")          # or any file path
  for article in heldout.documents(text): ...          # per-article perplexity

Names resolve under `shared_data_dir()/text/`: "wikitext2_valid", "wikitext2_test" (WikiText-2 in its
tokenized form, `<unk>` and ` @-@ ` included: bits-per-byte here is not comparable with published raw-text
figures) and "tinyshakespeare". Anything else is read as a UTF-8 file path.
"""
from __future__ import annotations

import pathlib
import re

from data.errors import DataError
from data.tasks import shared_data_dir

NAMES = {
    "wikitext2_valid": "wikitext2_valid.txt",
    "wikitext2_test": "wikitext2_test.txt",
    "tinyshakespeare": "tinyshakespeare.txt",
}

# A WikiText article starts at a top-level heading line " = Title = " followed by a blank line; sections are
# " = = Section = = " and sub-sections " = = = ... = = = ", which "(?!= )" keeps out. The blank line matters:
# the test split's "Constant k filter" article has two equation lines of the same shape (" = 1 <unk> and
# <unk> C = ") followed by text. With it, valid and test both split into the 60 articles Merity et al. 2016
# count (table 1: 600/60/60).
_TITLE = re.compile(r"^ = (?!= )[^\n]*[^=\n] = *\n(?= *(?:\n|$))", re.MULTILINE)


def load_text(name_or_path: str | pathlib.Path) -> str:
  """The text of a named corpus (NAMES) or of a file; DataError for a missing, empty or non-UTF-8 file."""
  if isinstance(name_or_path, str) and name_or_path in NAMES:
    path = shared_data_dir() / "text" / NAMES[name_or_path]
  else:
    path = pathlib.Path(name_or_path)
  if not path.is_file():
    hint = "" if path.suffix else f" (known names: {', '.join(NAMES)})"
    raise DataError(f"{path}: file not found{hint}")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
  if not text.strip():
    raise DataError(f"{path}: file is empty")
  return text


def documents(text: str) -> list[str]:
  """WikiText split into articles, each starting at its " = Title = " line.

  Lossless: `"".join(documents(text)) == text`; text before the first title belongs to the first article.
  A text without titles is one document; an empty text none.
  """
  starts = [m.start() for m in _TITLE.finditer(text)]
  if not starts:
    return [text] if text else []
  starts[0] = 0
  return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
