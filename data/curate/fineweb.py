"""FineWeb's own quality rules (Penedo et al. 2024, "The FineWeb Datasets", Section 3.6): the
`fineweb` stage.

Per-document stage for `python -m data.curate` (config: `--config.stages.fineweb.<option>=...`).
FineWeb added three rules on top of C4/Gopher, chosen to remove list-like and boilerplate pages:
too few lines ending in punctuation, too many short lines, too much text in duplicated lines; its
reference implementation (datatrove 0.10.1 FineWebQualityFilter, whose defaults produced the
dataset) adds a fourth, too many newlines per word. Decisions match it (see
`data.curate.filters_ref`). Lines are the non-blank pieces between "\n".
"""
from __future__ import annotations

from typing import Any, ClassVar

from data.curate import text as T
from data.curate.base import Doc, Stage, register
from data.errors import DataError


@register
class FineWeb(Stage):
  """FineWeb quality rules; see the module docstring."""
  name = "fineweb"
  defaults: ClassVar[dict[str, Any]] = {
      # Drop when fewer than 12% of lines end in sentence-final punctuation (FineWeb: "fraction of
      # lines ending with punctuation <= 0.12").
      "line_punct_thr": 0.12,
      # Keep pages with no such line at all (off in FineWeb).
      "line_punct_exclude_zero": False,
      # Characters that count as line-final punctuation; () means Unicode's sentence terminals
      # (`data.curate.text.TERMINAL_PUNCTUATION`: ".", "!", "?", "。", ...; quotes do not count).
      "stop_chars": (),
      # Drop when more than 67% of lines are at most 30 characters long (FineWeb: "fraction of lines
      # shorter than 30 characters >= 0.67").
      "short_line_thr": 0.67,
      "short_line_length": 30,
      # Drop when characters in repeated lines exceed 1% of the characters (newlines not counted).
      # 0.01 is the reference code's default, with which FineWeb was built; the FineWeb write-up
      # states the rule as ">= 0.1".
      "char_duplicates_ratio": 0.01,
      # Drop when there are more than 0.3 newlines per word (spaCy English words): lists, menus.
      "new_line_ratio": 0.3,
  }

  def __init__(self, **config: Any):
    super().__init__(**config)
    c = self.config
    for key in ("line_punct_thr", "short_line_thr", "char_duplicates_ratio"):
      v = c[key]
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise DataError(f"stage {self.name!r}: {key} must be a fraction in [0, 1], got {v!r}")
    for key in ("short_line_length", "new_line_ratio"):
      v = c[key]
      if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise DataError(f"stage {self.name!r}: {key} must be a number >= 0, got {v!r}")
    if not isinstance(c["line_punct_exclude_zero"], bool):
      raise DataError(f"stage {self.name!r}: line_punct_exclude_zero must be true or false")
    stops = c["stop_chars"]
    if isinstance(stops, str) or not all(isinstance(s, str) and s for s in stops):
      raise DataError(f"stage {self.name!r}: stop_chars must be a tuple of non-empty strings, got {stops!r}")
    stops = tuple(stops) or tuple(sorted(T.TERMINAL_PUNCTUATION))
    # Single characters (the default) are tested with one set lookup on the last character.
    self._stop_set = frozenset(stops) if all(len(s) == 1 for s in stops) else None
    self._stops = stops

  def setup(self) -> None:
    T.warm_up()

  def _ends_with_stop(self, line: str) -> bool:
    if self._stop_set is not None:
      return line[-1:] in self._stop_set
    return line.endswith(self._stops)

  def process(self, doc: Doc) -> Doc | str:
    c = self.config
    text = doc.text
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
      return "empty"
    ratio = sum(map(self._ends_with_stop, lines)) / len(lines)
    if ratio < c["line_punct_thr"] and not (ratio == 0 and c["line_punct_exclude_zero"]):
      return "line_punct_ratio"
    short = c["short_line_length"]
    if sum(1 for line in lines if len(line) <= short) / len(lines) > c["short_line_thr"]:
      return "short_line_ratio"
    if T.duplicates(lines)[1] / (len(text) - text.count("\n")) > c["char_duplicates_ratio"]:
      return "char_dup_ratio"
    if text.count("\n") / len(T.cached_words(text)) > c["new_line_ratio"]:
      return "list_ratio"
    return doc
