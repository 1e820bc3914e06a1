"""Side-by-side check of the heuristic filters against FineWeb's reference implementations (datatrove).

`compare_with_datatrove(texts)` runs each of our stages (`gopher_repetition`, `gopher_quality`, `c4`,
`fineweb`) and its datatrove counterpart (GopherRepetitionFilter, GopherQualityFilter,
C4QualityFilter, FineWebQualityFilter), built with equal parameters, over the same texts, and returns
per filter the share of identical keep/drop decisions, of identical drop reasons, (for c4) of
identical cleaned texts, and docs/s for both. `python -m data.bench` calls it; run this module to
print the comparison on the sample texts from the shared data folder as JSON lines:

  python -m data.curate.filters_ref [--shared ../shared/data] [--n 2000]   # --shared defaults to $SHARED_DATA

datatrove (and spaCy, which it uses to split words) is imported only here, lazily: the stages
themselves do not need it. Our word splitter keeps a per-chunk cache; it is cleared before each
timed run, so both sides start cold on the same texts.
"""
from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import random
import re
import time
from collections.abc import Callable
from typing import Any

from data.curate import text as T
from data.curate.base import Doc, Stage, shared_data_dir
from data.curate.c4 import C4
from data.curate.fineweb import FineWeb
from data.curate.gopher import GopherQuality, GopherRepetition

FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")


def _reference(name: str, stage: Stage):
  """The datatrove filter for our stage `name`, with the stage's parameters."""
  # Imported here: only the bench and the tests need datatrove.
  from datatrove.pipeline import filters as F

  c = stage.config
  if name == "gopher_repetition":
    return F.GopherRepetitionFilter(
        dup_line_frac=c["dup_line_frac"], dup_para_frac=c["dup_para_frac"],
        dup_line_char_frac=c["dup_line_char_frac"], dup_para_char_frac=c["dup_para_char_frac"],
        top_n_grams=tuple(c["top_n_grams"]), dup_n_grams=tuple(c["dup_n_grams"]))
  if name == "gopher_quality":
    return F.GopherQualityFilter(
        min_doc_words=c["min_doc_words"], max_doc_words=c["max_doc_words"],
        min_avg_word_length=c["min_avg_word_length"], max_avg_word_length=c["max_avg_word_length"],
        max_symbol_word_ratio=c["max_symbol_word_ratio"],
        max_bullet_lines_ratio=c["max_bullet_lines_ratio"],
        max_ellipsis_lines_ratio=c["max_ellipsis_lines_ratio"],
        max_non_alpha_words_ratio=c["min_alpha_words_ratio"], min_stop_words=c["min_stop_words"],
        stop_words=list(c["stop_words"]))
  if name == "c4":
    return F.C4QualityFilter(
        split_paragraph=True, remove_citations=c["remove_citations"],
        filter_no_terminal_punct=c["filter_no_terminal_punct"],
        min_num_sentences=c["min_num_sentences"], min_words_per_line=c["min_words_per_line"],
        max_word_length=c["max_word_length"], filter_lorem_ipsum=c["filter_lorem_ipsum"],
        filter_javascript=c["filter_javascript"], filter_curly_bracket=c["filter_curly_bracket"],
        filter_policy=c["filter_policy"])
  if name == "fineweb":
    return F.FineWebQualityFilter(
        line_punct_thr=c["line_punct_thr"], line_punct_exclude_zero=c["line_punct_exclude_zero"],
        stop_chars=tuple(c["stop_chars"]) or None, short_line_thr=c["short_line_thr"],
        short_line_length=c["short_line_length"], char_duplicates_ratio=c["char_duplicates_ratio"],
        new_line_ratio=c["new_line_ratio"])
  raise ValueError(f"no reference filter for {name!r}")


_STAGES: dict[str, type[Stage]] = {"gopher_repetition": GopherRepetition, "gopher_quality": GopherQuality,
                                   "c4": C4, "fineweb": FineWeb}
