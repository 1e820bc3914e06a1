"""Tests for the `pii`, `toxic` and `decontam` curation stages.

PII: a fixture of positives and look-alike negatives (dates, versions, ISBNs, order numbers, prices,
arithmetic), the hand-checked PII in the real web samples, and datatrove's PIIFormatter where the two
overlap (emails, public IPv4). Toxic: the shipped list's provenance, the score formula, hand-checked
real documents (a sexual-health blog, a paper on harassment, HH-RLHF dialogues), the classifier hook.
Decontam: planted GSM8K / HumanEval / WikiText-2 text in real CCNet documents, the unmodified real
documents, flag mode, GSM8K train vs test.
"""
from __future__ import annotations

import gzip
import json
import sys
import time

import pytest

from conftest import require, shared_data
from data.curate import decontam as dc
from data.curate import pii
from data.curate import toxic
from data.curate.base import STAGES, Doc
from data.errors import DataError


def _doc(text: str, i: int = 0) -> Doc:
  return Doc(id=f"t:{i}", text=text, domain="web")


@pytest.fixture(scope="module")
def web_texts() -> dict[str, str]:
  """The 67 real web documents: CCNet and Dolma JSONL, and the WARC responses' main text."""
  root = shared_data() / "web"
  require(root.is_dir(), f"shared web samples not found at {root} (set SHARED_DATA)")
  try:
    from fastwarc.warc import ArchiveIterator, WarcRecordType
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding
  except ImportError:
    require(False, "fastwarc/resiliparse not installed (pip install -e .[curate])")
  texts = {}
  for p in sorted(root.glob("ccnet_en_head_*.jsonl")):
    for i, line in enumerate(open(p, encoding="utf-8")):
      texts[f"{p.name}:{i}"] = json.loads(line)["text"]
  with gzip.open(root / "dolma_documents_000.json.gz", "rt", encoding="utf-8") as f:
    for i, line in enumerate(f):
      texts[f"dolma:{i}"] = json.loads(line)["text"]
  for p in sorted(root.glob("cc_sample_*.warc.gz")):
    with open(p, "rb") as f:
      for r in ArchiveIterator(f, record_types=WarcRecordType.response):
        body = r.reader.read()
        texts[f"{p.name}:{r.record_id}"] = extract_plain_text(
            bytes_to_str(body, detect_encoding(body)), main_content=True)
  assert len(texts) == 67, len(texts)
  return texts


# --- PII --------------------------------------------------------------------------------------------

POSITIVES = [
    ("Mail john.doe@example.com today.", "email"),
    ("Write to jane_smith+news@mail.co.uk.", "email"),
    ("Call (415) 555-2671 now.", "phone"),
    ("Call 415-555-2671 now.", "phone"),
    ("Call 415.555.2671 now.", "phone"),
    ("Call +1 415 555 2671 now.", "phone"),
    ("Toll free 1-800-555-0199.", "phone"),
    ("Phone: 415 555 2671.", "phone"),                 # spaces only, but a cue word before it
    ("London +44 20 7946 0958.", "phone"),
    ("Berlin +49 (0)30 12345678.", "phone"),
    ("Paris +33 1 23 45 67 89.", "phone"),
    ("E.164 +14155552671.", "phone"),
    ("Brussels Tel: +32 (0)2 790 75 75", "phone"),     # from a real Dolma page
    ("DNS 8.8.4.4 answers.", "ip"),
    ("Host 93.184.216.34:443 is up.", "ip"),
    ("v6 2001:4860:4860::8888 answers.", "ip"),
    ("Visa 4111 1111 1111 1111.", "credit_card"),
    ("Visa 4111-1111-1111-1111.", "credit_card"),
    ("Mastercard 5500000000000004.", "credit_card"),
    ("Amex 3782 822463 10005.", "credit_card"),
    ("Discover 6011111111111117.", "credit_card"),
    ("Visa-13 4222222222222.", "credit_card"),
    ("SSN 123-45-6789.", "ssn"),
    ("SSN 078-05-1121.", "ssn"),
]

