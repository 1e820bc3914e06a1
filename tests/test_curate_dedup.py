"""Dedup stages (exact_dedup, url_dedup, minhash, line_dedup) and the planted-duplicate bench corpus.

Global stages are driven as the runner does, without it: `summarize` per shard (saved and reloaded as
.npz), `decide` over all shards with `alive` masks and a spill directory, `apply` per document.
References: datasketch (MinHash + MinHashLSH, bit-identical signatures when fed our shingle hashes),
datatrove's `simplify_text` (FineWeb's normalization), exact shingle-set Jaccard on real web text.
"""
import gzip
import itertools
import json
import pathlib
import re
import tracemalloc
import unicodedata

import numpy as np
import pytest
from conftest import require, shared_data

from data.curate import benchcorpus, dedup_exact, minhash
from data.curate.base import STAGES, Doc
from data.curate.dedup_exact import (
  ExactDedup,
  UrlDedup,
  canonical_url,
  normalize,
  simplify,
)
from data.curate.line_dedup import LineDedup
from data.curate.minhash import MinHashDedup
from data.errors import DataError

# ------------------------------------------------------------------------------------------ helpers


def run_global(stage, shards, work_dir, alive=None):
  """summarize -> .npz round trip -> decide -> apply; returns (decisions, outputs) per shard."""
  work_dir = pathlib.Path(work_dir)
  work_dir.mkdir(parents=True, exist_ok=True)
  summaries = []
  for i, docs in enumerate(shards):
    path = work_dir / f"shard{i}.npz"
    np.savez(path, **stage.summarize(docs))
    summaries.append(np.load(path))
  alive = alive or [np.ones(len(s), bool) for s in shards]
  spill = work_dir / "spill"
  spill.mkdir(exist_ok=True)
  decisions = stage.decide(summaries, alive, spill)
  assert [len(d) for d in decisions] == [len(s) for s in shards]
  outputs = [[stage.apply(doc, d) for doc, d in zip(docs, dec)] for docs, dec in zip(shards, decisions)]
  return decisions, outputs


def dropped_mask(decisions):
  return np.array([isinstance(d, str) for dec in decisions for d in dec])


def docs_of(texts, domain="web", urls=None):
  urls = urls or [""] * len(texts)
  return [Doc(id=str(i), text=t, domain=domain, url=u) for i, (t, u) in enumerate(zip(texts, urls))]


