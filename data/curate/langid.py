"""Language-id stage (`langid`): keep documents in the wanted languages, identified offline.

Registered per-document stage, after `extract`:

  stages.langid.languages=("en",)  stages.langid.min_score=0.65  stages.langid.backend="py3langid"

Sets `meta["lang"]` (ISO 639 code) and `meta["lang_score"]` (0..1, higher = surer) on every doc,
then keeps it when the score is >= `min_score` and the language is in `languages`. Drop reasons:
"low_score" (unsure which language: code, tables, very short or mixed text) and "other_language"
(confidently another language); `counts` holds `lang_<code>` for every doc seen, so the report shows
the language mix of the input. An empty `languages` tuple keeps every language (tagging only).

Backends, both with the model inside the pip package (nothing downloaded at run time):
  * "py3langid" (default): langid.py's naive Bayes over byte n-grams, 140 labels, probabilities
    normalized over all labels (`norm_probs=True`). 0.65 is FineWeb's English threshold (Penedo et
    al. 2024), set for fastText's lid.176 scores; py3langid's are peakier (the 30 CCNet/Dolma samples
    in ../shared/data/web score >= 0.91 here, including the two that CCNet's fastText scored 0.64
    and 0.65), so 0.65 drops only text it is really unsure about.
  * "resiliparse": `resiliparse.parse.lang.detect_fast`, 101 languages, tens of times faster but
    cruder. It returns a rank distance d (lower = closer; "unknown" beyond its cutoff of 1200); the
    score is 1 - d / 1200. On their first 2,000 chars the 28 clean English samples score 0.61-0.82,
    and the two that CCNet's fastText scored 0.64-0.65 fall below 0.5 (one of them is called
    Luxembourgish): use min_score ~0.5 with it, which drops borderline pages like those two.
"""
from __future__ import annotations

from typing import Any, ClassVar

from data.curate.base import Doc, Stage, register
from data.errors import DataError

BACKENDS = ("py3langid", "resiliparse")
# resiliparse.parse.lang.detect_fast's default cutoff: beyond this distance it answers "unknown".
_RESILIPARSE_CUTOFF = 1200

_MODELS: dict[str, Any] = {}  # one loaded identifier per process (py3langid's takes ~0.8 s to load)


def _py3langid():
  if "py3langid" not in _MODELS:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # pylint: disable=g-import-not-at-top
    _MODELS["py3langid"] = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
  return _MODELS["py3langid"]


def _labels(backend: str) -> list[str]:
  if backend == "py3langid":
    return _py3langid().labels
  from resiliparse.parse.lang import supported_langs  # pylint: disable=g-import-not-at-top
  return supported_langs()


def identify(text: str, backend: str = "py3langid") -> tuple[str, float]:
  """(language code, score in 0..1) for `text`; ("und", 0.0) when it has no letters at all."""
  if not any(c.isalpha() for c in text):  # both models otherwise name a language for "" or digits
    return "und", 0.0
  if backend == "py3langid":
    lang, score = _py3langid().classify(text)
    return lang, float(score)
  from resiliparse.parse.lang import detect_fast  # pylint: disable=g-import-not-at-top
  lang, distance = detect_fast(text, cutoff=_RESILIPARSE_CUTOFF)
  if lang == "unknown":
    return "und", 0.0
  return lang, max(0.0, 1.0 - distance / _RESILIPARSE_CUTOFF)


@register
class LangId(Stage):
  """Language filter; see the module docstring."""
  name = "langid"
  defaults: ClassVar[dict[str, Any]] = {
      "backend": "py3langid",
      "languages": ("en",),
      "min_score": 0.65,
      # Only the first max_chars characters are classified. py3langid walks a DFA over each byte in
      # Python, so its cost is linear in length (~1.4 us/char here): 2,000 chars run ~650 docs/s per
      # core against ~290 at 10,000, with the same decision on every CCNet/Dolma sample. Extraction
      # has already dropped most boilerplate, so the start of the text is the page's own text.
      "max_chars": 2000,
  }

  def __init__(self, **config: Any):
    super().__init__(**config)
    c = self.config
    if c["backend"] not in BACKENDS:
      raise DataError(f"stage 'langid': backend must be one of {BACKENDS}, got {c['backend']!r}")
    if isinstance(c["languages"], str):
      raise DataError(f"stage 'langid': languages must be a tuple of codes such as ('en',), got "
                      f"the string {c['languages']!r}")
    self.languages = frozenset(c["languages"])
    if not 0.0 <= float(c["min_score"]) <= 1.0:
      raise DataError(f"stage 'langid': min_score must be in [0, 1], got {c['min_score']}")
    if int(c["max_chars"]) <= 0:
      raise DataError(f"stage 'langid': max_chars must be > 0, got {c['max_chars']}")
    unknown = self.languages - set(_labels(c["backend"]))
    if unknown:
      raise DataError(f"stage 'langid': backend {c['backend']} does not know language(s) "
                      f"{sorted(unknown)}")

  def setup(self) -> None:
    if self.config["backend"] == "py3langid":
      _py3langid()

  def process(self, doc: Doc) -> Doc | str:
    lang, score = identify(doc.text[: self.config["max_chars"]], self.config["backend"])
    doc.meta["lang"] = lang
    doc.meta["lang_score"] = round(score, 4)
    self.counts[f"lang_{lang}"] += 1
    if score < self.config["min_score"]:
      return "low_score"
    if self.languages and lang not in self.languages:
      return "other_language"
    return doc