NEGATIVES = [
    "Dates 2023-10-12, 12/10/2023, 12.10.2023 and 2023-10-12T12:30:45Z.",
    "Python version 3.10.12 and version 1.2.3.4; v1.2.3.4; see section 2.5.7.1.",
    "Private 10.0.0.1, 192.168.1.1, 172.16.0.9, 127.0.0.1, 169.254.1.1, 100.64.0.1.",
    "Multicast 224.0.0.1, documentation 192.0.2.5 203.0.113.9 198.51.100.7, broadcast 255.255.255.255.",
    "IPv6 ::1, fe80::1, ff02::1, 2001:db8::1, fc00::5, a::b, dead::beef, std::vector, 1.2.3.4.5.",
    "ISBN 978-3-16-148410-0 and ISBN 9783161484100.",
    "Order #123456789012, order 4111111111111112 (fails Luhn), id 1234567812345678.",
    "Timestamps 1697040000 and 1697040000123; time 12:30:45; ratio 16:9.",
    "Prices $1,234.56, EUR 4,111.11, 1,234,567.89.",
    "Math 3 + 4 = 7, 5 +100 200 300, x = 2 +12345 6789.",
    "Not SSNs 000-12-3456 666-12-3456 900-12-3456 123-00-4567 123-45-0000 078-05-1120.",
    "Not phones 123-456-7890 555-123-4567; sizes 250 300 1000; zip 94105-1234.",
    "Retina images logo@2x.png and icon@3x.jpg; MAC 00:1a:2b:3c:4d:5e.",
    "Years 1896 1897 1898 1899 1900 1901 1902 1903.",  # a real Dolma date picker
]


@pytest.mark.parametrize("text,kind", POSITIVES)
def test_pii_positives(text, kind):
  out, found = pii.redact(text)
  assert found == {kind: 1}, (out, found)
  assert pii.PLACEHOLDERS[kind] in out


@pytest.mark.parametrize("text", NEGATIVES)
def test_pii_negatives_untouched(text):
  assert pii.redact(text) == (text, {})


def test_luhn_and_iin():
  assert pii.luhn_ok("4111111111111111") and pii.luhn_ok("79927398713")  # the standard examples
  assert not pii.luhn_ok("4111111111111112") and not pii.luhn_ok("79927398710")
  assert pii.iin_ok("378282246310005") and not pii.iin_ok("3782822463100050")  # Amex is 15 digits
  assert not pii.iin_ok("9783161484100")  # ISBN-13 passes Luhn-like checks but no card starts 9
  assert not pii.is_public_ip("224.0.0.1") and pii.is_public_ip("8.8.8.8")


def test_pii_stage_counts_options_and_never_drops():
  stage = STAGES["pii"]()
  text = "a@b.org, 8.8.8.8, 10.0.0.1, (212) 555-0147, 4111 1111 1111 1111, 123-45-6789, c@d.net"
  out = stage.process(_doc(text))
  assert out.text == ("<EMAIL>, <IP_ADDRESS>, 10.0.0.1, <PHONE>, <CREDIT_CARD>, <SSN>, <EMAIL>")
  assert out.meta["pii"] == {"email": 2, "credit_card": 1, "ssn": 1, "phone": 1, "ip": 1}
  assert stage.process(_doc("nothing here")).text == "nothing here"
  assert stage.counts == {"email": 2, "credit_card": 1, "ssn": 1, "phone": 1, "ip": 1, "docs_redacted": 1}
  only = STAGES["pii"](types=("email",), email_placeholder="[email]")
  assert only.process(_doc(text)).text.startswith("[email], 8.8.8.8, 10.0.0.1, (212) 555-0147")
  with pytest.raises(DataError, match="unknown PII type"):
    STAGES["pii"](types=("email", "passport"))
  with pytest.raises(DataError, match="must not contain digits"):
    STAGES["pii"](phone_placeholder="<PHONE1>")