# datatrove's drop reasons, where ours differ in name.
_REASON = {"gopher_quality": lambda r: "too_few_stop_words" if r == "gopher_enough_stop_words"
           else r.removeprefix("gopher_")}


def _timed(fn: Callable[[str], Any], texts: list[str]) -> tuple[list[Any], float]:
  start = time.perf_counter()
  out = [fn(t) for t in texts]
  return out, time.perf_counter() - start


def compare_with_datatrove(texts: list[str], stages: dict[str, dict[str, Any]] | None = None,
                           filters: tuple[str, ...] = FILTERS) -> list[dict[str, Any]]:
  """Per filter: {name, n, agreement, reason_agreement, [text_agreement,] ours_docs_per_s,
  datatrove_docs_per_s, speedup, ours_kept, datatrove_kept, disagreements (up to 5 doc indices)}.

  `stages` optionally overrides options per stage name (same keys as the stage's `defaults`).
  agreement: share of docs with the same keep/drop decision; reason_agreement: same decision and,
  for drops, the same first failing rule; text_agreement (c4): share of docs kept by both whose
  cleaned texts are equal, among docs kept by both.
  """
  from datatrove.data import Document

  results = []
  for name in filters:
    stage = _STAGES[name](**(stages or {}).get(name, {}))
    ref = _reference(name, stage)
    stage.setup()
    # Warm-up outside the timings: spaCy's model load (~1 s), our regex compilation.
    ref.filter(Document(text="Warm up the tokenizer. " * 20, id="warmup"))
    stage.process(Doc(id="warmup", text="Warm up the tokenizer. " * 20, domain="web"))

    def ours(text: str, stage: Stage = stage) -> tuple[str | None, str]:
      out = stage.process(Doc(id="", text=text, domain="web"))
      return (None, out.text) if isinstance(out, Doc) else (out, text)

    def theirs(text: str, ref=ref) -> tuple[str | None, str]:
      doc = Document(text=text, id="")
      out = ref.filter(doc)
      return (None, doc.text) if out is True else (out[1] if isinstance(out, tuple) else "", text)

    T.clear_cache()
    ref_out, ref_s = _timed(theirs, texts)
    T.clear_cache()
    our_out, our_s = _timed(ours, texts)
    rename = _REASON.get(name, lambda r: r)
    same = [(a is None) == (b is None) for (a, _), (b, _) in zip(our_out, ref_out)]
    same_reason = [a == (None if b is None else rename(b)) for (a, _), (b, _) in zip(our_out, ref_out)]
    n = len(texts)
    row = {"name": name, "n": n,
           "agreement": sum(same) / n if n else 1.0,
           "reason_agreement": sum(same_reason) / n if n else 1.0,
           "ours_docs_per_s": n / our_s if our_s else float("inf"),
           "datatrove_docs_per_s": n / ref_s if ref_s else float("inf"),
           "speedup": ref_s / our_s if our_s else float("inf"),
           "ours_kept": sum(a is None for a, _ in our_out),
           "datatrove_kept": sum(b is None for b, _ in ref_out),
           "disagreements": [i for i, s in enumerate(same) if not s][:5]}
    if name == "c4":
      both = [(a, b) for (ra, a), (rb, b) in zip(our_out, ref_out) if ra is None and rb is None]
      row["text_agreement"] = sum(a == b for a, b in both) / len(both) if both else 1.0
    results.append(row)
  return results


# --- sample texts ----------------------------------------------------------------------------------


