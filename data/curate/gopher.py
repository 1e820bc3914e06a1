"""Gopher heuristic filters (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights
from Training Gopher", Appendix A.1.1 and Table A1): `gopher_repetition` and `gopher_quality`.

Per-document stages for `python -m data.curate`, listed by name in the pipeline config, e.g.
`--config.stages.gopher_quality.min_stop_words=2`. Each drops a document with the reason of the first
rule it fails. A threshold of 0 turns its rule off, except in the n-gram tables (`top_n_grams`,
`dup_n_grams`), where a rule is turned off by leaving its n out.

Both follow the paper's rules as FineWeb's reference implementation (datatrove 0.10.1,
GopherRepetitionFilter / GopherQualityFilter) reads them, so that decisions match it (see
`data.curate.filters_ref`): words are spaCy English tokens including punctuation tokens
(`data.curate.text.words`), characters are counted over the raw text.
"""
from __future__ import annotations

import functools
import itertools
import re
from typing import Any, ClassVar

import numpy as np

from data.curate import text as T
from data.curate.base import Doc, Stage, register
from data.errors import DataError

_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_LINE_BREAKS = re.compile(r"\n+")


def _check_fraction(stage: str, name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
    raise DataError(f"stage {stage!r}: {name} must be a fraction in [0, 1], got {value!r}")


def _check_count(stage: str, name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
    raise DataError(f"stage {stage!r}: {name} must be a number >= 0, got {value!r}")


def _check_ngram_table(stage: str, name: str, value: Any) -> tuple[tuple[int, float], ...]:
  try:
    table = tuple((int(n), float(f)) for n, f in value)
  except (TypeError, ValueError):
    raise DataError(f"stage {stage!r}: {name} must be ((n, fraction), ...), got {value!r}") from None
  for (n, f), (n_raw, _) in zip(table, value):
    if n < 1 or n != n_raw or not 0 <= f <= 1:
      raise DataError(f"stage {stage!r}: {name} needs n >= 1 and a fraction in [0, 1], got {value!r}")
  return table


@register
class GopherRepetition(Stage):
  """Drops documents dominated by repeated lines, paragraphs or n-grams (Gopher Table A1)."""
  name = "gopher_repetition"
  defaults: ClassVar[dict[str, Any]] = {
      # Gopher Table A1: duplicate line / paragraph fraction 0.30 (of all lines / paragraphs).
      "dup_line_frac": 0.3,
      "dup_para_frac": 0.3,
      # Table A1: characters in duplicate lines / paragraphs, as a fraction of all characters, 0.20.
      "dup_line_char_frac": 0.2,
      "dup_para_char_frac": 0.2,
      # Table A1: characters covered by the most frequent 2-, 3-, 4-gram: 0.20, 0.18, 0.16.
      "top_n_grams": ((2, 0.2), (3, 0.18), (4, 0.16)),
      # Table A1: characters in duplicated 5..10-grams: 0.15, 0.14, 0.13, 0.12, 0.11, 0.10.
      "dup_n_grams": ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)),
  }

  def __init__(self, **config: Any):
    super().__init__(**config)
    c = self.config
    for key in ("dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac"):
      _check_fraction(self.name, key, c[key])
    self.top_n_grams = _check_ngram_table(self.name, "top_n_grams", c["top_n_grams"])
    self.dup_n_grams = _check_ngram_table(self.name, "dup_n_grams", c["dup_n_grams"])

  def process(self, doc: Doc) -> Doc | str:
    text = doc.text
    if not text:
      return "empty"
    c = self.config
    n_chars = len(text)
    # Paragraphs are separated by 2+ newlines (of the stripped text); lines by 1+ newlines.
    paragraphs = _PARAGRAPH_BREAK.split(text.strip())
    n_dup, dup_chars = T.duplicates(paragraphs)
    if c["dup_para_frac"] and n_dup / len(paragraphs) > c["dup_para_frac"]:
      return "dup_para_frac"
    if c["dup_para_char_frac"] and dup_chars / n_chars > c["dup_para_char_frac"]:
      return "dup_para_char_frac"
    lines = _LINE_BREAKS.split(text)
    n_dup, dup_chars = T.duplicates(lines)
    if c["dup_line_frac"] and n_dup / len(lines) > c["dup_line_frac"]:
      return "dup_line_frac"
    if c["dup_line_char_frac"] and dup_chars / n_chars > c["dup_line_char_frac"]:
      return "dup_line_char_frac"
    if not self.top_n_grams and not self.dup_n_grams:
      return doc
    grams = _NGrams(T.cached_words(text))
    for n, frac in self.top_n_grams:
      if grams.top_chars(n) / n_chars > frac:
        return f"top_{n}_gram"
    for n, frac in self.dup_n_grams:
      if grams.duplicate_chars(n) / n_chars > frac:
        return f"duplicated_{n}_n_grams"
    return doc


