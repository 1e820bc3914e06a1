"""Heuristic filters (data/curate/{en_words,text,gopher,c4,fineweb}.py): the word splitter against spaCy, each
rule just over and just under its threshold, hand-checked real documents from ../shared/data/web, and
keep/drop agreement with datatrove's reference filters (data/curate/filters_ref.py).

Run: python -m pytest -q -p no:xdist tests/test_curate_filters.py
"""
from __future__ import annotations

import importlib.util
import random

import pytest
from conftest import require, shared_data

from data.curate import en_words
from data.curate import text as T
from data.curate.base import STAGES, Doc
from data.curate.c4 import C4
from data.curate.fineweb import FineWeb
from data.curate.gopher import GopherQuality, GopherRepetition, _NGrams
from data.errors import DataError


def run(stage, text: str):
  """The stage's verdict: "keep" or the drop reason."""
  out = stage.process(Doc(id="t", text=text, domain="web"))
  return "keep" if isinstance(out, Doc) else out


def need(module: str) -> None:
  require(importlib.util.find_spec(module) is not None, f"{module} is not installed")


@pytest.fixture(scope="module")
def web_docs() -> list[str]:
  from data.curate.filters_ref import web_documents
  root = shared_data() / "web"
  require(root.is_dir(), f"shared data not found at {root} (set SHARED_DATA)")
  docs = web_documents(shared_data())
  assert len(docs) == 30
  return docs


# --- word splitting ----------------------------------------------------------------------------


def test_words_by_hand():
  # spaCy's English rules: contractions, possessive 's, punctuation split off, special-case
  # abbreviations and emoticons kept whole, infix hyphens, URLs kept whole, units after numbers.
  assert T.words("I don't know, (see above): it's 5km... Mr. Smith's e-mail is www.example.com/a-b.") == [
      "I", "do", "n't", "know", ",", "(", "see", "above", "):", "it", "'s", "5", "km", "...", "Mr.",
      "Smith", "'s", "e", "-", "mail", "is", "www.example.com/a-b", "."]
  assert T.words("U.S. co-op :) ABC. well ill 10a.m. can’t") == [
      "U.S.", "co", "-", "op", ":)", "ABC", ".", "well", "ill", "10", "a.m.", "ca", "n’t"]
  assert T.words("  \n\t ") == []


def test_special_cases_are_spacys():
  need("spacy")
  import spacy
  from spacy.symbols import ORTH
  rules = {k: tuple(t[ORTH] for t in v) for k, v in spacy.blank("en").tokenizer.rules.items()}
  # spaCy also lists whitespace strings, which never reach our per-chunk splitter.
  assert {k: v for k, v in rules.items() if k.strip()} == en_words.SPECIAL_CASES


def test_punctuation_sets_are_the_references():
  need("datatrove")
  need("spacy")
  from datatrove.utils.text import PUNCTUATION_SET, TERMINAL_PUNCTUATION
  from spacy.pipeline import Sentencizer
  assert T.TERMINAL_PUNCTUATION == TERMINAL_PUNCTUATION
  assert T.SYMBOL_CHARS == PUNCTUATION_SET
  assert set(Sentencizer.default_punct_chars) == T.SENTENCE_PUNCT


def _fuzz_texts(n: int, seed: int) -> list[str]:
  rng = random.Random(seed)
  pool = list("abcXYZé ß.,;:!?'\"()[]{}<>-–—/\\#$%&*+=@_~`^|0123456789’“”…°²·€£") + [
      "http://", "www.", ".com", "e.g.", "Mr.", "don't", ":)", "):", "...", "U.S.", "co.", "km",
      "ñ", "Ж", "λ", "中", "😀", "©", "\u00a0", "\t", "  ", "\n", "x.Y", " it's ", "(8)", "US$5"]
  return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_words_match_spacy(web_docs):
  need("datatrove")
  need("spacy")
  from datatrove.utils.word_tokenizers import load_word_tokenizer
  spacy_words = load_word_tokenizer("en").word_tokenize  # spacy.blank("en"), whitespace dropped
  rng = random.Random(1)
  # Long chunks ending in suffixes: the suffix search only looks at a chunk's tail.
  long_chunks = ["".join(rng.choice("ab0Y.-/'") for _ in range(rng.randint(5, 40))) +
                 rng.choice(["....", "5km", "'s", "AB.", "x.", "°C.", "US$", ").", "…", "5тбكم"])
                 for _ in range(1000)]
  texts = web_docs + _fuzz_texts(3000, seed=0) + long_chunks
  diffs = [t for t in texts if T.words(t) != spacy_words(t)]
  assert not diffs, diffs[:3]


