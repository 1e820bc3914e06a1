"""Readers: every format on real and hand-written files, and every bad input -> one DataError naming it.

Run: python -m pytest tests/test_data_readers.py -q
"""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data.errors import DataError
from data.readers import Document, ReadStats, expand_paths, iter_documents

RECORDS = [
    {"id": "a", "text": "first doc\n\twith a tab  \n"},
    {"text": "no id here", "url": "https://example.com/x"},
    {"id": 7, "text": ""},          # empty: skipped, counted
    {"id": "ws", "text": " \n\t "},  # whitespace only: skipped, counted
    {"id": "uni", "text": "日本語 🤗 ▁ café"},
]
EXPECTED_IDS = ["a", None, "uni"]  # None: default "{path}:{line}" (line 2)


def _jsonl_bytes(records, blank_line=True) -> bytes:
  lines = [json.dumps(r, ensure_ascii=False) for r in records]
  if blank_line:
    lines.insert(1, "   ")  # blank lines are not records but still count for line numbers
  return ("\n".join(lines) + "\n").encode()


def _check(path, docs, stats):
  assert [d.text for d in docs] == [RECORDS[0]["text"], RECORDS[1]["text"], RECORDS[4]["text"]]
  assert docs[0].id == "a" and docs[2].id == "uni"
  assert docs[1].id == f"{path}:3"  # line 3: the blank line is line 2
  assert docs[1].source == "https://example.com/x" and docs[0].source == str(path)
  assert (stats.read, stats.empty, stats.kept, stats.files) == (5, 2, 3, 1)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst",
                                    ".json.zst"])
def test_jsonl_formats(tmp_path, suffix):
  data = _jsonl_bytes(RECORDS)
  if suffix.endswith(".gz"):
    data = gzip.compress(data)
  elif suffix.endswith(".zst"):
    # Two frames: concatenated zstd streams (what parallel compressors write) must read as one file.
    half = len(data) // 2
    c = zstandard.ZstdCompressor()
    data = c.compress(data[:half]) + c.compress(data[half:])
  path = tmp_path / f"docs{suffix}"
  path.write_bytes(data)
  stats = ReadStats()
  docs = list(iter_documents(path, stats))
  _check(path, docs, stats)
  assert all(isinstance(d, Document) for d in docs)


def test_plain_text_is_one_document_byte_exact(tmp_path):
  text = "line one\r\nline two\n\n\n  indented\ttab  \n"
  for suffix in (".txt", ".md", ".rst", ".py", ".log"):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(text.encode())
    (doc,) = iter_documents(path)
    assert doc.text == text and doc.id == str(path) and doc.source == str(path)


def test_parquet_in_record_batches(tmp_path):
  n = 2500  # > 2 record batches of 1024 rows
  table = pa.table({"text": [f"doc {i}" if i % 10 else "" for i in range(n)],
                    "id": [f"id{i}" for i in range(n)], "other": list(range(n))})
  path = tmp_path / "t.parquet"
  pq.write_table(table, path, row_group_size=700)
  stats = ReadStats()
  docs = list(iter_documents(path, stats))
  assert stats.read == n and stats.empty == n // 10 and len(docs) == n - n // 10
  assert docs[0] == Document(id="id1", text="doc 1", source=str(path))
  assert docs[-1].id == f"id{n - 1}"
  # Without an id column ids default to "{path}:{row}".
  pq.write_table(pa.table({"text": ["x", "y"]}), tmp_path / "noid.parquet")
  assert [d.id for d in iter_documents(tmp_path / "noid.parquet")] == [
      f"{tmp_path / 'noid.parquet'}:0", f"{tmp_path / 'noid.parquet'}:1"]


def test_real_shared_files(shared_data_dir):
  stats = ReadStats()
  ccnet = list(iter_documents(shared_data_dir / "web/ccnet_en_head_0091.jsonl", stats))
  dolma = list(iter_documents(shared_data_dir / "web/dolma_documents_000.json.gz", stats))
  (shakespeare,) = iter_documents(shared_data_dir / "text/tinyshakespeare.txt", stats)
  assert len(ccnet) == 10 and len(dolma) == 10 and stats.read == 21 and stats.empty == 0
  assert ccnet[0].id.startswith("http") and all(d.text.strip() for d in ccnet + dolma)
  assert shakespeare.text.startswith("First Citizen:") and len(shakespeare.text) == 1115394


