"""Tests for the contamination report (`data.contamination`).

A small training corpus (10 real CCNet documents with GSM8K test questions and a HumanEval prompt
planted in five of them, plus Tiny Shakespeare) is turned into shards by `data.prepare`, as training
does; the report must name exactly the planted examples, with their exact n-gram counts, whether it
reads the decoded shards or the raw files. Also: normalization (case, punctuation, whitespace), the
n-gram boundary (13 words found, 12 not), a clean corpus (Tiny Shakespeare vs all four eval sets),
WikiText-2 valid, eval sets given as files, upsampled shards, the CLI and its errors.

Run: python -m pytest tests/test_contamination.py -q
"""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, require, shared_data
from data import contamination as ct
from data.curate import decontam as dc
from data.errors import DataError
from data.prepare import prepare
from data.shards import build_shards

N = 13
PLANTED_GSM = {"7": 40, "100": 61, "250": 31, "900": 1}  # item -> its distinct 13-grams in training


def _grams(text: str) -> int:
  """Distinct indexed 13-grams of `text` (what a verbatim copy of it shares with the index)."""
  t = dc.tokenize(text)
  return len(set(dc.ngram_hashes(t, N)[dc.worded(t, N)].tolist()))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = shared_data()
  for rel in ("math/gsm8k_test.jsonl", "code/humaneval.jsonl.gz", "text/wikitext2_valid.txt",
              "text/wikitext2_test.txt", "text/tinyshakespeare.txt", "web/ccnet_en_head_0091.jsonl"):
    require((root / rel).is_file(), f"{rel} missing under {root} (set SHARED_DATA)")
  gsm = [json.loads(line) for line in open(root / "math/gsm8k_test.jsonl", encoding="utf-8")]
  with gzip.open(root / "code/humaneval.jsonl.gz", "rt", encoding="utf-8") as f:
    he = [json.loads(line) for line in f]
  web = [json.loads(line) for line in open(root / "web/ccnet_en_head_0091.jsonl", encoding="utf-8")]
  q = {i: gsm[i]["question"] for i in (7, 100, 250, 500, 900)}
  w500 = dc.tokenize(q[500])  # 27 words
  broken = " ".join(w + (" so" if k % 12 == 11 else "") for k, w in enumerate(w500))
  plants = {
      2: lambda t: t + "\n" + q[7],                                  # appended verbatim
      5: lambda t: q[100] + "\n" + t,                                # prepended verbatim
      7: lambda t: t + "\nMy attempt:\n" + he[3]["prompt"] + "    pass\n",
      # Case, punctuation and whitespace changed: the same words, so the same 13-grams.
      8: lambda t: t + "\n" + q[250].upper().replace(".", " ;").replace(",", "!").replace(" ", "\n\t "),
      # Exactly 13 words of item 900 (one 13-gram); only 12 of item 500, and item 500 with a word put
      # after every 12th: no 13 of its words in a row, so neither may be found.
      9: lambda t: "\n".join([t, " ".join(dc.tokenize(q[900])[:13]), " ".join(w500[:12]), broken]),
  }
  assert len(dc.tokenize(q[900])) > 13
  for i, n in PLANTED_GSM.items():
    assert n == (1 if i == "900" else _grams(q[int(i)]))
  web_dir = tmp_path_factory.mktemp("web")
  with open(web_dir / "web.jsonl", "w", encoding="utf-8") as f:
    for i, row in enumerate(web):
      f.write(json.dumps({"id": f"web:{i}", "text": plants.get(i, lambda t: t)(row["text"])}) + "\n")
  sources = f"web={web_dir},books={root / 'text/tinyshakespeare.txt'}"
  # val_fraction=0: every planted document is a training document.
  prepared = prepare(sources=sources, vocab_size=600, cache_dir=str(tmp_path_factory.mktemp("cache")),
                     val_fraction=0.0, num_workers=1, tokenizer_sample_chars=200_000)
  return {"root": root, "sources": sources, "prepared": prepared, "web_dir": web_dir, "he": he,
          "q": q}


def _ids(report, name):
  return report["eval_sets"][name]["contaminated_ids"]