def test_sentence_count_matches_spacy(web_docs):
  need("datatrove")
  need("spacy")
  from datatrove.utils.text import split_into_sentences
  lines = [line.strip() for doc in web_docs for line in doc.splitlines() if line.strip()]
  lines += [t.strip() for t in _fuzz_texts(2000, seed=2) if t.strip()]
  diffs = [line for line in lines if T.sentence_count(line) != len(split_into_sentences(line))]
  assert not diffs, diffs[:3]


def test_sentence_count_by_hand():
  assert T.sentence_count("One two three. Four five six! Seven?") == 3
  assert T.sentence_count("Mr. Smith went to Washington. He left.") == 2  # "Mr." is one token
  assert T.sentence_count("Wait... what") == 1  # "..." is not a sentence-final token
  assert T.sentence_count("Done. ) next") == 2  # punctuation after the stop stays in the sentence
  assert T.sentence_count("") == 0


def test_duplicates_counts_repeats_after_the_first():
  assert T.duplicates(["a", "bb", "a", "bb", "a", "c"]) == (3, 4)
  assert T.duplicates([]) == (0, 0)


# --- registry and config -----------------------------------------------------------------------


def test_registered_with_typed_defaults():
  for name, cls in [("gopher_repetition", GopherRepetition), ("gopher_quality", GopherQuality),
                    ("c4", C4), ("fineweb", FineWeb)]:
    assert STAGES[name] is cls
    assert all(v is not None and not isinstance(v, list) for v in cls.defaults.values())
    cls()  # defaults are valid


@pytest.mark.parametrize("cls, bad", [
    (GopherRepetition, {"dup_line_frac": 1.5}),
    (GopherRepetition, {"top_n_grams": ((2, "x"),)}),
    (GopherRepetition, {"dup_n_grams": ((0, 0.1),)}),
    (GopherQuality, {"min_doc_words": -1}),
    (GopherQuality, {"stop_words": "the"}),
    (GopherQuality, {"min_alpha_words_ratio": True}),
    (C4, {"min_num_sentences": -2}),
    (C4, {"filter_policy": "yes"}),
    (FineWeb, {"short_line_thr": 2}),
    (FineWeb, {"stop_chars": "."}),
    (FineWeb, {"no_such_option": 1}),
])
def test_bad_config_raises(cls, bad):
  with pytest.raises(DataError, match=cls.name):
    cls(**bad)


# --- gopher_quality: each rule at its threshold ------------------------------------------------

STOPS = ["the", "and"]


