"""Curation langid stage: real CCNet/Dolma English is kept; other languages and code are dropped.

Run: python -m pytest -q -p no:xdist tests/test_curate_langid.py   (-k speed -s prints docs/s)
"""
import gzip
import json
import time

import pytest

from conftest import require, shared_data
from data.curate.base import Doc
from data.curate.langid import LangId, identify
from data.errors import DataError

# Written for this test (not machine-translated web text), ~2-3 sentences each.
OTHER = {
    "fr": "Le petit village se trouve au bord de la rivière. Chaque matin, les habitants vont au "
          "marché pour acheter du pain frais, des légumes et du fromage. Les enfants jouent dans "
          "la cour de l'école pendant que leurs parents travaillent.",
    "de": "Das kleine Dorf liegt am Ufer des Flusses. Jeden Morgen gehen die Bewohner auf den "
          "Markt, um frisches Brot, Gemüse und Käse zu kaufen. Die Kinder spielen auf dem "
          "Schulhof, während ihre Eltern arbeiten.",
    "es": "El pequeño pueblo está a orillas del río. Cada mañana, los vecinos van al mercado para "
          "comprar pan fresco, verduras y queso. Los niños juegan en el patio de la escuela "
          "mientras sus padres trabajan.",
    "zh": "这个小村庄位于河边。每天早上，村民们都会去市场买新鲜的面包、蔬菜和奶酪。孩子们在学校的"
          "操场上玩耍，而他们的父母在工作。",
    "ru": "Маленькая деревня находится на берегу реки. Каждое утро жители ходят на рынок, чтобы "
          "купить свежий хлеб, овощи и сыр. Дети играют во дворе школы, пока их родители работают.",
}
CODE = ("def merge(a, b):\n    i = j = 0\n    out = []\n    while i < len(a) and j < len(b):\n"
        "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
        "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n")


def web_records():
  recs = []
  for name in ("ccnet_en_head_0091.jsonl", "ccnet_en_head_0174.jsonl", "dolma_documents_000.json.gz"):
    path = shared_data() / "web" / name
    require(path.is_file(), f"{path} missing")
    with (gzip.open if name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
      recs.extend((name, json.loads(line)) for line in f)
  return recs


def doc(text: str, i: int = 0) -> Doc:
  return Doc(id=f"t{i}", text=text, domain="web")


def test_ccnet_and_dolma_english_is_kept():
  stage = LangId()
  stage.setup()
  recs = web_records()
  assert len(recs) == 30
  for name, r in recs:
    # CCNet's own fastText label, the reference: every sample is English.
    assert r["metadata"]["language"] == "en"
    out = stage.process(doc(r["text"]))
    assert isinstance(out, Doc), f"{name} {r['id']}: dropped as {out}"
    assert out.meta["lang"] == "en" and out.meta["lang_score"] >= 0.65
  assert stage.counts == {"lang_en": 30}


@pytest.mark.parametrize("lang", sorted(OTHER))
def test_other_languages_are_dropped_and_named(lang):
  stage = LangId()
  d = doc(OTHER[lang])
  assert stage.process(d) == "other_language"
  assert d.meta["lang"] == lang and d.meta["lang_score"] >= 0.65
  assert stage.counts == {f"lang_{lang}": 1}


def test_code_and_noise_are_dropped():
  stage = LangId()
  for text in (CODE, "ok"):
    assert stage.process(doc(text)) in ("low_score", "other_language")
  for text in ("", "12345 67890 ... ###"):
    d = doc(text)
    assert stage.process(d) == "low_score" and d.meta["lang"] == "und"


def test_languages_option():
  fr = LangId(languages=("fr", "de"))
  assert isinstance(fr.process(doc(OTHER["fr"])), Doc)
  assert isinstance(fr.process(doc(OTHER["de"])), Doc)
  assert fr.process(doc("The cat sat on the mat while the dog slept by the fire.")) == \
      "other_language"
  tag_only = LangId(languages=(), min_score=0.0)
  for lang, text in OTHER.items():
    out = tag_only.process(doc(text))
    assert isinstance(out, Doc) and out.meta["lang"] == lang


def test_only_the_first_max_chars_are_read():
  english = "The committee met on Tuesday to discuss the budget for next year. " * 40  # ~2,700 chars
  mixed = english + OTHER["de"] * 40
  head_only, whole = doc(mixed), doc(mixed)
  assert isinstance(LangId().process(head_only), Doc) and head_only.meta["lang"] == "en"
  assert LangId(max_chars=100_000).process(whole) == "other_language"
  assert whole.meta["lang"] == "de"


def test_resiliparse_backend():
  stage = LangId(backend="resiliparse", min_score=0.5)
  ccnet = [r for name, r in web_records() if name.startswith("ccnet")]
  for r in ccnet:
    out = stage.process(doc(r["text"]))
    assert isinstance(out, Doc) and out.meta["lang"] == "en", r["id"]
  for lang in ("fr", "de", "es", "ru"):
    d = doc(OTHER[lang])
    assert stage.process(d) == "other_language" and d.meta["lang"] == lang
  assert identify("", "resiliparse") == ("und", 0.0)


def test_bad_options():
  with pytest.raises(DataError, match="backend"):
    LangId(backend="fasttext")
  with pytest.raises(DataError, match="tuple"):
    LangId(languages="en")
  with pytest.raises(DataError, match="does not know"):
    LangId(languages=("english",))
  with pytest.raises(DataError, match="min_score"):
    LangId(min_score=1.5)
  with pytest.raises(DataError, match="max_chars"):
    LangId(max_chars=0)


def test_speed_on_real_samples():
  """docs/s of each backend on the 30 CCNet/Dolma documents (avg ~7,100 chars); -s prints them."""
  texts = [r["text"] for _, r in web_records()]
  for backend in ("py3langid", "resiliparse"):
    stage = LangId(backend=backend, min_score=0.0)
    stage.setup()
    rounds = 5
    t0 = time.perf_counter()
    for _ in range(rounds):
      for t in texts:
        stage.process(doc(t))
    dt = time.perf_counter() - t0
    print(f"\nlangid[{backend}, max_chars={stage.config['max_chars']}]: "
          f"{rounds * len(texts) / dt:.0f} docs/s")
    assert stage.counts["lang_en"] >= rounds * (len(texts) - 1)