def test_manifest_report_finds_exactly_the_planted_examples(corpus):
  r = ct.contamination_report(str(corpus["prepared"].manifest_path), "gsm8k_test,humaneval")
  gsm, he = r["eval_sets"]["gsm8k_test"], r["eval_sets"]["humaneval"]
  assert gsm["contaminated_ids"] == ["7", "100", "250", "900"]
  assert he["contaminated_ids"] == ["HumanEval/3"]
  assert gsm["examples"] == 1319 and gsm["contaminated"] == 4 and gsm["fraction"] == 4 / 1319
  assert he["examples"] == 164 and he["fraction"] == 1 / 164
  assert gsm["overlap_ngrams"] == sum(PLANTED_GSM.values())
  assert he["overlap_ngrams"] == _grams(corpus["he"][3]["prompt"])
  # Ranked by overlapping n-grams; each with a real matched 13-gram and the document it is in.
  ranked = sorted(PLANTED_GSM.items(), key=lambda kv: -kv[1])
  assert [(t["id"], t["ngrams"]) for t in gsm["top"]] == ranked
  where = {"7": 2, "100": 5, "250": 8, "900": 9}
  for t in gsm["top"]:
    assert t["source"] == "web" and t["doc"] == f"web/train-00000.array_record#{where[t['id']]}"
    assert len(t["ngram"].split()) == N
    assert t["ngram"] in " ".join(dc.tokenize(corpus["q"][int(t["id"])]))
  assert gsm["top"][0]["item_ngrams"] > 61  # the index also holds the answer's n-grams
  # Per training source: all of it in web, none in Tiny Shakespeare.
  web, books = r["sources"]["web"], r["sources"]["books"]
  assert (web["kind"], web["docs"], web["records"], web["docs_contaminated"]) == ("shards", 10, 10, 5)
  assert web["sets"]["gsm8k_test"] == {"docs": 4, "overlap_ngrams": 133, "contaminated": 4}
  assert web["sets"]["humaneval"]["docs"] == 1
  assert books["docs"] == 1 and books["chars"] == 1115394 and books["docs_contaminated"] == 0
  assert all(s == {"docs": 0, "overlap_ngrams": 0, "contaminated": 0} for s in books["sets"].values())


def test_raw_sources_give_the_same_report(corpus):
  # Decoded shards are exactly the raw text (the tokenizer is lossless): the same counts.
  a = ct.contamination_report(str(corpus["prepared"].manifest_path), "gsm8k_test,humaneval")
  b = ct.contamination_report(corpus["sources"], ("gsm8k_test", "humaneval"))
  for name in ("gsm8k_test", "humaneval"):
    sa, sb = a["eval_sets"][name], b["eval_sets"][name]
    assert sa["contaminated_ids"] == sb["contaminated_ids"]
    assert sa["overlap_ngrams"] == sb["overlap_ngrams"]
    assert [t["ngrams"] for t in sa["top"]] == [t["ngrams"] for t in sb["top"]]
  assert b["sources"]["web"]["kind"] == "raw"
  assert b["eval_sets"]["gsm8k_test"]["top"][0]["doc"] == "web:5"  # the JSONL record's id
  assert a["sources"]["web"]["chars"] == b["sources"]["web"]["chars"]


def test_clean_corpus_has_no_false_positives(corpus):
  r = ct.contamination_report(str(corpus["root"] / "text/tinyshakespeare.txt"))
  assert list(r["eval_sets"]) == list(ct.DEFAULT_EVALS)
  for s in r["eval_sets"].values():
    assert s["contaminated"] == 0 and s["overlap_ngrams"] == 0 and s["top"] == []
  assert r["eval_sets"]["wikitext2_valid"]["examples"] == 60
  assert r["eval_sets"]["gsm8k_test"]["ngrams"] > 100_000


def test_wikitext_valid_paragraph_found_after_detokenizing(corpus, tmp_path):
  lines = (corpus["root"] / "text/wikitext2_valid.txt").read_text(encoding="utf-8").split("\n")
  k = next(i for i, ln in enumerate(lines) if " @-@ " in ln and " @,@ " in ln and len(ln) > 400
           and "<unk>" not in ln)
  raw = dc.detokenize_wikitext(lines[k])
  assert " @" not in raw and " ," not in raw
  heading = next(h for h in map(dc._WT_HEADING_RE.match, reversed(lines[:k])) if h)
  title = dc.detokenize_wikitext(heading.group(1))  # WikiText items are named by article title
  (tmp_path / "blog.txt").write_text("From my notes:\n\n" + raw + "\n")
  r = ct.contamination_report(str(tmp_path / "blog.txt"), "wikitext2_valid,wikitext2_test")
  assert _ids(r, "wikitext2_valid") == [title] and _ids(r, "wikitext2_test") == []
  assert r["eval_sets"]["wikitext2_valid"]["overlap_ngrams"] == _grams(raw)


def test_eval_sets_from_files(corpus, tmp_path):
  shakespeare = (corpus["root"] / "text/tinyshakespeare.txt").read_text(encoding="utf-8")
  line = "Let us kill him, and we'll have corn at our own price.\nIs't a verdict?"
  assert line in shakespeare and len(dc.tokenize(line)) == 17
  evals = tmp_path / "mine.jsonl"
  rows = [{"id": "copied", "text": line.upper() + " And a novel ending that no play contains."},
          # Shares a 13-gram with "copied": both examples are contaminated, not just the first.
          {"task_id": "shared", "prompt": "Preamble words here.", "completion": line},
          {"question": "A question that Shakespeare never wrote about seventeen robots and their cats?",
           "answer": "Robots have no cats, so the answer is plainly zero of them, my friend."}]
  evals.write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "paras.txt").write_text("Nothing in the play says this sentence about quantum cats "
                                      "and their many boxes.\n\n\n" + line + "\n")
  r = ct.contamination_report(str(corpus["root"] / "text/tinyshakespeare.txt"),
                              f"{evals},{tmp_path / 'paras.txt'}")
  assert r["eval_sets"]["mine.jsonl"]["contaminated_ids"] == ["copied", "shared"]
  assert r["eval_sets"]["mine.jsonl"]["examples"] == 3
  assert r["eval_sets"]["paras.txt"]["contaminated_ids"] == ["line 4"]
  assert r["eval_sets"]["paras.txt"]["examples"] == 2
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"title": "no text here"}\n')
  with pytest.raises(DataError, match="bad.jsonl line 2: no text field"):
    ct.eval_indexes(str(bad))


