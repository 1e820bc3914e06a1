"""C4 cleaning (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", Section 2.2): the `c4` stage, which edits documents line by line.

Per-document stage for `python -m data.curate` (config: `--config.stages.c4.<option>=...`). Each line
is stripped and dropped when it is too short, lacks terminal punctuation, mentions JavaScript or a
cookie/terms policy; the document is dropped when a kept line says "lorem ipsum" or holds a "{", or
when fewer than 5 sentences are left. A kept document comes back with only its kept lines, joined
by "\n". For kept documents, removed lines are counted by reason in `self.counts`
("lines_removed_<reason>", plus "lines_kept"), so the report shows what the cleaning cut.

Rules, order and defaults are those of FineWeb's reference implementation (datatrove 0.10.1
C4QualityFilter, which follows TensorFlow Datasets' c4_utils.py) so that decisions and cleaned text
match it (see `data.curate.filters_ref`). Rules always apply per line (datatrove's optional
per-sentence mode, split_paragraph=False, is not offered); the bad-words list is not part of it.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar

from data.curate import text as T
from data.curate.base import Doc, Stage, register
from data.errors import DataError

# Wikipedia-style citation marks "[1]", "[]", "[edit]", "[citation needed]" are deleted from a
# line before the punctuation test (TFDS c4_utils; datatrove's CITATION_REGEX).
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
# "We only retained lines that ended in a terminal punctuation mark (i.e. a period, exclamation
# mark, question mark, or end quotation mark)"; a trailing "..." does not count.
_END_PUNCTUATION = (".", "?", "!", '"', "'")
_ELLIPSIS = "..."
# TFDS c4_utils removes lines about cookies and terms of use (boilerplate), not in the paper's list.
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                     "use of cookies", "use cookies")
_LINE_REASONS = ("too_long_word", "no_terminal_punct", "too_few_words", "javascript", "policy")


@register
class C4(Stage):
  """C4 line cleaning and document rules; see the module docstring."""
  name = "c4"
  defaults: ClassVar[dict[str, Any]] = {
      # Delete "[1]", "[edit]", "[citation needed]" from lines (TFDS c4_utils).
      "remove_citations": True,
      # Drop lines not ending in . ? ! " ' (or ending in "..."): C4's main line rule.
      "filter_no_terminal_punct": True,
      # "We discarded any page with fewer than 5 sentences" (counted over kept lines); -1 disables.
      "min_num_sentences": 5,
      # "and only retained lines that contained at least 3 words" (whitespace-separated); -1 disables.
      "min_words_per_line": 3,
      # TFDS c4_utils: drop a line with a "word" over 1000 characters (junk, minified code); -1 disables.
      "max_word_length": 1000,
      # "We removed any page where the phrase 'lorem ipsum' appeared" (placeholder text).
      "filter_lorem_ipsum": True,
      # "We removed any line with the word Javascript" (JavaScript-required warnings).
      "filter_javascript": True,
      # "We removed any pages that contained a curly bracket" (code).
      "filter_curly_bracket": True,
      # Lines naming a cookie / privacy / terms-of-use policy (POLICY_SUBSTRINGS).
      "filter_policy": True,
  }

  def __init__(self, **config: Any):
    super().__init__(**config)
    c = self.config
    for key in ("remove_citations", "filter_no_terminal_punct", "filter_lorem_ipsum",
                "filter_javascript", "filter_curly_bracket", "filter_policy"):
      if not isinstance(c[key], bool):
        raise DataError(f"stage {self.name!r}: {key} must be true or false, got {c[key]!r}")
    for key in ("min_num_sentences", "min_words_per_line", "max_word_length"):
      if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < -1:
        raise DataError(f"stage {self.name!r}: {key} must be an integer >= -1 (-1 disables), got {c[key]!r}")

  def setup(self) -> None:
    T.warm_up()

  def process(self, doc: Doc) -> Doc | str:
    c = self.config
    max_word = c["max_word_length"]
    min_words = c["min_words_per_line"]
    min_sentences = c["min_num_sentences"]
    removed = dict.fromkeys(_LINE_REASONS, 0)
    n_sentences = 0
    kept: list[str] = []
    for line in doc.text.splitlines():
      line = line.strip()
      words = line.split()  # words for the length rules are whitespace-separated, as in C4
      if max_word != -1 and any(len(w) > max_word for w in words):
        removed["too_long_word"] += 1
        continue
      if c["remove_citations"]:
        line = _CITATION.sub("", line)
      if c["filter_no_terminal_punct"] and (not line.endswith(_END_PUNCTUATION) or line.endswith(_ELLIPSIS)):
        removed["no_terminal_punct"] += 1
        continue
      if len(words) < min_words:  # counted before citations were removed, as in the reference
        removed["too_few_words"] += 1
        continue
      lower = line.lower()
      if c["filter_lorem_ipsum"] and "lorem ipsum" in lower:
        return "lorem_ipsum"
      if c["filter_javascript"] and "javascript" in lower:
        removed["javascript"] += 1
        continue
      if c["filter_curly_bracket"] and "{" in line:
        return "curly_bracket"
      if c["filter_policy"] and any(p in lower for p in POLICY_SUBSTRINGS):
        removed["policy"] += 1
        continue
      # Sentences as spaCy's sentencizer splits each kept line; once enough are found the count
      # no longer matters, so stop counting.
      if min_sentences != -1 and n_sentences < min_sentences:
        n_sentences += T.sentence_count(line)
      kept.append(line)
    if n_sentences < min_sentences:
      return "too_few_sentences"
    for reason, n in removed.items():
      if n:
        self.counts[f"lines_removed_{reason}"] += n
    self.counts["lines_kept"] += len(kept)
    doc.text = "\n".join(kept).strip()
    return doc
