"""prepare(): sources spec -> tokenizer + shards, cached by content; weights/sources parsing; the CLI.

Run: python -m pytest tests/test_data_prepare.py -q
"""
from concurrent import futures
import json
import os
import time

import pytest

from data import prepare as prepare_lib
from data.errors import DataError
from data.pipeline import train_iterator
from data.prepare import Prepared, parse_sources, parse_weights, prepare
from data.shards import load_manifest
from data.tokenizer import Tokenizer


def test_parse_weights():
  assert parse_weights("code=0.3, prose=0.7") == {"code": 0.3, "prose": 0.7}
  assert parse_weights("a=1,b=0") == {"a": 1.0, "b": 0.0}
  assert parse_weights("") == {}
  for bad in ("code", "code=", "code=x", "=1", "code=-1", "code=nan", "a=1,a=2", "a=0,b=0",
              "bad name=1"):
    with pytest.raises(DataError):
      parse_weights(bad)


def test_parse_sources(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "b.txt").write_text("y")
  got = parse_sources(f"web={tmp_path}/*.jsonl, books={tmp_path / 'd'}")
  assert got == {"web": [tmp_path / "a.jsonl"], "books": [tmp_path / "d" / "b.txt"]}
  with pytest.raises(DataError, match="glob matches no files"):
    parse_sources(f"web={tmp_path}/*.parquet")
  for bad in ("web", f"={tmp_path}", f"a={tmp_path}/a.jsonl,a={tmp_path}/a.jsonl", ","):
    with pytest.raises(DataError):
      parse_sources(bad)


@pytest.fixture
def sources(shared_data_dir, tmp_path):
  # A copy, so that touching a file (below) changes only this test's inputs.
  web = tmp_path / "web"
  web.mkdir()
  for name in ("ccnet_en_head_0091.jsonl", "ccnet_en_head_0174.jsonl", "dolma_documents_000.json.gz"):
    (web / name).write_bytes((shared_data_dir / "web" / name).read_bytes())
  return f"web={web},books={shared_data_dir / 'text' / 'tinyshakespeare.txt'}"


def test_prepare_user_sources_cached(sources, tmp_path):
  kw = dict(sources=sources, vocab_size=600, cache_dir=str(tmp_path / "cache"), val_fraction=0.1,
            num_workers=1, tokenizer_sample_chars=400_000)
  p = prepare(**kw)
  assert isinstance(p, Prepared) and p.domains == ("web", "books")
  m = load_manifest(p.manifest_path)
  assert m["domains"]["web"]["read"] == 30 and m["domains"]["books"]["read"] == 1
  tok = Tokenizer.load(p.tokenizer_path)
  assert tok.vocab_size == 600 and m["tokenizer_sha256"] == tok.sha256
  batch = next(train_iterator(p.manifest_path, seq_len=32, batch_size=2))
  assert batch["inputs"].shape == (2, 32)

  stamp = os.stat(p.manifest_path).st_mtime_ns
  t = time.perf_counter()
  assert prepare(**kw) == p
  assert time.perf_counter() - t < 1.0  # cached: fingerprints only
  assert os.stat(p.manifest_path).st_mtime_ns == stamp

  # A given tokenizer is used as is; a different val_fraction is a different shard set.
  q = prepare(**dict(kw, tokenizer=str(p.tokenizer_path), val_fraction=0.2))
  assert q.tokenizer_path == p.tokenizer_path and q.manifest_path != p.manifest_path
  with pytest.raises(DataError, match="vocab_size 600"):
    prepare(**dict(kw, tokenizer=str(p.tokenizer_path), vocab_size=4096))
  with pytest.raises(DataError, match="not found"):
    prepare(**dict(kw, tokenizer=str(tmp_path / "missing.model")))

  # Changing an input file (its mtime) invalidates the cache.
  web_file = tmp_path / "web" / "ccnet_en_head_0091.jsonl"
  os.utime(web_file, ns=(stamp, stamp + 10**9))
  r = prepare(**kw)
  assert r.manifest_path != p.manifest_path and r.tokenizer_path != p.tokenizer_path
  assert not list((tmp_path / "cache").rglob(".*"))  # no temp leftovers


def test_concurrent_prepares_share_one_result(sources, tmp_path):
  # Two callers (e.g. two processes of one job on a host) building the same key at once.
  kw = dict(sources=sources, vocab_size=600, cache_dir=str(tmp_path), num_workers=1,
            tokenizer_sample_chars=200_000)
  with futures.ThreadPoolExecutor(2) as pool:
    a, b = pool.map(lambda _: prepare(**kw), range(2))
  assert a == b and load_manifest(a.manifest_path)
  assert not list(tmp_path.rglob(".*"))


def test_cache_dir_from_env(sources, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "envcache"))
  assert prepare_lib.default_cache_dir() == tmp_path / "envcache"
  p = prepare(sources=sources, vocab_size=600, num_workers=1, tokenizer_sample_chars=200_000)
  assert p.manifest_path.is_relative_to(tmp_path / "envcache")


def test_cli(sources, tmp_path, capsys):
  args = [f"--sources={sources}", "--vocab_size=600", f"--cache_dir={tmp_path}",
          "--num_workers=1", "--tokenizer_sample_chars=200000"]
  assert prepare_lib.main(args) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["domains"] == ["web", "books"] and os.path.isfile(out["manifest_path"])
  assert prepare_lib.main([f"--sources=web={tmp_path}/nothing*.jsonl"]) == 2
  assert "glob matches no files" in capsys.readouterr().err


@pytest.mark.slow
def test_prepare_embedded_stdlib_corpus(tmp_path):
  # The default path end to end (a 2M-char tokenizer sample keeps it ~5 s on 2 cores).
  p = prepare(sources="", vocab_size=4096, cache_dir=str(tmp_path), num_workers=2,
              tokenizer_sample_chars=2_000_000)
  assert p.domains == ("code", "prose")
  m = load_manifest(p.manifest_path)
  assert m["vocab_size"] == 4096 and m["dtype"] == "uint16" and m["dropped"] == {"empty": 0}
  # ~4.4M tokens on Python 3.11 at vocab 4096; bounds leave room for other CPython versions.
  assert m["domains"]["code"]["train"]["tokens"] > 2_000_000
  assert m["domains"]["prose"]["train"]["tokens"] > 400_000
  assert m["domains"]["code"]["val"]["docs"] > 0 and m["domains"]["prose"]["val"]["docs"] > 0
  import platform
  assert m["provenance"]["python_version"] == platform.python_version()
  assert len(m["provenance"]["content_sha256"]) == 64
  t = time.perf_counter()
  assert prepare(sources="", vocab_size=4096, cache_dir=str(tmp_path),
                 tokenizer_sample_chars=2_000_000) == p
  assert time.perf_counter() - t < 1.0
