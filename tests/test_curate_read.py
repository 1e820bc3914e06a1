"""Curation read stage: real WARC/JSONL samples, and every malformed input counted, skipped, logged.

Run: python -m pytest -q -p no:xdist tests/test_curate_read.py
"""
import gzip
import json
import logging
import os
import tracemalloc
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import require
from data.curate.read import detect_format, iter_file
from data.errors import DataError


def read(path, **kw):
  """(docs, drops) of one file; checks the invariants every file must satisfy."""
  drops = []
  docs = list(iter_file(path, "web", lambda reason, where: drops.append((reason, where)), **kw))
  ids = [d.id for d in docs]
  assert len(set(ids)) == len(ids), "ids must be unique within a file"
  for _, where in drops:
    assert where.startswith(f"{path}:"), where
  again = [d.id for d in iter_file(path, "web", lambda r, w: None, **kw)]
  assert again == ids, "ids must be stable across runs"
  return docs, drops


def good(i: int) -> bytes:
  return json.dumps({"id": f"d{i}", "text": f"document number {i} is fine"}).encode() + b"\n"


# --- malformed JSON lines ---------------------------------------------------------------------------

def test_bad_lines_are_dropped_with_reason_and_line_and_good_ones_survive(tmp_path, caplog):
  lines = [
      good(0),
      b'{"id": "u", "text": "caf\xe9 in latin-1"}\n',   # 2 invalid_utf8
      good(1),
      b'{"id": "j", "text": "no closing brace"\n',      # 4 bad_json
      b"[1, 2, 3]\n",                                    # 5 not_object
      b'{"id": "n", "body": "no text field"}\n',        # 6 no_text
      b'{"id": "t", "text": 42}\n',                      # 7 no_text (not a string)
      b'{"id": "e", "text": " \\n\\t "}\n',              # 8 empty_text
      b"   \n",                                          # 9 blank: not a record
      good(2),
      b'{"text": "no id here"}\n',                       # 11 -> id "<file>:11"
      good(2),                                           # 12 repeated id -> "d2#2"
      b'{"id": "s", "text": "lone \\ud800 surrogate"}',  # 13, no final newline
  ]
  path = tmp_path / "mixed.jsonl"
  path.write_bytes(b"".join(lines))
  with caplog.at_level(logging.WARNING, logger="data.curate.read"):
    docs, drops = read(path)
  assert [d.id for d in docs] == ["d0", "d1", "d2", "mixed.jsonl:11", "d2#2", "s"]
  assert docs[0].text == "document number 0 is fine" and docs[0].domain == "web"
  assert docs[0].source == str(path)
  assert docs[-1].text == "lone \ufffd surrogate"  # writable as UTF-8
  docs[-1].to_json().encode("utf-8")
  assert drops == [("invalid_utf8", f"{path}:line 2"), ("bad_json", f"{path}:line 4"),
                   ("not_object", f"{path}:line 5"), ("no_text", f"{path}:line 6"),
                   ("no_text", f"{path}:line 7"), ("empty_text", f"{path}:line 8")]
  records = sum(1 for line in lines if line.strip())
  assert len(docs) + len(drops) == records  # in = kept + dropped
  logged = caplog.text
  for reason, where in drops[:5]:
    assert where in logged and reason in logged


def test_logging_is_bounded_but_counting_is_not(tmp_path, caplog):
  path = tmp_path / "many_bad.jsonl"
  path.write_bytes(good(0) + b"{bad\n" * 500 + good(1))
  with caplog.at_level(logging.WARNING, logger="data.curate.read"):
    docs, drops = read(path)
  assert len(docs) == 2 and len(drops) == 500
  assert len(caplog.records) < 20 and "495 more bad_json" in caplog.text


def test_truncated_gzip_keeps_the_lines_before_the_cut(tmp_path):
  data = b"".join(good(i) for i in range(5000))
  gz = gzip.compress(data)
  cut = gz[: len(gz) // 2]
  path = tmp_path / "cut.jsonl.gz"
  path.write_bytes(cut)
  # Reference: everything zlib can decode from the cut bytes; its complete lines are the docs.
  prefix = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut)
  complete = prefix.count(b"\n")
  assert 0 < complete < 5000
  docs, drops = read(path)
  assert [d.id for d in docs] == [f"d{i}" for i in range(complete)]
  assert drops == [("truncated", f"{path}:line {complete + 1}")]