def test_expand_paths(tmp_path):
  (tmp_path / "sub" / "deep").mkdir(parents=True)
  (tmp_path / ".git").mkdir()
  for rel in ("a.jsonl", "sub/b.txt", "sub/deep/c.jsonl.zst", "sub/skip.bin", "sub/d.parquet",
              ".git/notes.txt", "sub/.hidden.jsonl"):
    (tmp_path / rel).write_bytes(b"x")
  assert [p.relative_to(tmp_path).as_posix() for p in expand_paths(str(tmp_path))] == [
      "a.jsonl", "sub/b.txt", "sub/d.parquet", "sub/deep/c.jsonl.zst"]
  assert expand_paths(str(tmp_path / "**" / "*.jsonl*")) == [
      tmp_path / "a.jsonl", tmp_path / "sub/deep/c.jsonl.zst"]
  assert expand_paths(str(tmp_path / "sub" / "skip.bin")) == [tmp_path / "sub" / "skip.bin"]


def _error(path) -> str:
  with pytest.raises(DataError) as e:
    list(iter_documents(path))
  assert str(path) in str(e.value), e.value
  return str(e.value)


def test_bad_inputs_name_the_file(tmp_path):
  good = _jsonl_bytes(RECORDS * 50, blank_line=False)

  truncated_gz = tmp_path / "trunc.jsonl.gz"
  truncated_gz.write_bytes(gzip.compress(good)[:-40])
  assert "corrupt" in _error(truncated_gz)

  not_gz = tmp_path / "notgz.jsonl.gz"
  not_gz.write_bytes(b"plain text, not gzip\n")
  _error(not_gz)

  truncated_zst = tmp_path / "trunc.jsonl.zst"
  truncated_zst.write_bytes(zstandard.ZstdCompressor().compress(good)[:-10])
  assert "truncated" in _error(truncated_zst)

  bad_zst = tmp_path / "bad.jsonl.zst"
  bad_zst.write_bytes(b"garbage" * 20)
  assert "zstd" in _error(bad_zst)

  malformed = tmp_path / "malformed.jsonl"
  malformed.write_text('{"text": "ok"}\n{"text": "unterminated\n')
  assert f"{malformed}:2" in _error(malformed)

  no_text = tmp_path / "notext.jsonl"
  no_text.write_text('{"text": "ok"}\n{"id": 1, "body": "wrong field"}\n')
  assert f"{no_text}:2" in _error(no_text) and "'text'" in _error(no_text)

  wrong_type = tmp_path / "wrongtype.jsonl"
  wrong_type.write_text('{"text": ["a list"]}\n')
  assert "string" in _error(wrong_type)

  not_object = tmp_path / "array.json"
  not_object.write_text('[{"text": "a"}]\n')
  assert "JSON object" in _error(not_object)

  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes("caf\xe9".encode("latin-1"))
  assert "UTF-8" in _error(latin1)

  latin1_json = tmp_path / "latin1.jsonl"
  latin1_json.write_bytes(b'{"text": "caf\xe9"}\n')
  assert "UTF-8" in _error(latin1_json)

  no_column = tmp_path / "nocol.parquet"
  pq.write_table(pa.table({"content": ["a"]}), no_column)
  assert "'text' column" in _error(no_column)

  not_parquet = tmp_path / "fake.parquet"
  not_parquet.write_bytes(b"PAR1 but not really")
  _error(not_parquet)

  empty = tmp_path / "empty.jsonl"
  empty.write_bytes(b"")
  assert "empty" in _error(empty)

  blank = tmp_path / "blank.jsonl"
  blank.write_text("\n\n  \n")
  assert "no JSON records" in _error(blank)

  missing = tmp_path / "missing.jsonl"
  assert "no such file" in _error(missing)


def test_expand_paths_errors(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    expand_paths(str(tmp_path / "nope.jsonl"))
  with pytest.raises(DataError, match="glob matches no files") as e:
    expand_paths(str(tmp_path / "*.parquet"))
  assert str(tmp_path) in str(e.value)
  (tmp_path / "only.bin").write_bytes(b"x")
  with pytest.raises(DataError, match="no supported files"):
    expand_paths(str(tmp_path))