def test_pii_linear_time_on_adversarial_input():
  # Catastrophic backtracking would take minutes here; linear scans take well under a second each.
  for text in ("1" * 200_000, "1 " * 100_000, "+1 " * 70_000, "a@" * 100_000, "x@" + "a." * 100_000,
               "1234 " * 40_000, "+44 (0)" * 30_000, "255.255.255." * 20_000, ":" * 200_000):
    t0 = time.perf_counter()
    pii.redact(text)
    assert time.perf_counter() - t0 < 5.0, text[:20]


# Hand-checked: every PII string in the 67 real documents (and each is a real contact address,
# phone number or crawler IP; no false positives among the date lists, versions and "::" lines there).
REAL_PII = {
    "email": ["ask@bufvc.ac.uk", "info@claihr.ca", "info@eun.org", "mhoye@mastodon.social",
              "Xanatos@social.dev-wiki.de", "b2c@wien.rocks", "shrinkthinks@spore.social",
              "maa343@cornell.edu", "anaik@cs.cmu.edu", "axz@cs.uw.edu", "info@creativecommons.org"],
    "phone": ["+32 (0)2 790 75 75", "+32 (0)2 790 75 85", "206-543-9196"],
    "ip": ["38.107.191.66", "38.107.191.119"],
}


def test_pii_on_real_web_docs(web_texts):
  found = {k: [] for k in pii.TYPES}
  for text in web_texts.values():
    for kind in pii.TYPES:
      for regex, valid, _ in pii._RULES[kind]:
        found[kind] += [m.group(0) for m in regex.finditer(text) if valid(m)]
  assert {k: sorted(v) for k, v in found.items() if v} == {k: sorted(v) for k, v in REAL_PII.items()}
  stage = STAGES["pii"]()
  for i, text in enumerate(web_texts.values()):
    out = stage.process(_doc(text, i))
    assert not any(s in out.text for v in REAL_PII.values() for s in v)
  assert stage.counts == {"email": 11, "phone": 3, "ip": 2, "docs_redacted": 10}


def test_pii_matches_datatrove_on_emails_and_ipv4(web_texts):
  try:
    from datatrove.pipeline.formatters.pii import PIIFormatter, public_ip_validator
  except ImportError:
    require(False, "datatrove not installed (pip install -e .[test])")
  ref = PIIFormatter()

  def theirs(text):
    return ([m.group(0) for m in ref.emails_replacer.regex.finditer(text)],
            [m.group(0) for m in ref.ip_replacer.regex.finditer(text) if public_ip_validator(m.group(0))])

  def ours(text):
    return ([m.group(0) for m in pii._EMAIL_RE.finditer(text) if pii._email(m)],
            [m.group(0) for m in pii._IPV4_RE.finditer(text) if pii._ip(m)])

  for text in list(web_texts.values()) + [t for t, _ in POSITIVES]:
    assert ours(text) == theirs(text), text
  # The documented differences: datatrove also takes image names, versions, multicast, 5-part numbers.
  diff = "logo@2x.png, version 1.2.3.4, v1.2.3.4, 224.0.0.1, 1.1.1.1.1"
  assert theirs(diff) == (["logo@2x.png"], ["1.2.3.4", "1.2.3.4", "224.0.0.1", "1.1.1.1"])
  assert ours(diff) == ([], [])


# --- toxic ------------------------------------------------------------------------------------------