def test_truncated_zstd_keeps_the_lines_before_the_cut(tmp_path):
  data = b"".join(good(i) for i in range(30000))
  z = zstandard.ZstdCompressor().compress(data)
  path = tmp_path / "cut.jsonl.zst"
  path.write_bytes(z[: len(z) // 2])
  docs, drops = read(path)
  assert 0 < len(docs) < 30000
  assert [d.id for d in docs] == [f"d{i}" for i in range(len(docs))]
  assert drops == [("truncated", f"{path}:line {len(docs) + 1}")]


def test_corrupt_gzip_is_one_drop_after_the_good_part(tmp_path):
  gz = bytearray(gzip.compress(b"".join(good(i) for i in range(5000))))
  gz[len(gz) // 2: len(gz) // 2 + 64] = b"\xff" * 64
  path = tmp_path / "corrupt.jsonl.gz"
  path.write_bytes(bytes(gz))
  docs, drops = read(path)
  assert len(drops) == 1 and drops[0][0] == "corrupt"
  assert [d.id for d in docs] == [f"d{i}" for i in range(len(docs))]


def test_compression_is_detected_by_content_not_name(tmp_path):
  path = tmp_path / "actually_gzip.jsonl"
  path.write_bytes(gzip.compress(good(0) + good(1)))
  docs, drops = read(path)
  assert [d.id for d in docs] == ["d0", "d1"] and drops == []


def test_50mb_line_is_streamed_past_without_holding_it(tmp_path):
  path = tmp_path / "huge_line.jsonl"
  with open(path, "wb") as f:
    f.write(good(0))
    f.write(b'{"id": "huge", "text": "')
    block = b"x" * (1 << 20)
    for _ in range(50):
      f.write(block)
    f.write(b'"}\n')
    f.write(good(1))
  tracemalloc.start()
  try:
    drops = []
    docs = list(iter_file(path, "web", lambda r, w: drops.append((r, w))))
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert [d.id for d in docs] == ["d0", "d1"]
  assert drops == [("line_too_long", f"{path}:line 2")]
  # The default limit is 10 MiB: the reader may hold up to that plus a chunk, never the 50 MB line.
  assert peak < 25 << 20, f"peak {peak / 2**20:.0f} MiB"
  # With a higher limit the same line is read as a document.
  docs, drops = read(path, max_record_bytes=64 << 20)
  assert [d.id for d in docs] == ["d0", "huge", "d1"] and len(docs[1].text) == 50 << 20


@pytest.mark.parametrize("name", ["junk.jsonl", "junk.txt", "junk.jsonl.gz", "utf16.txt"])
def test_binary_junk_is_one_drop(tmp_path, name):
  path = tmp_path / name
  if name == "utf16.txt":
    data = "plain text, but UTF-16".encode("utf-16")
  else:
    data = os.urandom(200_000)
  path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
  docs, drops = read(path)
  assert docs == [] and drops == [("binary", f"{path}:byte 0")]


def test_binary_check_does_not_fire_on_one_bad_line(tmp_path):
  path = tmp_path / "one_bad.jsonl"
  path.write_bytes(good(0) + b'{"text": "\xff\xfe"}\n' + good(1))
  docs, drops = read(path)
  assert len(docs) == 2 and drops == [("invalid_utf8", f"{path}:line 2")]


@pytest.mark.parametrize("name,data", [
    ("empty.jsonl", b""), ("empty.txt", b""), ("empty.warc.gz", b""), ("empty.parquet", b""),
    ("blank.jsonl", b"\n \n\n"), ("empty_member.jsonl.gz", gzip.compress(b"", mtime=0)),
])
def test_empty_file_is_one_drop(tmp_path, name, data):
  path = tmp_path / name
  path.write_bytes(data)
  docs, drops = read(path)
  assert docs == [] and drops == [("empty_file", f"{path}:byte 0")]


def test_missing_file_is_a_config_error(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    list(iter_file(tmp_path / "nope.jsonl", "web", lambda r, w: None))


# --- plain text, Parquet ----------------------------------------------------------------------------

def test_text_files(tmp_path):
  (tmp_path / "a.md").write_bytes("\ufeff# Title\n\nBody text é\n".encode())
  (tmp_path / "b.txt").write_bytes(b"ok start \xe9 latin-1 byte")
  (tmp_path / "c.txt").write_bytes(b" \n\t\n")
  (tmp_path / "d.txt.gz").write_bytes(gzip.compress(b"compressed text"))
  docs, drops = read(tmp_path / "a.md")
  assert len(docs) == 1 and docs[0].id == "a.md" and docs[0].text == "# Title\n\nBody text é\n"
  assert read(tmp_path / "b.txt") == ([], [("invalid_utf8", f"{tmp_path / 'b.txt'}:byte 9")])
  assert read(tmp_path / "c.txt") == ([], [("empty_text", f"{tmp_path / 'c.txt'}:byte 0")])
  assert [d.text for d in read(tmp_path / "d.txt.gz")[0]] == ["compressed text"]
  docs, drops = read(tmp_path / "a.md", max_record_bytes=8)
  assert docs == [] and drops == [("too_long", f"{tmp_path / 'a.md'}:byte 0")]


def test_parquet(tmp_path):
  path = tmp_path / "t.parquet"
  pq.write_table(pa.table({"text": ["one", None, "", "four"], "id": ["a", "b", "c", None],
                           "url": ["https://A.example.com:8080/x", None, None, None]}), path)
  docs, drops = read(path)
  assert [d.id for d in docs] == ["a", "t.parquet:3"]
  assert docs[0].url == "https://A.example.com:8080/x" and docs[0].host == "a.example.com"
  assert drops == [("no_text", f"{path}:row 1"), ("empty_text", f"{path}:row 2")]
  binary = tmp_path / "bin.parquet"
  pq.write_table(pa.table({"text": pa.array([b"utf8 bytes", b"\xff"], pa.binary())}), binary)
  docs, drops = read(binary)
  assert [d.text for d in docs] == ["utf8 bytes"] and drops == [("invalid_utf8", f"{binary}:row 1")]
  no_col = tmp_path / "nocol.parquet"
  pq.write_table(pa.table({"body": ["x"]}), no_col)
  assert read(no_col) == ([], [("no_text_column", f"{no_col}:row 0")])
  bad = tmp_path / "bad.parquet"
  bad.write_bytes(b"PAR1 not really parquet PAR1")
  assert read(bad) == ([], [("corrupt", f"{bad}:row 0")])


def test_detect_format():
  cases = {"a.warc.gz": "warc", "b.WET.GZ": "warc", "c.warc": "warc", "d.warc.zst": "warc",
           "e.jsonl": "jsonl", "f.json.gz": "jsonl", "g.jsonl.zst": "jsonl", "h.parquet": "parquet",
           "i.txt": "text", "j.md": "text", "k": "text", "l.txt.gz": "text"}
  assert {n: detect_format(n) for n in cases} == cases


# --- WARC: hand-built records -----------------------------------------------------------------------

def warc_record(i: int, kind: str, uri: str, block: bytes, content_type: str) -> bytes:
  head = (f"WARC/1.0\r\nWARC-Type: {kind}\r\n"
          f"WARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-{i:012d}>\r\n"
          f"WARC-Date: 2024-01-01T00:00:00Z\r\nWARC-Target-URI: {uri}\r\n"
          f"Content-Type: {content_type}\r\nContent-Length: {len(block)}\r\n\r\n")
  return head.encode() + block + b"\r\n\r\n"


def http(status: str, headers: str, body: bytes) -> bytes:
  return f"HTTP/1.1 {status}\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body


RESP = "application/http; msgtype=response"
LATIN1_PAGE = ('<html><head><meta charset="iso-8859-1"><title>Caf\xe9</title></head>'
               "<body><p>D\xe9j\xe0 vu</p></body></html>").encode("latin-1")


def synthetic_warc() -> bytes:
  return b"".join([
      warc_record(0, "warcinfo", "", b"software: test\r\n", "application/warc-fields"),
      warc_record(1, "request", "https://a.example/", b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
                  "application/http; msgtype=request"),
      warc_record(2, "response", "https://a.example/",
                  http("200 OK", "Content-Type: text/html; charset=utf-8\r\n",
                       "<html><body><p>Grüße</p></body></html>".encode()), RESP),
      warc_record(3, "response", "https://a.example/logo.png",
                  http("200 OK", "Content-Type: image/png\r\n", b"\x89PNG\r\n\x1a\n\x00\x00"), RESP),
      warc_record(4, "response", "https://a.example/gone", http("404 Not Found", "Content-Type: "
                  "text/html\r\n", b"<html>not here</html>"), RESP),
      warc_record(5, "response", "<https://b.example/old>",
                  http("301 Moved Permanently", "Location: /new\r\n", b""), RESP),
      warc_record(6, "response", "https://c.example/latin", http("200 OK", "Content-Type: "
                  "text/html\r\n", LATIN1_PAGE), RESP),
      warc_record(7, "metadata", "https://a.example/", b"fetchTimeMs: 12\r\n",
                  "application/warc-fields"),
      warc_record(8, "conversion", "https://d.example/wet", b"Plain WET text.\nLine two.",
                  "text/plain"),
      warc_record(9, "revisit", "https://a.example/", b"", RESP),
  ])


def test_warc_record_kinds_and_charsets(tmp_path):
  path = tmp_path / "s.warc.gz"
  path.write_bytes(gzip.compress(synthetic_warc()))
  docs, drops = read(path)
  by_id = {d.id[-3:-1]: d for d in docs}
  assert sorted(by_id) == ["02", "06", "08"]
  assert by_id["02"].html == "<html><body><p>Grüße</p></body></html>" and by_id["02"].text == ""
  assert by_id["02"].url == "https://a.example/" and by_id["02"].host == "a.example"
  assert "Café" in by_id["06"].html and "Déjà vu" in by_id["06"].html  # <meta charset> honoured
  assert by_id["08"].text == "Plain WET text.\nLine two." and by_id["08"].html == ""
  # request/metadata/warcinfo/revisit are not documents: no drops for them.
  assert [r for r, _ in drops] == ["not_html", "http_4xx", "http_3xx"]
  assert all(w.startswith(f"{path}:byte ") for _, w in drops)


def test_bad_http_fails_one_record_not_the_file(tmp_path):
  ok = http("200 OK", "Content-Type: text/html\r\nContent-Encoding: gzip\r\n",
            gzip.compress(b"<p>gzipped page</p>"))
  chunked = http("200 OK", "Content-Type: text/html\r\nTransfer-Encoding: chunked\r\n",
                 b"5\r\n<p>ch\r\n9\r\nunked</p>\r\n0\r\n\r\n")
  data = b"".join([
      warc_record(1, "response", "https://a.example/", http(
          "200 OK", "Content-Type: text/html\r\nContent-Encoding: gzip\r\n", b"not gzip"), RESP),
      warc_record(2, "response", "https://b.example/", ok, RESP),
      warc_record(3, "response", "https://c.example/", http(
          "200 OK", "Content-Type: text/html\r\nTransfer-Encoding: chunked\r\n", b"zz\r\nx"), RESP),
      warc_record(4, "response", "https://d.example/", chunked, RESP),
      warc_record(5, "response", "https://e.example/", b"no status line\r\n\r\n<p>x</p>", RESP),
      warc_record(6, "response", "https://f.example/", http(
          "200 OK", "Content-Type: text/html\r\n", b"<p>" + b"big " * 100 + b"</p>"), RESP),
  ])
  path = tmp_path / "bad_http.warc"
  path.write_bytes(data)
  docs, drops = read(path, max_record_bytes=300)
  assert [d.html for d in docs] == ["<p>gzipped page</p>", "<p>chunked</p>"]
  assert [r for r, _ in drops] == ["bad_http", "bad_http", "bad_http", "too_long"]


def test_many_repeated_ids_stay_unique_in_linear_time(tmp_path):
  path = tmp_path / "same_id.jsonl"
  path.write_bytes(b"".join(json.dumps({"id": "0", "text": "x"}).encode() + b"\n"
                            for _ in range(20_000)))
  docs, drops = read(path)  # quadratic suffixing would take minutes here
  assert len({d.id for d in docs}) == 20_000 and docs[-1].id == "0#20000"


def test_truncated_uncompressed_warc_drops_the_cut_record(tmp_path):
  data = synthetic_warc()
  cut = data.index(b"Plain WET text.") + 5  # inside the conversion record
  path = tmp_path / "cut.warc"
  path.write_bytes(data[:cut])
  docs, drops = read(path)
  assert sorted(d.id[-3:-1] for d in docs) == ["02", "06"]
  assert [r for r, _ in drops] == ["not_html", "http_4xx", "http_3xx", "truncated"]


def test_junk_named_warc(tmp_path):
  path = tmp_path / "junk.warc"
  path.write_bytes(os.urandom(5000))
  assert read(path) == ([], [("not_warc", f"{path}:byte 0")])


# --- real samples -----------------------------------------------------------------------------------

def test_real_common_crawl_warc(shared_data_dir):
  docs = {}
  for name, n in (("cc_sample_0000.warc.gz", 22), ("cc_sample_0001.warc.gz", 15)):
    path = shared_data_dir / "web" / name
    require(path.is_file(), f"{path} missing")
    got, drops = read(path)
    # Every response in these wget WARCs is a 200 text/html page (checked with FastWARC directly);
    # the request, metadata, resource and warcinfo records are not documents.
    assert len(got) == n and drops == []
    docs.update({d.url: d for d in got})
  assert all(d.id.startswith("<urn:uuid:") and d.url.startswith("https://") and d.html
             and d.text == "" for d in docs.values())
  page = docs["https://www.cs.washington.edu/people/faculty/weld"]
  assert page.host == "www.cs.washington.edu" and "Daniel S. Weld" in page.html
  assert page.html.lstrip().lower().startswith("<!doctype html")


def test_real_warcio_example(shared_data_dir):
  path = shared_data_dir / "web" / "warcio_example.warc.gz"
  require(path.is_file(), f"{path} missing")
  docs, drops = read(path)
  # warcinfo x2, request x2, response x1, revisit x1: one document, nothing dropped.
  assert drops == [] and len(docs) == 1
  assert docs[0].url == "http://example.com/" and docs[0].id == \
      "<urn:uuid:a9c51e3e-0221-11e7-bf66-0242ac120005>"
  assert "<title>Example Domain</title>" in docs[0].html  # gzip Content-Encoding decoded


def test_real_truncated_warc_keeps_complete_records(shared_data_dir, tmp_path):
  src = shared_data_dir / "web" / "cc_sample_0000.warc.gz"
  require(src.is_file(), f"{src} missing")
  full = {d.id: d.html for d in read(src)[0]}
  path = tmp_path / "cut.warc.gz"
  path.write_bytes(src.read_bytes()[:100_000])
  docs, drops = read(path)
  assert 0 < len(docs) < len(full)
  assert all(d.html == full[d.id] for d in docs)  # kept records are whole
  assert [r for r, _ in drops] == ["truncated"]


def test_real_ccnet_and_dolma_jsonl(shared_data_dir):
  for name in ("ccnet_en_head_0091.jsonl", "ccnet_en_head_0174.jsonl",
               "dolma_documents_000.json.gz"):
    path = shared_data_dir / "web" / name
    require(path.is_file(), f"{path} missing")
    docs, drops = read(path)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
      raw = [json.loads(line) for line in f]
    assert drops == [] and len(docs) == len(raw) == 10
    for d, r in zip(docs, raw):
      assert d.id == r["id"] and d.text == r["text"]
      assert d.url == r["metadata"]["url"] and d.host == r["metadata"]["source_domain"].split(":")[0]
      assert d.meta["source_meta"]["metadata"]["language_score"] == r["metadata"]["language_score"]
      assert "line_ids" not in d.meta["source_meta"]["metadata"]  # lists are left out of meta