def split(docs, n):
  bounds = np.linspace(0, len(docs), n + 1).astype(int)
  return [docs[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.fixture(scope="module")
def web_texts():
  root = shared_data() / "web"
  require(root.is_dir(), f"shared data not found at {root}")
  texts = []
  for path in sorted(root.glob("ccnet_en_head_*.jsonl")):
    texts += [json.loads(line)["text"] for line in path.read_text().splitlines()]
  with gzip.open(root / "dolma_documents_000.json.gz", "rt") as f:
    texts += [json.loads(line)["text"] for line in f]
  return texts


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  require(shared_data().is_dir(), "shared data not found (set SHARED_DATA)")
  cache = tmp_path_factory.mktemp("cache")
  return lambda n, **kw: benchcorpus.build_bench_corpus(
      n, data_dir=str(shared_data()), cache_dir=str(cache), **kw)


# ------------------------------------------------------------------------------------ normalization


def test_simplify_follows_ccnet_rules():
  text = "Héllo, WÖRLD! 1999 — ﬁne “quotes”\tTab\r\nnext_line 3.14 Ａ"
  assert normalize(text) == b"hello world 0000 fine quotes tab next line 0 00 a"
  assert simplify(text).count(b"\n") == 1  # newlines survive for line dedup
  assert normalize("e\u0301") == normalize("\u00e9") == b"e"  # decomposed == precomposed accent
  assert normalize("x\u00a0y\u2003z") == b"x y z"  # non-ASCII spaces split words


def test_normalize_agrees_with_datatrove_on_real_web_text(web_texts):
  require(_has("datatrove"), "datatrove not installed")
  from datatrove.utils import text as text_utils
  cfg = text_utils.TextNormConfig(norm_numbers=False)  # datatrove folds numbers; we map digits
  ours_words = theirs_words = same = 0
  for t in web_texts:
    theirs = re.sub(r"\d", "0", text_utils.simplify_text(t, cfg)).split()
    ours = normalize(t).decode().split()
    ours_words += len(ours)
    theirs_words += len(theirs)
    same += len(set(ours) & set(theirs))
    # Every difference is a Unicode punctuation/symbol datatrove's fixed list lacks ("©", "→", "·").
    for w in set(theirs) - set(ours):
      assert any(unicodedata.category(c)[0] in "PS" for c in w), w
  assert abs(ours_words - theirs_words) < 0.01 * theirs_words


# ------------------------------------------------------------------------------- exact and url dedup


def test_exact_dedup_keeps_first_occurrence_across_shards(tmp_path):
  texts = ["The cat sat on the mat.", "Another document entirely.", "the  CAT sat on the mat!",
           "Another document entirely.", "!!! ...", "???", "The cat sat on the mat"]
  shards = split(docs_of(texts), 3)
  decisions, outputs = run_global(ExactDedup(), shards, tmp_path)
  assert dropped_mask(decisions).tolist() == [False, False, True, True, False, False, True]
  assert [o for s in outputs for o in s if isinstance(o, str)] == ["duplicate"] * 3
  # "space": only whitespace runs are ignored, so case and punctuation variants survive.
  decisions, _ = run_global(ExactDedup(normalize="space"), shards, tmp_path / "s")
  assert dropped_mask(decisions).tolist() == [False, False, False, True, False, False, False]
  raw = [docs_of(["a b", "a  b", "a b"])]
  decisions, _ = run_global(ExactDedup(normalize="none"), raw, tmp_path / "n")
  assert dropped_mask(decisions).tolist() == [False, False, True]


def test_exact_dedup_respects_alive(tmp_path):
  shards = [docs_of(["same text", "other"]), docs_of(["same text", "same text"])]
  alive = [np.array([False, True]), np.array([True, True])]  # the first copy was dropped earlier
  decisions, _ = run_global(ExactDedup(), shards, tmp_path, alive)
  assert decisions == [[None, None], [None, "duplicate"]]


@pytest.mark.parametrize("a,b", [
    ("HTTP://Example.COM:80/path/#frag", "http://example.com/path"),
    ("https://example.com:443", "https://example.com/"),
    ("https://Example.com/a/b/", "https://example.com/a/b"),
])
def test_canonical_url_equal(a, b):
  assert canonical_url(a) == canonical_url(b)


@pytest.mark.parametrize("a,b", [
    ("http://example.com:8080/p", "http://example.com/p"),
    ("https://example.com/p?a=1&b=2", "https://example.com/p?b=2&a=1"),
    ("https://www.example.com/", "https://example.com/"),
    ("http://example.com/p", "https://example.com/p"),
    ("https://example.com/Path", "https://example.com/path"),
])
def test_canonical_url_different(a, b):
  assert canonical_url(a) != canonical_url(b)


def test_url_dedup(tmp_path):
  urls = ["https://a.com/x", "", "HTTPS://A.com:443/x/#top", "", "https://a.com/y", "http://[bad"]
  shards = split(docs_of([f"doc {i}" for i in range(6)], urls=urls), 2)
  decisions, _ = run_global(UrlDedup(), shards, tmp_path)
  assert dropped_mask(decisions).tolist() == [False, False, True, False, False, False]


# -------------------------------------------------------------------------------------------- minhash


def _edit(words, rng, frac, op):
  n = max(1, int(frac * len(words)))
  at = int(rng.integers(0, len(words) - n))
  filler = [f"filler{int(i)}" for i in rng.integers(0, 10_000, n)]
  if op == "delete":
    return words[:at] + words[at + n:]
  if op == "insert":
    return words[:at] + filler + words[at:]
  return words[:at] + filler + words[at + n:]


def _shingles(text, n=5):
  w = normalize(text).split()
  return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def test_minhash_estimates_jaccard_of_real_text(web_texts):
  """Signature agreement estimates the exact 5-gram Jaccard (112 hashes: sd ~0.045 per pair)."""
  rng = np.random.default_rng(0)
  stage = MinHashDedup()
  errors = []
  for t in web_texts:
    words = t.split(" ")
    if len(words) < 100:
      continue
    for frac in (0.05, 0.2, 0.4):
      copy = " ".join(_edit(words, rng, frac, "replace"))
      sig = stage.summarize(docs_of([t, copy]))["sig"]
      a, b = _shingles(t), _shingles(copy)
      errors.append((sig[0] == sig[1]).mean() - len(a & b) / len(a | b))
  assert len(errors) >= 45
  assert abs(np.mean(errors)) < 0.02 and np.mean(np.abs(errors)) < 0.05


def test_minhash_finds_planted_near_duplicates_in_real_text(web_texts, tmp_path):
  rng = np.random.default_rng(1)
  originals = [t for t in web_texts if len(t.split()) >= 100]
  assert len(originals) >= 15
  copies = [" ".join(_edit(t.split(" "), rng, 0.1, ("delete", "insert")[i % 2]))
            for i, t in enumerate(originals)]
  docs = docs_of(originals + copies)
  decisions, outputs = run_global(MinHashDedup(), split(docs, 4), tmp_path)
  dropped = dropped_mask(decisions)
  assert not dropped[:len(originals)].any()  # distinct real documents are left alone
  assert dropped[len(originals):].all()      # every 90%-overlap copy is found
  assert {o for s in outputs for o in s if isinstance(o, str)} == {"near_duplicate"}


def test_minhash_precision_recall_on_bench_corpus(bench, tmp_path):
  docs, dup_of = bench(2000, seed=3)
  stage = MinHashDedup()
  decisions, _ = run_global(stage, split(docs, 4), tmp_path)
  pr = benchcorpus.precision_recall(dropped_mask(decisions), dup_of)
  assert pr["planted"] == 200
  assert pr["fp"] == 0 and pr["recall"] >= 0.95, pr
  assert stage.counts["clusters"] > 150 and stage.counts["spill_bytes"] > 0


def test_signatures_identical_to_datasketch_given_our_shingle_hashes(web_texts):
  require(_has("datasketch"), "datasketch not installed")
  r = minhash.compare_with_datasketch(web_texts * 2, bands=14, rows=8, shared_hashes=True)
  assert r["signatures_identical"] is True
  assert r["agreement"] == 1.0 and r["pairs_ours"] >= 30  # each text and its repeat at least


def test_pairs_agree_with_datasketch_independent_hashing(bench):
  require(_has("datasketch"), "datasketch not installed")
  docs, _ = bench(1000, seed=5)
  r = minhash.compare_with_datasketch([d.text for d in docs], bands=14, rows=8, ngram=5, seed=1)
  assert r["pairs_datasketch"] >= 80
  assert r["agreement"] >= 0.95 and r["recall_of_datasketch"] >= 0.95, r


def _has(module):
  try:
    __import__(module)
    return True
  except ImportError:
    return False


def test_minhash_decide_respects_alive(tmp_path):
  base = " ".join(f"word{i}" for i in range(200))
  docs = docs_of([base, base + " extra words here", "unrelated " * 50, base])
  alive = [np.array([False, True, True, True])]  # the original was dropped by an earlier stage
  decisions, _ = run_global(MinHashDedup(), [docs], tmp_path, alive)
  assert decisions == [[None, None, None, "near_duplicate"]]


def test_minhash_short_documents_are_left_alone(tmp_path):
  docs = docs_of(["one two three four", "one two three four", "", "five words are just enough",
                  "five words are just enough"])
  decisions, _ = run_global(MinHashDedup(), [docs], tmp_path)
  assert decisions == [[None, None, None, None, "near_duplicate"]]


def test_minhash_threshold_verification(bench, tmp_path):
  docs, dup_of = bench(600, seed=7)
  decisions, _ = run_global(MinHashDedup(threshold=1.0), split(docs, 2), tmp_path)
  dropped = dropped_mask(decisions)
  exact = np.array([d >= 0 and docs[i].text == docs[d].text for i, d in enumerate(dup_of)])
  # Only identical signatures pass a threshold of 1: exact copies (and no near copy).
  keep_one = benchcorpus.precision_recall(dropped, np.where(exact, dup_of, -1))
  assert keep_one["fp"] == 0 and keep_one["recall"] == 1.0
  assert dropped.sum() == exact.sum() > 0
  assert not list(tmp_path.joinpath("spill").iterdir())  # spill and signature files are removed


def test_minhash_spills_to_work_dir(bench, tmp_path, monkeypatch):
  docs, _ = bench(400, seed=9)
  written = []
  real_unlink = pathlib.Path.unlink

  def unlink(self, *a, **kw):
    written.append((self, self.stat().st_size))
    real_unlink(self, *a, **kw)

  monkeypatch.setattr(pathlib.Path, "unlink", unlink)
  monkeypatch.setattr(dedup_exact, "ROWS_PER_PART", 150)  # several partitions per band
  ref, _ = run_global(MinHashDedup(), split(docs, 3), tmp_path / "a")
  spill_dir = tmp_path / "a" / "spill"
  files = [(p, s) for p, s in written if p.parent == spill_dir]
  assert len(files) >= 14 * 2  # every band wrote to work_dir, in more than one partition
  assert sum(s for _, s in files) == 14 * 400 * 20  # 20-byte rows: (hash, doc, payload)
  assert not list(spill_dir.iterdir())
  monkeypatch.setattr(dedup_exact, "ROWS_PER_PART", 4_000_000)
  one_part, _ = run_global(MinHashDedup(), split(docs, 3), tmp_path / "b")
  assert ref == one_part


def test_minhash_decide_memory_is_about_one_band():
  """Peak traced memory of decide stays far below all band tables at once (14 x 20 B x n)."""
  n, bands, rows = 40_000, 14, 8
  rng = np.random.default_rng(0)
  sig = rng.integers(0, 2**32, (n, bands * rows), dtype=np.uint32)
  sig[1::10] = sig[0::10]  # 10% duplicates
  shards = np.array_split(sig, 16)
  summaries = [{"sig": s, "shingles": np.full(len(s), 100, np.int32)} for s in shards]
  alive = [np.ones(len(s), bool) for s in shards]
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    old = dedup_exact.ROWS_PER_PART, dedup_exact.FLUSH_BYTES
    dedup_exact.ROWS_PER_PART, dedup_exact.FLUSH_BYTES = 10_000, 1 << 20
    try:
      tracemalloc.start()
      decisions = MinHashDedup().decide(summaries, alive, tmp)
      _, peak = tracemalloc.get_traced_memory()
    finally:
      tracemalloc.stop()
      dedup_exact.ROWS_PER_PART, dedup_exact.FLUSH_BYTES = old
  all_bands = bands * n * 20
  assert sum(d == "near_duplicate" for s in decisions for d in s) == n // 10
  assert peak < 0.25 * all_bands, (peak, all_bands)


def test_minhash_deterministic_whatever_the_sharding(bench, tmp_path, monkeypatch):
  docs, _ = bench(500, seed=11)
  stage = MinHashDedup()
  whole = stage.summarize(docs)
  monkeypatch.setattr(minhash, "_BATCH_CHARS", 10_000)  # many batches inside summarize
  monkeypatch.setattr(minhash, "_CHUNK", 333)           # documents straddling chunk boundaries
  pieces = [stage.summarize(s) for s in split(docs, 7)]
  assert np.array_equal(whole["sig"], np.concatenate([p["sig"] for p in pieces]))
  a, _ = run_global(MinHashDedup(), split(docs, 1), tmp_path / "a")
  b, _ = run_global(MinHashDedup(), split(docs, 5), tmp_path / "b")
  assert dropped_mask(a).tolist() == dropped_mask(b).tolist()
  assert np.array_equal(MinHashDedup(seed=1).summarize(docs[:5])["sig"], whole["sig"][:5])
  assert not np.array_equal(MinHashDedup(seed=2).summarize(docs[:5])["sig"], whole["sig"][:5])


def test_union_find_roots_are_smallest_index():
  parent = np.arange(10, dtype=np.int32)
  minhash.union(parent, np.array([8, 5, 3]), np.array([9, 9, 8]))
  minhash.union(parent, np.array([1]), np.array([5]))
  assert parent.tolist() == [0, 1, 2, 1, 4, 1, 6, 7, 1, 1]


# ----------------------------------------------------------------------------------------- line dedup

BOILER = ["Home | About us | Contact | Privacy policy",
          "Copyright 2021 Example Media. All rights reserved."]


def _page(body_words, seed):
  """Header, body lines of 12 random letter-words, footer (its year varies), and a short "Share"."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  body = [" ".join("".join(rng.choice(letters, 6)) for _ in range(12)) for _ in range(body_words // 12)]
  footer = BOILER[1].replace("2021", str(2000 + seed))
  return "\n".join([BOILER[0], *body, footer, "Share"])


def test_line_dedup_removes_boilerplate_after_first_occurrence(tmp_path):
  pages = [_page(120, s) for s in range(6)]
  shards = split(docs_of(pages), 3)
  stage = LineDedup()
  decisions, outputs = run_global(stage, shards, tmp_path)
  flat = [d for s in decisions for d in s]
  assert flat[0] is None  # the first page keeps its boilerplate
  n_lines = len(pages[1].split("\n"))
  # The header and the footer (years differ: digits are normalized) go; "Share" is too short to.
  assert all(d == (0, n_lines - 2) for d in flat[1:])
  out = [o for s in outputs for o in s]
  assert out[0].text == pages[0]
  assert all(BOILER[0] not in o.text and "All rights reserved" not in o.text for o in out[1:])
  assert all(o.text.endswith("\nShare") for o in out)
  assert stage.counts["lines_removed"] == 10 and stage.counts["docs_edited"] == 5


def test_line_dedup_drops_documents_left_too_short(tmp_path):
  first = _page(120, 0)
  lines = first.split("\n")
  # Copies the first page's body lines plus a 30-word remainder: below min_doc_words after removal.
  mostly_copied = "\n".join(lines[1:5] + [" ".join(f"new{i}" for i in range(30))])
  short_original = "Just a short note with repeated content?\n" + BOILER[0]
  docs = docs_of([first, mostly_copied, short_original])
  decisions, outputs = run_global(LineDedup(), [docs], tmp_path)
  assert decisions[0][1] == "empty_after_line_dedup" and outputs[0][1] == "empty_after_line_dedup"
  assert decisions[0][2] == "empty_after_line_dedup"  # 7 words left once the header goes
  decisions, _ = run_global(LineDedup(min_doc_words=0), [docs], tmp_path / "z")
  assert decisions[0][1] == (0, 1, 2, 3) and decisions[0][2] == (1,)


def test_line_dedup_alive_and_skip_domains(tmp_path):
  pages = [_page(120, s) for s in range(3)]
  docs = docs_of(pages)
  decisions, _ = run_global(LineDedup(), [docs], tmp_path, [np.array([False, True, True])])
  assert decisions[0][:2] == [None, None]  # dead first page: the second is now the first occurrence
  code = [Doc(id=str(i), text=t, domain="code") for i, t in enumerate(pages)]
  decisions, _ = run_global(LineDedup(), [code], tmp_path / "c")
  assert decisions == [[None, None, None]]
  decisions, _ = run_global(LineDedup(skip_domains=()), [code], tmp_path / "d")
  assert decisions[0][1] is not None


def test_line_dedup_partitions_give_same_result(tmp_path, monkeypatch):
  pages = [_page(240, s % 9) for s in range(40)]  # repeats: whole pages recur
  ref, _ = run_global(LineDedup(), split(docs_of(pages), 4), tmp_path / "a")
  monkeypatch.setattr(dedup_exact, "ROWS_PER_PART", 37)
  parts, _ = run_global(LineDedup(), split(docs_of(pages), 4), tmp_path / "b")
  assert ref == parts and sum(isinstance(d, str) for s in ref for d in s) == 31


# --------------------------------------------------------------------------------------- bench corpus


def test_bench_corpus_is_reproducible_and_as_specified(bench):
  docs, dup_of = bench(1000, seed=0, dup_fraction=0.2)
  again, dup_again = bench(1000, seed=0, dup_fraction=0.2)
  other, _ = bench(1000, seed=1, dup_fraction=0.2)
  assert [d.text for d in docs] == [d.text for d in again] and np.array_equal(dup_of, dup_again)
  assert [d.text for d in docs] != [d.text for d in other]
  assert len(docs) == 1000 and (dup_of >= 0).sum() == 200
  originals = dup_of[dup_of >= 0]
  assert (dup_of[originals] == -1).all()  # copies are of distinct documents
  words = np.array([len(d.text.split()) for d in docs])
  assert 150 <= words.min() and words.max() <= 1300 and 500 <= words.mean() <= 700
  assert {d.domain for d in docs} == {"web", "prose"}
  copies = np.flatnonzero(dup_of >= 0)
  exact = np.mean([docs[i].text == docs[dup_of[i]].text for i in copies])
  assert 0.15 <= exact <= 0.35
  jac = [len(_shingles(docs[i].text) & _shingles(docs[dup_of[i]].text)) /
         len(_shingles(docs[i].text) | _shingles(docs[dup_of[i]].text)) for i in copies[:60]]
  assert 0.75 <= np.median(jac) <= 0.95
  # Distinct documents share almost nothing.
  distinct = np.flatnonzero(dup_of == -1)[:40]
  sh = [_shingles(docs[i].text) for i in distinct]
  cross = [len(a & b) / len(a | b) for k, a in enumerate(sh) for b in sh[k + 1:]]
  assert max(cross) < 0.1


def test_precision_recall_is_cluster_based():
  dup_of = np.array([-1, 0, 0, -1, -1])  # cluster {0, 1, 2}, singletons 3 and 4
  pr = benchcorpus.precision_recall
  assert pr(np.array([0, 1, 1, 0, 0], bool), dup_of)["precision"] == 1.0
  r = pr(np.array([1, 0, 1, 0, 0], bool), dup_of)  # original dropped, a copy kept: fine
  assert (r["tp"], r["fp"], r["fn"]) == (2, 0, 0)
  r = pr(np.array([1, 1, 1, 1, 0], bool), dup_of)  # whole cluster and a singleton gone: 2 FPs
  assert (r["tp"], r["fp"], r["fn"]) == (2, 2, 0) and r["precision"] == 0.5
  r = pr(np.array([0, 1, 0, 0, 0], bool), dup_of)
  assert (r["tp"], r["fp"], r["fn"], r["recall"]) == (1, 0, 1, 0.5)


# --------------------------------------------------------------------------------------------- config


def test_registered_and_bad_config():
  for name in ("exact_dedup", "url_dedup", "minhash", "line_dedup"):
    assert name in STAGES
    STAGES[name]()  # defaults are valid
  with pytest.raises(DataError, match="normalize"):
    ExactDedup(normalize="lower")
  with pytest.raises(DataError, match="bands"):
    MinHashDedup(bands=0)
  with pytest.raises(DataError, match="threshold"):
    MinHashDedup(threshold=1.5)
  with pytest.raises(DataError, match="unknown option"):
    MinHashDedup(num_perm=128)
  with pytest.raises(DataError, match="skip_domains"):
    LineDedup(skip_domains="code")
  with pytest.raises(DataError, match="dup_fraction"):
    benchcorpus.build_bench_corpus(10, dup_fraction=1.5)
