"""WARC/WET input for the curation reader, parsed by FastWARC.

Library module, no entry point; `data.curate.read.iter_file` calls `read_warc` for .warc/.wet files.
Documents are `response` records (HTTP; HTML bodies become `Doc.html`) and `conversion` records (WET
plain text, `Doc.text`); warcinfo, request, metadata, resource and revisit records are not documents
and are skipped without a count. Non-HTML responses drop as "not_html", non-2xx ones as
"http_3xx"/"http_4xx"/"http_5xx". The bytes come from `streams.chunks`, not from FastWARC's own
decompression, because FastWARC ends a cut .warc.gz silently while `chunks` raises StreamError.
"""
from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from data.curate.base import Doc, host_of
from data.curate.streams import StreamError

_HTML_MIMES = ("text/html", "application/xhtml+xml")
# <meta charset="x"> or <meta http-equiv="Content-Type" content="text/html; charset=x">. Searched in
# the first 4096 bytes: the HTML5 prescan stops at 1024, but real pages often declare it later.
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([a-zA-Z0-9_.:-]+)""", re.IGNORECASE)
_META_CHARSET_BYTES = 4096


class _ChunkStream(io.RawIOBase):
  """A read-only file over decompressed chunks, for FastWARC (it calls only tell() and read()).

  Decompressing here rather than in FastWARC is what makes truncation visible: FastWARC ends a cut
  .warc.gz silently, while `streams.chunks` raises StreamError, which FastWARC passes through.
  """

  def __init__(self, chunks: Iterator[bytes]):
    super().__init__()
    self._chunks = chunks
    self._buf = memoryview(b"")  # current chunk; a view, so handing out a slice copies once
    self._pos = 0
    self.tail = b""   # last bytes of the stream: a complete WARC ends with a record's "\r\n\r\n"
    self.at_eof = False

  def readable(self) -> bool:
    return True

  def tell(self) -> int:
    return self._pos

  def readinto(self, b) -> int:
    while not self._buf:
      chunk = next(self._chunks, None)
      if chunk is None:
        self.at_eof = True
        return 0
      self._buf = memoryview(chunk)
      self.tail = (self.tail + chunk[-4:])[-4:]
    n = min(len(b), len(self._buf))
    b[:n] = self._buf[:n]
    self._buf = self._buf[n:]
    self._pos += n
    return n


def read_warc(path: Path, domain: str, chunks: Iterator[bytes], drops: Callable[..., None],
               max_bytes: int) -> Iterator[Doc]:
  from fastwarc.warc import ArchiveIterator  # pylint: disable=g-import-not-at-top

  stream = _ChunkStream(chunks)
  source = str(path)
  # Each record becomes an event: a Doc, a (reason, where, detail) drop, or None (not a document).
  # The last one is held back until the next record parses or the stream ends cleanly, because an
  # uncompressed WARC cut mid-record reads as a silently short record.
  pending: list[Any] = []
  where = f"{path}:byte 0"

  def flush() -> Iterator[Doc]:
    for ev in pending:
      if isinstance(ev, Doc):
        yield ev
      elif ev is not None:
        drops(*ev)
    pending.clear()

  try:
    # auto_decode="none": a bad Content-/Transfer-Encoding must fail one record (`_http_body`), while
    # FastWARC's own decoding fails the rest of the file with it.
    for rec in ArchiveIterator(stream, parse_http=True, auto_decode="none", stream_detect=False):
      yield from flush()
      where = f"{path}:byte {rec.stream_pos}"
      pending.append(_warc_event(rec, where, domain, source, max_bytes))
  except StreamError as e:
    yield from flush()
    drops(e.reason, f"{path}:byte {stream.tell()}", f"{e}; the records before are kept")
    return
  except (OSError, ValueError) as e:  # FastWARC: malformed WARC record headers
    yield from flush()
    drops("truncated" if stream.at_eof else "corrupt", where, f"WARC parse error: {e}")
    return
  if stream.tail.endswith((b"\r\n\r\n", b"\n\n")):
    yield from flush()
  else:
    pending.clear()
    drops("truncated", where, "the last WARC record is cut short")


def _warc_event(rec, where: str, domain: str, source: str, max_bytes: int) -> Any:
  from fastwarc.warc import WarcRecordType  # pylint: disable=g-import-not-at-top

  kind = rec.record_type
  if kind not in (WarcRecordType.response, WarcRecordType.conversion):
    return None  # warcinfo, request, metadata, resource, revisit: not documents
  if kind == WarcRecordType.response and not rec.is_http:
    return None  # e.g. dns: responses; not web pages
  if rec.content_length > max_bytes:
    return ("too_long", where, f"record of {rec.content_length} bytes")
  url = (rec.headers.get("WARC-Target-URI") or "").strip().strip("<>")
  doc_id = rec.record_id or where
  if kind == WarcRecordType.conversion:
    text = rec.reader.read().decode("utf-8", errors="replace")
    if not text.strip():
      return ("empty_text", where, "")
    return Doc(id=doc_id, text=text, domain=domain, url=url, host=host_of(url), source=source)
  status = (rec.http_headers.status_code if rec.http_headers is not None else 0) or 0
  if not 100 <= status < 600:
    return ("bad_http", where, "no parsable HTTP status line")
  if not 200 <= status < 300:
    return (f"http_{status // 100}xx", where, f"HTTP status {status}")
  mime = (rec.http_content_type or "").lower()
  try:
    body = _http_body(rec.reader.read(), rec.http_headers)
  except (OSError, ValueError) as e:
    return ("bad_http", where, f"HTTP body: {e}")
  if not mime:  # no Content-Type: sniff the start of the body
    start = body[:512].lstrip().lower()
    mime = "text/html" if start.startswith((b"<!doctype html", b"<html")) else ""
  if mime not in _HTML_MIMES:
    return ("not_html", where, f"Content-Type {mime or '(none)'}")
  html = _decode_html(body, rec.http_charset)
  if not html.strip():
    return ("empty_text", where, "")
  return Doc(id=doc_id, text="", domain=domain, url=url, host=host_of(url), source=source,
             html=html)


def _http_body(raw: bytes, headers) -> bytes:
  """The payload with Transfer-Encoding (chunked) and Content-Encoding (gzip, deflate, br, zstd)
  undone. Common Crawl stores payloads already decoded (the original headers renamed
  X-Crawler-*), so this matters for WARCs written by wget, warcprox, Browsertrix and the like."""
  from fastwarc import stream_io  # pylint: disable=g-import-not-at-top

  if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
    raw = stream_io.ChunkedReader(io.BytesIO(raw)).read()
  codings = [c.strip() for c in (headers.get("Content-Encoding") or "").lower().split(",")]
  for coding in reversed([c for c in codings if c and c != "identity"]):
    if coding in ("gzip", "x-gzip"):
      raw = stream_io.GzipReader(io.BytesIO(raw)).read()
    elif coding == "deflate":
      raw = stream_io.GzipReader(io.BytesIO(raw), zlib=True).read()
    elif coding == "br":
      raw = stream_io.BrotliReader(io.BytesIO(raw)).read()
    elif coding == "zstd":
      raw = stream_io.ZstdReader(io.BytesIO(raw)).read()
    else:
      raise ValueError(f"unknown Content-Encoding {coding!r}")
  return raw


def _decode_html(body: bytes, http_charset: str | None) -> str:
  """HTTP charset, else <meta> charset (each mapped to its WHATWG encoding), else UTF-8, else cp1252.

  cp1252 as the last resort is what browsers use for undeclared legacy pages (WHATWG Encoding, the
  default for most locales), and it is the likeliest encoding of an undeclared non-UTF-8 page.
  """
  from resiliparse.parse.encoding import map_encoding_to_html5  # pylint: disable=g-import-not-at-top

  for declared in (http_charset, _meta_charset(body)):
    if declared:
      enc = map_encoding_to_html5(declared, fallback_utf8=False)
      if enc:
        try:
          return body.decode(enc, errors="replace")
        except LookupError:  # WHATWG name Python does not know (e.g. "x-user-defined")
          pass
  try:
    return body.decode("utf-8")
  except UnicodeDecodeError:
    return body.decode("cp1252", errors="replace")


def _meta_charset(body: bytes) -> str:
  m = _META_CHARSET.search(body, 0, _META_CHARSET_BYTES)
  return m.group(1).decode("ascii") if m else ""
