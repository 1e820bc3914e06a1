"""Byte streams for the curation reader: decompression that reports truncation, line splitting.

Library module, no entry point; used by `data.curate.read` and `data.curate.warc`:

  try:
    for line_no, line in lines(chunks(path), max_bytes=10 << 20):   # line None: over max_bytes
      ...
  except StreamError as e:     # e.reason: "truncated" (stream cut short) or "corrupt"
    ...

`chunks` picks gzip/zstd by magic bytes (not by name) and yields the decompressed bytes in ~1 MiB
pieces; everything decoded before a cut or a corrupt block is yielded before StreamError is raised,
so a reader keeps the records in front of the damage.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

# 1 MiB reads: per-call overhead vanishes, memory stays flat.
CHUNK_BYTES = 1 << 20
# Most decompressed bytes one zlib call may return: bounds memory on a decompression bomb.
_MAX_OUT = 4 << 20
# Binary sniffing looks at the first 8000 bytes, as git's buffer_is_binary() does.
SNIFF_BYTES = 8000
# Mostly-not-UTF-8: >10% of the sniffed characters undecodable. Random bytes give ~50%; a text file
# with one bad line in its first 8000 bytes gives well under 1%.
_BINARY_BAD_FRACTION = 0.10
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class StreamError(Exception):
  """A compressed stream ended early ("truncated") or holds undecodable data ("corrupt")."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


def chunks(path: Path) -> Iterator[bytes]:
  """Decompressed bytes of `path` (gzip/zstd by magic bytes, else raw); raises StreamError."""
  with open(path, "rb") as f:
    first = f.read(CHUNK_BYTES)
    if first.startswith(_GZIP_MAGIC):
      yield from _gunzip(first, f)
    elif first.startswith(_ZSTD_MAGIC):
      yield from _unzstd(first, f)
    else:
      chunk = first
      while chunk:
        yield chunk
        chunk = f.read(CHUNK_BYTES)


def _gunzip(first: bytes, f) -> Iterator[bytes]:
  # zlib rather than gzip.GzipFile: GzipFile loses the last partial read when the stream is cut, and
  # a multi-member file (one member per WARC record) is a loop over `unused_data` here.
  d = zlib.decompressobj(16 + zlib.MAX_WBITS)
  in_member = False
  data = first
  try:
    while data:
      while data:
        in_member = True
        out = d.decompress(data, _MAX_OUT)
        if out:
          yield out
        if d.eof:
          data, d, in_member = d.unused_data, zlib.decompressobj(16 + zlib.MAX_WBITS), False
        else:
          data = d.unconsumed_tail
          while not data and len(out) == _MAX_OUT:  # output was capped: drain what zlib holds
            out = d.decompress(b"", _MAX_OUT)
            if out:
              yield out
      data = f.read(CHUNK_BYTES)
  except zlib.error as e:
    raise StreamError("corrupt", f"corrupt gzip data: {e}") from None
  if in_member:
    raise StreamError("truncated", "gzip stream ends without its end-of-stream marker")


def _unzstd(first: bytes, f) -> Iterator[bytes]:
  import zstandard  # pylint: disable=g-import-not-at-top

  # Frame by frame with decompressobj: zstandard's stream_reader returns a silently short stream for
  # a truncated file, while a frame that never reaches `eof` here is a truncation we can report.
  dctx = zstandard.ZstdDecompressor()
  obj = dctx.decompressobj()
  in_frame = False
  data = first
  try:
    while data:
      while data:
        in_frame = True
        out = obj.decompress(data)
        if out:
          yield out
        if obj.eof:
          data, obj, in_frame = obj.unused_data, dctx.decompressobj(), False
        else:
          data = b""
      data = f.read(CHUNK_BYTES)
  except zstandard.ZstdError as e:
    raise StreamError("corrupt", f"corrupt zstd data: {e}") from None
  if in_frame:
    raise StreamError("truncated", "zstd stream ends inside a frame")


def sniff(chunks: Iterator[bytes]) -> tuple[Iterator[bytes], bytes]:
  """(the same byte stream, its first >= SNIFF_BYTES bytes); a stream error while sniffing is
  deferred to the consumer so that it is reported where it happens."""
  head: list[bytes] = []
  size = 0
  error: StreamError | None = None
  try:
    while size < SNIFF_BYTES:
      chunk = next(chunks, b"")
      if not chunk:
        break
      head.append(chunk)
      size += len(chunk)
  except StreamError as e:
    error = e

  def stream() -> Iterator[bytes]:
    yield from head
    if error is not None:
      raise error
    yield from chunks

  return stream(), b"".join(head)[:SNIFF_BYTES]


def looks_binary(head: bytes) -> str:
  """Why `head` looks like binary data, or "" if it looks like text."""
  if b"\x00" in head:
    return f"NUL byte at offset {head.index(0)}"
  text = head.decode("utf-8", errors="replace")
  if len(head) == SNIFF_BYTES:  # a multi-byte character may be cut at the sniff boundary
    text = text[:-1]
  bad = text.count("\ufffd") / max(1, len(text))
  return f"{bad:.0%} of the first bytes are not UTF-8" if bad > _BINARY_BAD_FRACTION else ""


def lines(chunks: Iterator[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
  """(1-based line number, line without "\\n") pairs; None for a line over `max_bytes`, whose bytes
  are skipped as they stream by, so a 50 MB line never sits in memory."""
  parts: list[bytes] = []
  size = 0
  too_long = False
  line_no = 0
  for chunk in chunks:
    start = 0
    while True:
      nl = chunk.find(b"\n", start)
      end = len(chunk) if nl < 0 else nl
      if not too_long:
        if size + end - start > max_bytes:
          too_long, parts, size = True, [], 0
        elif nl < 0:
          if start < end:
            parts.append(chunk[start:end])
            size += end - start
        else:
          piece = chunk[start:end]
          line = b"".join(parts) + piece if parts else piece
      if nl < 0:
        break
      line_no += 1
      yield line_no, None if too_long else line
      parts, size, too_long = [], 0, False
      start = nl + 1
  if parts or too_long:
    yield line_no + 1, None if too_long else b"".join(parts)