def test_wordlist_provenance_and_exclusions():
  words = toxic.load_wordlist(toxic.DEFAULT_WORDLIST)
  assert len(words) == 103
  lines = [ln.split() for ln in toxic.DEFAULT_WORDLIST.read_text().splitlines()
           if ln.strip() and not ln.startswith("#")]
  selected = {ln[0] for ln in lines if len(ln) == 1}  # not marked "+" (hand-added inflection)
  try:
    import datatrove
  except ImportError:
    require(False, "datatrove not installed (pip install -e .[test])")
  from pathlib import Path
  assets = Path(datatrove.__file__).parent / "assets"
  source = {w.strip() for f in ("banned_words.txt", "soft_banned_words.txt")
            for w in (assets / f).read_text().splitlines() if not w.startswith("#")}
  assert selected <= source, sorted(selected - source)
  medical = {"anus", "penis", "vagina", "vulva", "clitoris", "genitals", "semen", "sex", "sexual",
             "intercourse", "nipple", "rape", "pedophile", "lesbian", "gay", "negro", "ass", "cock"}
  assert not words & medical


def test_toxic_score_formula_and_modes():
  words = frozenset({"fuck", "shit"})
  text = "fuck this " + "word " * 96 + "shit ok"  # 100 words, 2 hits
  assert toxic.word_score(text, words) == (0.02, 2)
  assert toxic.word_score("fuck " + "word " * 9, words) == (0.0, 1)       # below min_hits
  assert toxic.word_score("fuck " + "word " * 9, words, min_hits=1) == (0.1, 1)
  assert toxic.word_score("FUCK, 2x word", words, mode="any") == (1.0, 1)
  assert toxic.word_score("fucking shitty", words) == (0.0, 0)  # whole tokens only
  stage = STAGES["toxic"]()
  assert stage.process(_doc(text)) == "toxic"
  kept = stage.process(_doc(text + " more"))  # 2/101 < 0.02
  assert kept.meta["toxicity"] == round(2 / 101, 6)


def test_toxic_on_real_docs(web_texts):
  stage = STAGES["toxic"]()
  kept = [stage.process(_doc(t, i)) for i, t in enumerate(web_texts.values())]
  assert all(isinstance(d, Doc) for d in kept)  # no real web sample is toxic
  assert stage.counts == {"docs_with_listed_words": 2, "listed_words": 2}
  # Hand-checked: a Planned Parenthood sexual-health post (tag list with "dildo") and a paper on online
  # harassment ("revenge porn"): kept by default, dropped by C4's any-word rule.
  health = web_texts["dolma:0"]
  assert "Sexual Health" in health and "genitals" in health and "vagina" in health
  paper = next(t for t in web_texts.values() if "revenge porn" in t)
  c4 = STAGES["toxic"](mode="any")
  for text in (health, paper):
    assert isinstance(stage.process(_doc(text)), Doc)
    assert c4.process(_doc(text)) == "toxic"


def test_toxic_on_hh_rlhf():
  path = shared_data() / "preference" / "hh_rlhf_harmless_test.jsonl.gz"
  require(path.exists(), f"HH-RLHF test missing at {path}")
  rows = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
  stage = STAGES["toxic"]()
  # Hand-checked: a list of swear words as the answer; a rant with two expletives in ~100 words.
  assert rows[1629]["rejected"].endswith("Shit.  Fuck.  Cunt.  Asshole.  Bitch.")
  assert stage.process(_doc(rows[1629]["rejected"])) == "toxic"
  assert "fucking crooks" in rows[729]["rejected"]
  assert stage.process(_doc(rows[729]["rejected"])) == "toxic"
  dropped = [sum(stage.process(_doc(r[k])) == "toxic" for r in rows) for k in ("chosen", "rejected")]
  assert dropped == [37, 49]  # of 2,312 red-team dialogues; most have no listed word