def words_text(tokens: list[str], lines: int = 1) -> str:
  """Tokens joined by spaces (each one a spaCy word), split into `lines` lines."""
  step = -(-len(tokens) // lines)
  return "\n".join(" ".join(tokens[i:i + step]) for i in range(0, len(tokens), step))


def test_gopher_quality_word_count():
  g = GopherQuality()
  assert run(g, words_text(STOPS + ["cat"] * 48)) == "keep"          # 50 words
  assert run(g, words_text(STOPS + ["cat"] * 47)) == "short_doc"     # 49 words
  # Symbol-only tokens are not words for the count: 49 words + 9 "," is still short.
  assert run(g, words_text(STOPS + ["cat"] * 47 + [","] * 9)) == "short_doc"
  small = GopherQuality(max_doc_words=60)
  assert run(small, words_text(STOPS + ["cat"] * 58)) == "keep"
  assert run(small, words_text(STOPS + ["cat"] * 59)) == "long_doc"
  assert run(g, words_text(STOPS + ["cat"] * 99_999)) == "long_doc"  # 100,001 words


def test_gopher_quality_mean_word_length():
  g = GopherQuality()
  # the, and, 48 x "cat": 150 characters / 50 words = 3.0, allowed; one "at" makes it 149 / 50.
  assert run(g, words_text(STOPS + ["cat"] * 48)) == "keep"
  assert run(g, words_text(STOPS + ["cat"] * 47 + ["at"])) == "below_avg_threshold"
  # 48 ten-letter words + the + and: (480 + 6) / 50 = 9.72; with 11-letter words 10.68.
  assert run(g, words_text(STOPS + ["abcdefghij"] * 48)) == "keep"
  assert run(g, words_text(STOPS + ["abcdefghijk"] * 48)) == "above_avg_threshold"


def test_gopher_quality_hashes_and_ellipses():
  g = GopherQuality()
  base = STOPS + ["cat"] * 58  # 60 words
  assert run(g, words_text(base + ["#"] * 6)) == "keep"                # 6 / 66 = 0.091
  assert run(g, words_text(base + ["#"] * 7)) == "too_many_hashes"     # 7 / 67 = 0.104
  assert run(g, words_text(base + ["…"] * 7)) == "too_many_ellipsis"
  # Lines ending in an ellipsis: 3 of 10 is allowed, 4 of 10 is not.
  lines = [" ".join(STOPS + ["cat"] * 6)] * 10
  assert run(g, "\n".join(l + (" ..." if i < 3 else "") for i, l in enumerate(lines))) == "keep"
  assert run(g, "\n".join(l + (" ..." if i < 4 else "") for i, l in enumerate(lines))) == "too_many_end_ellipsis"


def test_gopher_quality_bullets():
  g = GopherQuality()
  # "•" is not a symbol to the word count, so longer words keep the mean length above 3.
  line = " ".join(STOPS + ["kitten"] * 6)
  assert run(g, "\n".join(["- " + line] * 9 + [line])) == "keep"                   # 90%
  assert run(g, "\n".join(["  • " + line] * 5 + ["- " + line] * 5)) == "too_many_bullets"


def test_gopher_quality_alpha_words_and_stop_words():
  g = GopherQuality()
  # 80 of 100 words with a letter is enough, 80 of 101 is not (numbers and "," have no letter).
  assert run(g, words_text(STOPS + ["cat"] * 78 + ["2020"] * 10 + [","] * 10)) == "keep"
  assert run(g, words_text(STOPS + ["cat"] * 78 + ["2020"] * 11 + [","] * 10)) == "below_alpha_threshold"
  assert run(g, words_text(["the", "cat"] + ["cat"] * 48)) == "too_few_stop_words"
  assert run(g, words_text(["The", "And"] + ["cat"] * 48)) == "too_few_stop_words"  # case-sensitive
  assert run(GopherQuality(min_stop_words=0), words_text(["cat"] * 50)) == "keep"


# --- gopher_repetition -------------------------------------------------------------------------


def unique_words(n: int, start: int = 0) -> list[str]:
  return [f"w{i:05d}" for i in range(start, start + n)]


def test_gopher_repetition_paragraphs_and_lines():
  g = GopherRepetition()
  long_paras = [" ".join(unique_words(40, 100 * i)) + "." for i in range(6)]
  # 10 paragraphs, 3 repeats of a short one: 0.3 is allowed, 4 of 11 (0.36) is not.
  assert run(g, "\n\n".join(long_paras + ["Short."] * 4)) == "keep"
  assert run(g, "\n\n".join(long_paras + ["Short."] * 5)) == "dup_para_frac"
  # One long paragraph repeated once among 6: 1/6 of paragraphs, but over 20% of the characters.
  paras = [" ".join(unique_words(10, 100 * i)) for i in range(5)]
  big = " ".join(unique_words(60, 900))
  text = "\n\n".join(paras + [big, big])
  assert len(big) / len(text) > 0.2
  assert run(g, text) == "dup_para_char_frac"
  # The same with single newlines: lines instead of paragraphs.
  assert run(g, "\n".join(paras + [big, big])) == "dup_line_char_frac"
  lines = [" ".join(unique_words(12, 100 * i)) for i in range(6)]
  assert run(g, "\n".join(lines + ["ok"] * 4)) == "keep"           # 3 repeats of 10 lines: 0.3
  assert run(g, "\n".join(lines + ["ok"] * 5)) == "dup_line_frac"  # 4 of 11: 0.36
  assert run(g, "") == "empty"


def test_gopher_repetition_top_bigram_threshold():
  g = GopherRepetition()
  outcomes = set()
  for j in range(11):
    # 10 x "foo bar" followed by 3 or 4 distinct words: 7 * 10 / len(text) runs from 0.24 to 0.19.
    tokens = []
    for i, fill in enumerate([3] * (10 - j) + [4] * j):
      tokens += ["foo", "bar"] + unique_words(fill, 10 * i)
    text = " ".join(tokens)
    share = len("foo bar") * 10 / len(text)  # "foo bar" is the most frequent 2-gram
    outcomes.add(run(g, text))
    assert run(g, text) == ("top_2_gram" if share > 0.2 else "keep"), (j, share)
  assert outcomes == {"top_2_gram", "keep"}


def test_gopher_repetition_duplicate_ngram_threshold():
  g = GopherRepetition()
  gram = ["a", "b", "c", "d", "x" * 24]  # 28 characters without spaces
  outcomes = set()
  for filler in range(4, 30):
    text = " ".join(gram + unique_words(filler) + gram)
    # The repeat covers 28 characters; the most frequent 4-gram ("a b c d", 7 x 2) stays under 0.16.
    share = 28 / len(text)
    outcomes.add(run(g, text))
    assert run(g, text) == ("duplicated_5_n_grams" if share > 0.15 else "keep"), (filler, share)
  assert outcomes == {"duplicated_5_n_grams", "keep"}


def test_ngram_stats_by_hand():
  grams = _NGrams(("a",) * 7)
  # 5-grams at 0, 1, 2 are equal: 0 is new, 1 repeats (+5 chars) and the scan jumps past 5.
  assert grams.duplicate_chars(5) == 5
  assert grams.top_chars(2) == len("a a") * 6
  ties = _NGrams(("x", "yy", "x", "zzz"))
  # All 2-grams occur once: the first one seen ("x yy") is the most frequent, as in Counter.
  assert ties.top_chars(2) == len("x yy")
  assert ties.top_chars(5) == 0 and ties.duplicate_chars(5) == 0


# --- c4 ----------------------------------------------------------------------------------------

GOOD = ["The first line is a sentence.", "Another line ends here!", "Is this a question?",
        'He said "this is a quote."', "One more line of text.", "The last line is here."]


def test_c4_cleans_lines_and_counts_reasons():
  c = C4()
  text = "\n".join([
      GOOD[0], "Menu", "No terminal punctuation here", GOOD[1], "Too short.",
      "Please enable JavaScript to continue.", GOOD[2], "Read our privacy policy here.",
      "  " + GOOD[3] + "  ", "A line that trails off...", "A cited sentence here.[12]",
      "A cited line [citation needed]", GOOD[4], "x" * 1001 + " is long.", "x" * 1000 + " is fine."])
  doc = Doc(id="t", text=text, domain="web")
  out = c.process(doc)
  assert isinstance(out, Doc)
  assert out.text.split("\n") == [GOOD[0], GOOD[1], GOOD[2], GOOD[3], "A cited sentence here.",
                                  GOOD[4], "x" * 1000 + " is fine."]
  assert dict(c.counts) == {"lines_kept": 7, "lines_removed_no_terminal_punct": 4,
                            "lines_removed_too_few_words": 1, "lines_removed_javascript": 1,
                            "lines_removed_policy": 1, "lines_removed_too_long_word": 1}


def test_c4_document_rules():
  c = C4()
  assert run(c, "\n".join(GOOD[:5])) == "keep"                      # 5 sentences
  assert run(c, "\n".join(GOOD[:4])) == "too_few_sentences"
  assert run(c, "One. Two sentences here.\nThree and four. Five here!\nOne more line.") == "keep"
  assert run(c, "\n".join(GOOD + ["Lorem ipsum dolor sit amet."])) == "lorem_ipsum"
  assert run(c, "\n".join(GOOD + ["We use {curly} brackets here."])) == "curly_bracket"
  # Both rules look only at lines that passed the line rules.
  assert run(c, "\n".join(GOOD + ["lorem ipsum", "function() { return 1 }"])) == "keep"
  assert run(C4(min_num_sentences=-1), "Nothing ends here") == "keep"
  assert run(C4(filter_curly_bracket=False), "\n".join(GOOD + ["A {b} c."])) == "keep"


# --- fineweb -----------------------------------------------------------------------------------


def fw_lines(n: int, start: int = 0) -> list[str]:
  """Distinct lines of 6 words, over 30 characters, without final punctuation."""
  return [" ".join(unique_words(6, 10 * i)) for i in range(start, start + n)]


def test_fineweb_line_punctuation():
  f = FineWeb()
  assert run(f, "\n".join([l + "." for l in fw_lines(12)] + fw_lines(88, 12))) == "keep"  # 12%
  assert run(f, "\n".join([l + "." for l in fw_lines(11)] + fw_lines(89, 11))) == "line_punct_ratio"
  assert run(f, "\n".join(l + '"' for l in fw_lines(20))) == "line_punct_ratio"  # quotes don't count
  assert run(FineWeb(line_punct_exclude_zero=True), "\n".join(fw_lines(20))) == "keep"
  assert run(FineWeb(stop_chars=('"',)), "\n".join(l + '"' for l in fw_lines(20))) == "keep"
  assert run(f, " \n\n\t\n") == "empty"


def test_fineweb_short_lines_duplicates_and_lists():
  f = FineWeb()
  long = [l + "." for l in fw_lines(33)]
  short = [f"Item {i}." for i in range(67)]
  assert run(f, "\n".join(long + short)) == "keep"                   # 67% short
  assert run(f, "\n".join(long[:32] + short + ["Item x."])) == "short_line_ratio"
  lines = [l + "." for l in fw_lines(100)]                           # 100 x 42 characters
  assert run(f, "\n".join(lines + lines[:1])) == "keep"               # 42 repeated: 0.99%
  assert run(f, "\n".join(lines + lines[:2])) == "char_dup_ratio"     # 84: 1.96%
  # 10 lines of 3 words: 9 newlines / 30 words = 0.3 is allowed; 10 lines of 2 words (0.45) are not.
  three = [f"{w} gamma{i}." for i, w in enumerate(unique_words(10))]
  assert run(FineWeb(short_line_thr=1.0), "\n".join(three)) == "keep"
  two = [f"gamma{i}." for i in range(10)]
  assert run(FineWeb(short_line_thr=1.0), "\n".join(two)) == "list_ratio"


# --- hand-checked real documents ---------------------------------------------------------------


def test_ccnet_fanlisting_page_fails_the_alpha_rule(web_docs):
  # ccnet_en_head_0091.jsonl line 5, "Welcome to X, the Charles Xavier fanlisting ...": 107 spaCy
  # words, of which 24 have no letter (19 punctuation tokens: 8 ",", 5 ".", 2 "!", ":", "/", "-",
  # ")"; and the numbers 10, 2014, 4, 0, 2020): 83 / 107 = 0.776 < 0.8.
  text = web_docs[4]
  assert text.startswith("Welcome to X, the Charles Xavier fanlisting")
  words = T.words(text)
  assert len(words) == 107
  assert sum(any(ch.isalpha() for ch in w) for w in words) == 83
  assert run(GopherQuality(), text) == "below_alpha_threshold"
  # The other filters keep it: its two lines end in "!" and hold 3 + 4 sentences; no repetition.
  assert run(GopherRepetition(), text) == "keep"
  assert run(C4(), text) == "keep"
  assert run(FineWeb(), text) == "keep"


def test_ccnet_truncated_teasers(web_docs):
  # ccnet_en_head_0174.jsonl line 6: one line, ending "board of directors..." -> 1 of 1 lines ends
  # in an ellipsis (> 30%), and C4 drops that line, leaving no sentence.
  teaser = web_docs[15]
  assert teaser.endswith("board of directors...") and "\n" not in teaser
  assert run(GopherQuality(), teaser) == "too_many_end_ellipsis"
  assert run(C4(), teaser) == "too_few_sentences"
  # Line 10: five headlines cut at "...", 42 words (49 with punctuation): too short for Gopher, no
  # sentence left for C4.
  headlines = web_docs[19]
  assert headlines.startswith("Aborigines in Australia longer than previously tho...")
  assert len([w for w in T.words(headlines) if not T.is_symbol_word(w)]) == 42
  assert run(GopherQuality(), headlines) == "short_doc"
  assert run(C4(), headlines) == "too_few_sentences"


def test_dolma_pages(web_docs):
  # dolma_documents_000.json.gz doc 3, a law-society blog post with navigation around it: C4 keeps
  # exactly the six paragraphs that end in "."; the menu, byline, "noting:" and "[Emphasis added.]"
  # lines go (17 lines without terminal punctuation).
  c = C4()
  out = c.process(Doc(id="dolma:3", text=web_docs[23], domain="web"))
  kept = out.text.split("\n")
  assert [line.split(",")[0][:25] for line in kept] == [
      "In Kazemi Estate v Islami", "In 2003", "Relying on the SIA as a c", "On appeal to the Quebec C",
      "Unlike the United States", "In the face of universal "]
  assert c.counts == {"lines_kept": 6, "lines_removed_no_terminal_punct": 17}
  # Doc 8, a room-booking page: 7 lines, 5 of them at most 30 characters -> 71% short lines.
  booking = web_docs[28]
  assert booking.startswith("Mechanical Engineering\nMeeting Room Booking System")
  assert [len(l) <= 30 for l in booking.split("\n") if l.strip()].count(True) == 5
  assert run(FineWeb(), booking) == "short_line_ratio"
  # Doc 2, a university news index: 114 lines, 12 of which end in "." / "!" / "?" (10.5% < 12%).
  index = web_docs[22]
  lines = [l for l in index.split("\n") if l.strip()]
  assert (len(lines), sum(l[-1] in ".!?" for l in lines)) == (114, 12)
  assert run(FineWeb(), index) == "line_punct_ratio"


# --- agreement with datatrove ------------------------------------------------------------------


def test_agreement_with_datatrove():
  need("datatrove")
  need("spacy")
  from data.curate.filters_ref import compare_with_datatrove, sample_texts
  require((shared_data() / "web").is_dir(), "shared data not found (set SHARED_DATA)")
  texts = sample_texts(shared_data(), n=240)  # the 30 real web docs + 210 varied texts
  rows = {r["name"]: r for r in compare_with_datatrove(texts)}
  assert set(rows) == {"gopher_repetition", "gopher_quality", "c4", "fineweb"}
  for name, r in rows.items():
    print(name, {k: r[k] for k in ("agreement", "reason_agreement", "ours_docs_per_s",
                                    "datatrove_docs_per_s", "ours_kept")})
    assert r["n"] == 240
    assert r["agreement"] >= 0.99, r
    assert r["reason_agreement"] >= 0.99, r
    assert 0 < r["ours_kept"] < 240  # the sample exercises both outcomes
  assert rows["c4"]["text_agreement"] >= 0.99