def sample_texts(shared: str | pathlib.Path, n: int = 400, seed: int = 0) -> list[str]:
  """A deterministic mix of real and constructed texts from the shared data folder.

  The 30 real web documents (CCNet JSONL, Dolma JSONL.gz), Tiny Shakespeare passages, WikiText-2
  (valid) articles, Python's bundled reference topics (`pydoc_data.topics`), and documents stitched
  from real web lines with repeated lines, lists, short lines and boilerplate at random rates, so
  that every rule's threshold is crossed from both sides. Texts are capped at 20,000 characters.
  """
  shared = pathlib.Path(shared)
  rng = random.Random(seed)
  web = web_documents(shared)
  out = list(web)
  shakespeare = (shared / "text" / "tinyshakespeare.txt").read_text().split("\n\n")
  wiki = [a for a in re.split(r"\n = [^=\n]+ = \n", (shared / "text" / "wikitext2_valid.txt").read_text())
          if a.strip()]
  from pydoc_data.topics import topics
  prose = [topics[k] for k in sorted(topics)]
  lines = [line for doc in web for line in doc.splitlines() if line.strip()]
  n_each = max(1, (n - len(out)) // 4)
  for _ in range(n_each):
    i = rng.randrange(len(shakespeare))
    out.append("\n\n".join(shakespeare[i:i + rng.randint(1, 30)]))
  out += rng.sample(wiki, min(n_each, len(wiki)))
  out += rng.sample(prose, min(n_each, len(prose)))
  while len(out) < n:
    out.append(_stitched(rng, lines))
  return [t[:20_000] for t in out[:n]]


_BOILERPLATE = ("Home", "About Us", "Contact", "Privacy Policy", "This site uses cookies.",
                "Please enable JavaScript to view the comments.", "Lorem ipsum dolor sit amet.",
                "Read more...", "#tag #news #today", "Share this:", "{{ template }}",
                "Copyright 2019. All rights reserved.", "1 2 3 4 5 Next »", "Posted by admin [1]")


def _stitched(rng: random.Random, lines: list[str]) -> str:
  """One document of real web lines with one kind of noise at a random rate (0 to ~2x a threshold)."""
  kind = rng.choice(("plain", "duplicates", "boilerplate", "bullets", "ellipsis", "hashes", "junk",
                     "menu"))
  rate = rng.random()
  doc: list[str] = []
  for _ in range(rng.randint(2, 60)):
    line = rng.choice(lines)
    if rng.random() < rate:
      if kind == "duplicates" and doc:
        line = rng.choice(doc)
      elif kind == "boilerplate":
        line = rng.choice(_BOILERPLATE[:6] + _BOILERPLATE[7:]) if rng.random() > 0.05 else _BOILERPLATE[6]
      elif kind == "bullets":
        line = rng.choice(("- ", "• ", "  -")) + line
      elif kind == "ellipsis":
        line = line[:rng.randint(10, 80)] + rng.choice(("...", "…", " ..."))
      elif kind == "hashes":
        line = " ".join("#" + w if rng.random() < 0.5 else w for w in line.split())
      elif kind == "junk":
        line = "".join(rng.choice("abcdefghij0123456789/+=") for _ in range(rng.choice((12, 40, 1200))))
      elif kind == "menu":
        line = " ".join(line.split()[:rng.randint(1, 4)])
    doc.append(line)
  return rng.choice(("\n", "\n", "\n\n")).join(doc)


def web_documents(shared: str | pathlib.Path) -> list[str]:
  """The texts of the CCNet (2 x 10) and Dolma (10) sample documents, in file order."""
  web = pathlib.Path(shared) / "web"
  texts = []
  for path in sorted(web.glob("ccnet_en_head_*.jsonl")):
    texts += [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
  with gzip.open(web / "dolma_documents_000.json.gz", "rt") as f:
    texts += [json.loads(line)["text"] for line in f if line.strip()]
  return texts


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shared", default=str(shared_data_dir()), help="the shared data folder")
  parser.add_argument("--n", type=int, default=2000, help="number of sample texts")
  args = parser.parse_args(argv)
  texts = sample_texts(args.shared, args.n)
  for row in compare_with_datatrove(texts):
    print(json.dumps(row))


if __name__ == "__main__":
  main()