def test_upsampled_shards_and_tokenizer_beside_manifest(corpus, tmp_path):
  # data.curate's layout: tokenizer.model beside the manifest; a domain upsampled to 2 epochs.
  out = tmp_path / "shards"
  build_shards({"web": [corpus["web_dir"] / "web.jsonl"]}, corpus["prepared"].tokenizer_path, out,
               val_fraction=0.0, num_workers=1, epochs={"web": 2.0})
  shutil.copyfile(corpus["prepared"].tokenizer_path, out / "tokenizer.model")
  r = ct.contamination_report(f"cur={out}", "gsm8k_test")
  web = r["sources"]["cur/web"]
  assert (web["docs"], web["records"], web["docs_contaminated"]) == (10, 20, 4)
  assert _ids(r, "gsm8k_test") == list(PLANTED_GSM)
  # Moved away from its tokenizer: an explicit --tokenizer is needed, and must be the right one.
  (out / "tokenizer.model").unlink()
  with pytest.raises(DataError, match="give --tokenizer"):
    ct.contamination_report(str(out), "gsm8k_test")
  r = ct.contamination_report(str(out), "gsm8k_test", tokenizer=str(corpus["prepared"].tokenizer_path))
  assert _ids(r, "gsm8k_test") == list(PLANTED_GSM)


def test_cli_writes_json_and_table(corpus, tmp_path, capsys):
  out = tmp_path / "sub" / "report.json"
  assert ct.main([f"--manifest={corpus['prepared'].manifest_path}", "--eval=gsm8k_test,humaneval",
                  f"--out={out}", "--top=2"]) == 0
  table = capsys.readouterr().out
  report = json.loads(out.read_text())
  assert [t["id"] for t in report["eval_sets"]["gsm8k_test"]["top"]] == ["100", "7"]
  assert report["eval_sets"]["humaneval"]["contaminated_ids"] == ["HumanEval/3"]
  assert "gsm8k_test" in table and "0.30%" in table and "HumanEval/3: 58/" in table
  assert table.splitlines()[-2].split()[:3] == ["web", "10", "5"]


@pytest.mark.parametrize("args, message", [
    (["--manifest={tmp}/nowhere/manifest.json"], "manifest not found"),
    (["--manifest={tmp}/nothing_here"], "no such file or directory"),
    (["--manifest={books}", "--eval=gsm8k_test,mmlu"], "unknown eval set 'mmlu'"),
    (["--manifest={books}", "--eval=gsm8k_test", "--n=2"], "n must be an int >= 3"),
    (["--manifest={books}", "--splits=test"], "splits must be"),
])
def test_cli_errors(corpus, tmp_path, capsys, args, message):
  args = [a.format(tmp=tmp_path, books=corpus["root"] / "text/tinyshakespeare.txt") for a in args]
  with pytest.raises(SystemExit) as e:
    ct.main(args)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_entry_point_error_is_one_line(tmp_path):
  p = subprocess.run(
      [sys.executable, "-m", "data.contamination", f"--manifest={tmp_path}/manifest.json"],
      cwd=REPO, capture_output=True, text=True, timeout=60)
  assert p.returncode == 2 and p.stdout == ""
  assert p.stderr == f"error: {tmp_path}/manifest.json: manifest not found (run data.prepare first)\n"


def test_missing_shared_data_folder(corpus, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("SHARED_DATA", str(tmp_path / "absent"))
  with pytest.raises(SystemExit) as e:
    ct.main([f"--manifest={corpus['root'] / 'text/tinyshakespeare.txt'}", "--eval=humaneval"])
  assert e.value.code == 2 and "absent: shared data folder not found" in capsys.readouterr().err


def test_corrupt_shard(corpus, tmp_path):
  shards = tmp_path / "shards"
  shutil.copytree(corpus["prepared"].manifest_path.parent, shards)
  (shards / "web/train-00000.array_record").write_bytes(b"\x00" * 1000)
  with pytest.raises(DataError, match="train-00000.array_record: corrupt shard"):
    ct.contamination_report(str(shards), "humaneval",
                            tokenizer=str(corpus["prepared"].tokenizer_path))