def test_toxic_classifier_hook(tmp_path, monkeypatch):
  (tmp_path / "my_tox.py").write_text(
      "def score(text):\n  return 0.9 if 'idiot' in text else 0.1\n"
      "def bad(text):\n  return 2.0\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  sys.modules.pop("my_tox", None)
  stage = STAGES["toxic"](classifier="my_tox:score")
  assert stage.process(_doc("you idiot")) == "toxic"
  assert stage.counts["dropped_by_classifier"] == 1
  out = stage.process(_doc("hello there"))
  assert out.meta == {"toxicity": 0.0, "toxicity_classifier": 0.1}
  assert stage.process(_doc("fuck shit")) == "toxic"  # words 1.0 >= 0.02 though the model says 0.1
  replace = STAGES["toxic"](classifier="my_tox:score", combine="replace")
  assert replace.process(_doc("fuck shit")).meta == {"toxicity": 0.1}
  lenient = STAGES["toxic"](classifier="my_tox:score", classifier_threshold=0.95)
  assert isinstance(lenient.process(_doc("idiot")), Doc)
  with pytest.raises(DataError, match="not a score"):
    STAGES["toxic"](classifier="my_tox:bad").process(_doc("x"))
  with pytest.raises(DataError, match="cannot load"):
    STAGES["toxic"](classifier="my_tox:missing").setup()
  for bad in ({"threshold": 0}, {"classifier_threshold": 1.5}, {"mode": "all"}, {"min_hits": 0},
              {"combine": "replace"}):
    with pytest.raises(DataError):
      STAGES["toxic"](**bad)


# --- decontam ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evals():
  root = shared_data()
  for rel in ("math/gsm8k_test.jsonl", "code/humaneval.jsonl.gz", "text/wikitext2_test.txt"):
    require((root / rel).exists(), f"{rel} missing under {root}")
  stage = STAGES["decontam"](data_dir=str(root))
  stage.setup()
  gsm = [json.loads(line) for line in open(root / "math/gsm8k_test.jsonl", encoding="utf-8")]
  he = [json.loads(line) for line in gzip.open(root / "code/humaneval.jsonl.gz", "rt", encoding="utf-8")]
  wt = open(root / "text/wikitext2_test.txt", encoding="utf-8").read().split("\n")
  return {"stage": stage, "root": root, "gsm": gsm, "he": he, "wt": wt}


def _plant(host: str, insert: str) -> str:
  lines = host.split("\n")
  mid = max(1, len(lines) // 2)
  return "\n".join(lines[:mid] + [insert] + lines[mid:])


def test_index_sizes(evals):
  sizes = {ix.name: (len(ix.item_ids), ix.uncovered) for ix in evals["stage"].indexes}
  assert sizes == {"gsm8k_test": (1319, 0), "humaneval": (164, 0), "wikitext2_test": (62, 1)}
  assert 200_000 < sum(len(ix.hashes) for ix in evals["stage"].indexes) < 300_000


def test_real_docs_not_flagged(evals, web_texts):
  stage = evals["stage"]
  assert all(stage.matches(t) == {} for t in web_texts.values())


def test_planted_gsm8k_question(evals, web_texts):
  stage = STAGES["decontam"](data_dir=str(evals["root"]))  # setup() reuses the process's index
  host = web_texts["ccnet_en_head_0091.jsonl:3"]
  q = evals["gsm"][0]["question"]
  assert stage.process(_doc(host)).text == host
  assert stage.process(_doc(_plant(host, q))) == "contaminated"
  # Case and punctuation do not matter (lower-cased, punctuation stripped).
  assert stage.process(_doc(_plant(host, q.upper().replace(".", " ;")))) == "contaminated"
  assert stage.counts == {"docs_contaminated": 2, "docs:gsm8k_test": 2,
                          "ngrams:gsm8k_test": 2 * (len(dc.tokenize(q)) - 12), "item:gsm8k_test:0": 2}
  assert dc.contamination_summary(stage.counts) == {
      "docs_contaminated": 2,
      "sets": {"gsm8k_test": {"docs": 2, "ngrams": stage.counts["ngrams:gsm8k_test"], "items": {"0": 2}}}}


def test_planted_humaneval_solution(evals, web_texts):
  stage = evals["stage"]
  host = web_texts["ccnet_en_head_0174.jsonl:2"]
  p = evals["he"][0]
  blog = "Here is my solution:\n" + p["prompt"] + p["canonical_solution"] + "\nHope it helps."
  t = dc.tokenize(p["prompt"] + p["canonical_solution"])
  indexed = len(set(dc.ngram_hashes(t, 13)[dc.worded(t, 13)].tolist()))  # number-run n-grams are not
  assert indexed == 50 < len(t) - 12
  assert stage.matches(_plant(host, blog)) == {"humaneval": (indexed, ["HumanEval/0"])}
  assert stage.matches(_plant(host, p["canonical_solution"]))["humaneval"][1] == ["HumanEval/0"]


def test_planted_wikitext_paragraph(evals, web_texts):
  line = next(ln for ln in evals["wt"] if ln.startswith(" In 2006 , <unk> starred alongside"))
  raw = dc.detokenize_wikitext(line).replace("<unk>", "Boulter")
  assert raw.startswith("In 2006, Boulter starred alongside Boulter in the play Boulter written by Mark")
  assert "two-part episode arc" in raw and " ," not in raw
  host = web_texts["dolma:5"]
  found = evals["stage"].matches(_plant(host, raw))
  assert list(found) == ["wikitext2_test"] and found["wikitext2_test"][1] == ["Robert <unk>"]


def test_detokenize_wikitext():
  assert dc.detokenize_wikitext(" 1 @,@ 000 well @-@ known , 3 @.@ 5 % ( a ) Teddy 's don 't . ") == \
      "1,000 well-known, 3.5% (a) Teddy's don't."


def test_flag_mode_keeps_doc_and_min_hits(evals, web_texts):
  flag = STAGES["decontam"](mode="flag", data_dir=str(evals["root"]))
  host = web_texts["ccnet_en_head_0091.jsonl:3"]
  text = _plant(host, evals["gsm"][5]["question"])
  out = flag.process(_doc(text))
  assert isinstance(out, Doc) and out.text == text and out.meta["contaminated"] == ["gsm8k_test"]
  # One shared 13-gram (13 words of the question) counts with min_hits=1, not with min_hits=2.
  words = evals["gsm"][5]["question"].split()[:13]
  one = _plant(host, " ".join(words))
  assert flag.matches(one)["gsm8k_test"][0] == 1
  strict = STAGES["decontam"](min_hits=2, data_dir=str(evals["root"]))
  assert strict.matches(one) == {}


def test_gsm8k_train_overlap_is_template_reuse(evals):
  train = [json.loads(line) for line in open(evals["root"] / "math/gsm8k_train.jsonl", encoding="utf-8")]
  hit = {i: evals["stage"].matches(r["question"] + "\n" + r["answer"]) for i, r in enumerate(train[:2000])}
  hit = {i: m["gsm8k_test"] for i, m in hit.items() if m}
  # Hand-checked: train 20 and test 632 are one template ("... bought stamps at the post office. Some
  # of the stamps had a snowflake design ..."), as are train 1314 / test 602 ("A train/plane travels
  # ... miles in 3 hours. At the same rate, how many additional hours ..."); train 406 / test 581 share
  # "The first movie is 1 hour and 30 minutes long while the second movie is"; train 699 / test 806
  # share a formulaic answer phrase ("... number of students in each grade to find the total ...").
  assert hit == {20: (13, ["632"]), 406: (3, ["581"]), 699: (1, ["806"]), 1314: (7, ["602"])}


def test_hash_is_stable_and_config_errors(tmp_path):
  # BLAKE2b token hashes: the same on every machine and process (no PYTHONHASHSEED dependence).
  assert int(dc.ngram_hashes(["a"] * 13, 13)[0]) == GOLDEN_A13
  assert len(dc.ngram_hashes(["a"] * 12, 13)) == 0
  with pytest.raises(DataError, match="unknown eval set"):
    STAGES["decontam"](eval_sets=("mmlu",))
  with pytest.raises(DataError, match="not found"):
    STAGES["decontam"](data_dir=str(tmp_path)).setup()
  with pytest.raises(DataError):
    STAGES["decontam"](mode="drop")
  with pytest.raises(DataError):
    STAGES["decontam"](n=2)


GOLDEN_A13 = 4352937374354052713