class _NGrams:
  """Word n-gram statistics of one document, with n-grams as exact integer ids.

  An n-gram's id comes from (id of its first n-1 words, id of its last word), renumbered densely
  with `np.unique`, so equal ids mean equal word sequences; no strings are joined.
  """

  def __init__(self, words: tuple[str, ...]):
    n = len(words)
    vocab: dict[str, int] = {}
    # setdefault keeps the first number a word was given; later numbers are skipped, which is fine.
    self.word_ids = np.fromiter(map(vocab.setdefault, words, itertools.count()), np.int64, n)
    self.offsets = np.zeros(n + 1, np.int64)  # character offset of each word, words abutted
    np.cumsum(np.fromiter(map(len, words), np.int64, n), out=self.offsets[1:])
    self.n_words = n
    self._stats: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

  def _grams(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(id of the n-gram at each position, first position of each id, occurrences of each id)."""
    if n not in self._stats:
      # Ids of words and of (n-1)-grams are < n_words, so the key is unique and fits in int64.
      keys = self.word_ids if n == 1 else self._grams(n - 1)[0][:-1] * self.n_words + self.word_ids[n - 1:]
      _, first, ids, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
      self._stats[n] = (ids, first, counts)
    return self._stats[n]

  def _chars(self, n: int) -> np.ndarray:
    """Characters of each n-gram's words, without separators."""
    return self.offsets[n:] - self.offsets[:-n]

  def top_chars(self, n: int) -> int:
    """Characters covered by the most frequent n-gram: len(" ".join(gram)) * count (0 if none).

    Ties go to the n-gram seen first, as `collections.Counter.most_common(1)` picks it.
    """
    if n > self.n_words:
      return 0
    _, first, counts = self._grams(n)
    best = counts.max()
    at = first[counts == best].min()
    return int(self._chars(n)[at] + n - 1) * int(best)

  def duplicate_chars(self, n: int) -> int:
    """Characters of n-grams that repeat an earlier one, scanning left to right and jumping past
    each repeat (so overlapping repeats count once): Gopher's "duplicate n-gram character fraction".
    Only n-grams at visited positions count as seen, as in the reference scan. (The reference
    compares n-grams as their words glued together, so "ab c" would equal "a bc"; here they are
    word sequences. No difference showed up in the comparisons.)
    """
    if n > self.n_words:
      return 0
    ids, first, _ = self._grams(n)
    if len(first) == len(ids):
      return 0  # no n-gram occurs twice
    is_first = np.zeros(len(ids), bool)
    is_first[first] = True
    start = int(np.argmin(is_first))  # the earliest repeat; every position before it is new
    ids_list = ids.tolist()
    chars = self._chars(n).tolist()
    seen = set(ids_list[:start])
    repeated, i, end = 0, start, len(ids_list)
    while i < end:
      g = ids_list[i]
      if g in seen:
        repeated += chars[i]
        i += n
      else:
        seen.add(g)
        i += 1
    return repeated


@functools.cache
def _no_letter_word() -> re.Pattern:
  """Matches a whole word (one per line) without any `str.isalpha` character."""
  letters = [c for c in range(0x110000) if chr(c).isalpha()]
  return re.compile(r"(?m)^[^\n" + T.char_class(letters) + r"]+$")


@functools.cache
def _symbol_word() -> re.Pattern:
  """Matches a whole word (one per line) made only of punctuation/symbol characters."""
  return re.compile(r"(?m)^[" + T.char_class(sorted(map(ord, T.SYMBOL_CHARS))) + r"]+$")


# Gopher's stop words (Rae et al. 2021, A.1.1): a document must contain at least two of them.
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


@register
class GopherQuality(Stage):
  """Drops documents that do not read like prose (Gopher A.1.1 "quality filters")."""
  name = "gopher_quality"
  defaults: ClassVar[dict[str, Any]] = {
      # "remove any document that does not contain between 50 and 100,000 words"; counted over
      # words with at least one non-symbol character.
      "min_doc_words": 50,
      "max_doc_words": 100_000,
      # "or whose mean word length is outside the range of 3 to 10 characters"
      "min_avg_word_length": 3.0,
      "max_avg_word_length": 10.0,
      # "symbol-to-word ratio greater than 0.1 for either the hash symbol or the ellipsis"
      "max_symbol_word_ratio": 0.1,
      # "more than 90% of lines starting with a bullet point" ("•" or "-")
      "max_bullet_lines_ratio": 0.9,
      # "or more than 30% ending with an ellipsis" ("..." or "…")
      "max_ellipsis_lines_ratio": 0.3,
      # "80% of words in a document contain at least one alphabetic character"
      "min_alpha_words_ratio": 0.8,
      # "apply a stop word filter, to remove documents that do not contain at least two of ..."
      "min_stop_words": 2,
      "stop_words": STOP_WORDS,
  }

  def __init__(self, **config: Any):
    super().__init__(**config)
    c = self.config
    for key in ("max_symbol_word_ratio", "max_bullet_lines_ratio", "max_ellipsis_lines_ratio",
                "min_alpha_words_ratio"):
      _check_fraction(self.name, key, c[key])
    for key in ("min_doc_words", "max_doc_words", "min_avg_word_length", "max_avg_word_length",
                "min_stop_words"):
      _check_count(self.name, key, c[key])
    if isinstance(c["stop_words"], str) or not all(isinstance(w, str) for w in c["stop_words"]):
      raise DataError(f"stage {self.name!r}: stop_words must be a tuple of words, got {c['stop_words']!r}")
    self.stop_words = frozenset(c["stop_words"])

  def setup(self) -> None:
    _no_letter_word()
    _symbol_word()
    T.warm_up()

  def process(self, doc: Doc) -> Doc | str:
    c = self.config
    text = doc.text
    words = T.cached_words(text)
    n_words = len(words)
    # One word per line lets a single regex pass find symbol-only / letter-free words.
    joined = "\n".join(words)
    symbol_words = _symbol_word().findall(joined)
    n_content = n_words - len(symbol_words)  # words with a non-symbol character
    if c["min_doc_words"] and n_content < c["min_doc_words"]:
      return "short_doc"
    if c["max_doc_words"] and n_content > c["max_doc_words"]:
      return "long_doc"
    if n_words == 0:
      return "short_doc"  # only reachable with min_doc_words = 0: no ratio is defined
    if n_content:
      content_chars = len(joined) - (n_words - 1) - sum(map(len, symbol_words))
      mean_length = content_chars / n_content
      if c["min_avg_word_length"] and mean_length < c["min_avg_word_length"]:
        return "below_avg_threshold"
      if c["max_avg_word_length"] and mean_length > c["max_avg_word_length"]:
        return "above_avg_threshold"
    ratio = c["max_symbol_word_ratio"]
    if ratio and text.count("#") / n_words > ratio:
      return "too_many_hashes"
    if ratio and (text.count("...") + text.count("…")) / n_words > ratio:
      return "too_many_ellipsis"
    lines = text.splitlines()
    if c["max_bullet_lines_ratio"] and lines:
      bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
      if bullets / len(lines) > c["max_bullet_lines_ratio"]:
        return "too_many_bullets"
    if c["max_ellipsis_lines_ratio"] and lines:
      ellipses = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
      if ellipses / len(lines) > c["max_ellipsis_lines_ratio"]:
        return "too_many_end_ellipsis"
    if c["min_alpha_words_ratio"]:
      n_alpha = n_words - len(_no_letter_word().findall(joined))
      if n_alpha / n_words < c["min_alpha_words_ratio"]:
        return "below_alpha_threshold"
    # Stop words are matched case-sensitively ("The" does not count), as in the reference.
    if c["min_stop_words"] and len(self.stop_words.intersection(words)) < c["min_stop_words"]:
      return "too_few_stop_words"
    return doc

