"""Read stage of curation: one input file (WARC/WET, JSON lines, Parquet, plain text) -> `Doc`s.

Library module, no entry point; the curation workers call it once per input file:

  def on_drop(reason: str, where: str) -> None: ...   # where = "<path>:line 12", "<path>:byte 865"
  for doc in iter_file(Path("crawl/CC-MAIN-0001.warc.gz"), "web", on_drop):
    ...

Unlike `data.readers` (which refuses a bad file outright), malformed input never aborts a run: each
bad record is reported once through `on_drop(reason, where)` and logged (the first few per file and
reason; then a count), and reading goes on. Every record read is either yielded or dropped, so
`in = yielded + dropped` for each file. Drop reasons:

  invalid_utf8   a JSON line / text file that is not UTF-8
  bad_json       a line that is not JSON;            not_object   JSON that is not an object
  no_text        record without a string `text`;     empty_text   text empty or whitespace-only
  line_too_long  a JSON line over `max_record_bytes` (streamed past, never held whole)
  too_long       a text file / WARC record over `max_record_bytes`
  truncated      a gzip/zstd stream (or WARC) cut short: the records before the cut are kept, the
                 rest is one drop;  corrupt: undecodable compressed data / unreadable Parquet, ditto
  binary         a file whose first 8000 bytes hold a NUL or are mostly not UTF-8 (one drop per file)
  empty_file     a file with no bytes (or no records) at all;  not_warc: a .warc without a WARC header
  not_html       an HTTP response whose Content-Type is not HTML (images, PDFs, ...)
  http_3xx, http_4xx, http_5xx   a response whose status is not 2xx (redirect and error pages)
  bad_http       a response without a parsable status line, or with a body that fails to decode
                 (bad gzip Content-Encoding, bad chunking)
  no_text_column a Parquet file without a string/binary `text` column (one drop per file)

Formats (`detect_format`, by suffix; compression by magic bytes, so a gzip file named .jsonl works):
  * WARC/WET (`.warc`, `.wet`, `.warc.gz`, `.wet.gz`, `.zst` too), parsed by FastWARC. Documents are
    `response` records (HTTP; HTML bodies become `Doc.html`, decoded by the HTTP charset, else the
    `<meta>` charset, else UTF-8, else cp1252) and `conversion` records (WET plain text, `Doc.text`).
    Other record types (warcinfo, request, metadata, resource, revisit) are not documents and are
    skipped without a count. id = WARC-Record-ID, url = WARC-Target-URI.
  * JSON lines (`.jsonl`, `.json`, `.ndjson`): `text` required; `id`, `url` optional (`url` falls back
    to `metadata.url`, as CCNet and Dolma store it); the other fields' scalar values (and the scalar
    values of a nested `metadata` dict) go to `meta["source_meta"]`. Blank lines are not records.
  * Parquet: `text` column (string, or binary holding UTF-8), `id`/`url` optional.
  * anything else (`.txt`, `.md`, ...): the whole file is one document, id = the file name.

Ids are stable and unique within a file: the record's own id, else "<file name>:<line>" (JSON lines),
"<file name>:<row>" (Parquet); a repeated id gets "#2", "#3", ... appended. Byte offsets in `where`
are 0-based and, for a compressed file, count bytes of the decompressed stream.
Decompression and line splitting live in `data.curate.streams`, WARC parsing in `data.curate.warc`.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from data.curate.base import Doc, host_of
from data.curate.streams import StreamError, lines, looks_binary, sniff
from data.curate.streams import chunks as byte_chunks
from data.curate.warc import read_warc
from data.errors import DataError

log = logging.getLogger(__name__)

# One JSON line / text file / WARC record above this is dropped: 10 MiB is 10x the 1 MiB at which
# Common Crawl truncates its fetches, so only junk (inline blobs, dumps) reaches it.
MAX_RECORD_BYTES = 10 << 20
# Drops logged per (file, reason) before the rest are only counted in one summary line.
_LOG_PER_REASON = 5

WARC_SUFFIXES = (".warc", ".wet")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".zst")
# An escaped UTF-16 surrogate in a JSON line; only then can json.loads return lone surrogates.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# meta["source_meta"] keeps scalar fields only, and strings up to this length (titles, dates, scores).
_META_STR_CHARS = 512


def detect_format(path: str | Path) -> str:
  """"warc", "jsonl", "parquet" or "text", from the name with any .gz/.zst suffix removed."""
  name = Path(path).name.lower()
  for c in COMPRESSED_SUFFIXES:
    if name.endswith(c):
      name = name[: -len(c)]
      break
  if name.endswith(WARC_SUFFIXES):
    return "warc"
  if name.endswith(JSONL_SUFFIXES):
    return "jsonl"
  if name.endswith(".parquet"):
    return "parquet"
  return "text"


def iter_file(path: Path, domain: str, on_drop: Callable[[str, str], None], *,
              max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[Doc]:
  """Yields the documents of one file; reports each unreadable record via `on_drop(reason, where)`.

  A missing path or one that is not a regular file is a configuration error: DataError.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: no such file")
  if max_record_bytes <= 0:
    raise DataError(f"read: max_record_bytes must be > 0, got {max_record_bytes}")
  drops = _Drops(path, on_drop)
  ids = _UniqueIds()
  try:
    if path.stat().st_size == 0:
      drops("empty_file", f"{path}:byte 0", "file has no bytes")
      return
    fmt = detect_format(path)
    if fmt == "parquet":
      docs = _read_parquet(path, domain, drops)
    else:
      chunks, head = sniff(byte_chunks(path))
      if not head:
        try:
          for _ in chunks:  # raises the stream error, if any, that left nothing to read
            pass
        except StreamError as e:
          drops(e.reason, f"{path}:byte 0", f"{e}; nothing decodes before it")
          return
        drops("empty_file", f"{path}:byte 0", "file is empty after decompression")
        return
      if fmt == "warc":
        if not head.lstrip().startswith(b"WARC/"):
          drops("not_warc", f"{path}:byte 0", f"starts with {head[:16]!r}, not 'WARC/'")
          return
        docs = read_warc(path, domain, chunks, drops, max_record_bytes)
      else:
        why = looks_binary(head)
        if why:
          drops("binary", f"{path}:byte 0", why)
          return
        reader = _read_jsonl if fmt == "jsonl" else _read_text
        docs = reader(path, domain, chunks, drops, max_record_bytes)
    for doc in docs:
      doc.id = ids(doc.id)
      yield doc
  except OSError as e:  # the file itself cannot be read (permissions, I/O error): not a data problem
    raise DataError(f"{path}: cannot read: {e}") from None
  finally:
    drops.summarize()


# --- drop reporting, ids ----------------------------------------------------------------------------

class _Drops:
  """Calls on_drop for every drop; logs the first few per reason, then one summary line per file."""

  def __init__(self, path: Path, on_drop: Callable[[str, str], None]):
    self.path, self.on_drop, self.n = path, on_drop, Counter()

  def __call__(self, reason: str, where: str, detail: str = "") -> None:
    self.on_drop(reason, where)
    self.n[reason] += 1
    if self.n[reason] <= _LOG_PER_REASON:
      log.warning("read: dropped %s (%s)%s", where, reason, f": {detail}" if detail else "")

  def summarize(self) -> None:
    for reason, n in sorted(self.n.items()):
      if n > _LOG_PER_REASON:
        log.warning("read: %s: %d more %s drops not logged one by one (%d in all)",
                    self.path, n - _LOG_PER_REASON, reason, n)


class _UniqueIds:
  """Repeated ids get "#2", "#3", ...; the next suffix per id is remembered, so a file whose every
  record carries the same id costs O(n), not O(n^2)."""

  def __init__(self):
    self.seen: set[str] = set()
    self.next: dict[str, int] = {}

  def __call__(self, doc_id: str) -> str:
    if doc_id in self.seen:
      k = self.next.get(doc_id, 1)
      while f"{doc_id}#{k}" in self.seen or k == 1:
        k += 1
      self.next[doc_id] = k + 1
      doc_id = f"{doc_id}#{k}"
    self.seen.add(doc_id)
    return doc_id


# --- JSON lines -------------------------------------------------------------------------------------

def _read_jsonl(path: Path, domain: str, chunks: Iterator[bytes], drops: _Drops,
                max_bytes: int) -> Iterator[Doc]:
  name, source = path.name, str(path)
  line_no = 0
  records = 0
  try:
    for line_no, line in lines(chunks, max_bytes):
      where = f"{path}:line {line_no}"
      if line is None:
        records += 1
        drops("line_too_long", where, f"line longer than {max_bytes} bytes")
        continue
      if not line or line.isspace():
        continue
      records += 1
      try:
        s = line.decode("utf-8")
      except UnicodeDecodeError as e:
        drops("invalid_utf8", where, f"byte {e.start} of the line: {e.reason}")
        continue
      if line_no == 1 and s.startswith("\ufeff"):
        s = s[1:]
      try:
        rec = json.loads(s)
      except ValueError as e:
        drops("bad_json", where, str(e))
        continue
      if not isinstance(rec, dict):
        drops("not_object", where, f"a JSON {type(rec).__name__}, not an object")
        continue
      if _SURROGATE_ESCAPE.search(line):
        rec = _fix_surrogates(rec)  # lone "\ud800" escapes would make the record unwritable as UTF-8
      text = rec.get("text")
      if not isinstance(text, str):
        drops("no_text", where, "no string 'text' field" if text is None else
              f"'text' is a {type(text).__name__}")
        continue
      if not text.strip():
        drops("empty_text", where)
        continue
      doc_id = rec.get("id")
      url = rec.get("url")
      metadata = rec.get("metadata")
      if not url and isinstance(metadata, dict):
        url = metadata.get("url")
      url = url if isinstance(url, str) else ""
      meta = _source_meta(rec)
      yield Doc(id=f"{name}:{line_no}" if doc_id is None or doc_id == "" else str(doc_id),
                text=text, domain=domain, url=url, host=host_of(url), source=source,
                meta={"source_meta": meta} if meta else {})
  except StreamError as e:
    records += 1
    drops(e.reason, f"{path}:line {line_no + 1}", f"{e}; the {line_no} lines before are kept")
  if records == 0:
    drops("empty_file", f"{path}:byte 0", "no JSON records (only blank lines)")


def _fix_surrogates(obj: Any) -> Any:
  if isinstance(obj, str):
    return _LONE_SURROGATE.sub("\ufffd", obj)
  if isinstance(obj, dict):
    return {_fix_surrogates(k): _fix_surrogates(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_fix_surrogates(v) for v in obj]
  return obj


def _scalar(v: Any) -> bool:
  return v is None or isinstance(v, (bool, int, float)) or (
      isinstance(v, str) and len(v) <= _META_STR_CHARS)


def _source_meta(rec: dict) -> dict:
  """The record's small scalar fields (and a nested dict's), e.g. CCNet's language_score, title."""
  out: dict[str, Any] = {}
  for k, v in rec.items():
    if k in ("text", "id", "url"):
      continue
    if isinstance(v, dict):
      sub = {sk: sv for sk, sv in v.items() if _scalar(sv)}
      if sub:
        out[k] = sub
    elif _scalar(v):
      out[k] = v
  return out


# --- plain text -------------------------------------------------------------------------------------

def _read_text(path: Path, domain: str, chunks: Iterator[bytes], drops: _Drops,
               max_bytes: int) -> Iterator[Doc]:
  where = f"{path}:byte 0"
  parts: list[bytes] = []
  size = 0
  try:
    for chunk in chunks:
      size += len(chunk)
      if size > max_bytes:
        drops("too_long", where, f"text file longer than {max_bytes} bytes")
        return
      parts.append(chunk)
  except StreamError as e:
    drops(e.reason, f"{path}:byte {size}", str(e))
    return
  data = b"".join(parts)
  del parts
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    drops("invalid_utf8", f"{path}:byte {e.start}", e.reason)
    return
  text = text.removeprefix("\ufeff")
  if not text.strip():
    drops("empty_text", where)
    return
  yield Doc(id=path.name, text=text, domain=domain, source=str(path))


# --- Parquet ----------------------------------------------------------------------------------------

# Rows per record batch: 1024 documents of ~4 KB is ~4 MB resident.
_PARQUET_BATCH_ROWS = 1024


def _read_parquet(path: Path, domain: str, drops: _Drops) -> Iterator[Doc]:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  name, source = path.name, str(path)
  try:
    pf = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    drops("corrupt", f"{path}:row 0", f"unreadable Parquet file: {e}")
    return
  schema = pf.schema_arrow
  text_type = schema.field("text").type if "text" in schema.names else None
  binary = text_type is not None and (pa.types.is_binary(text_type)
                                      or pa.types.is_large_binary(text_type))
  if text_type is None or not (binary or pa.types.is_string(text_type)
                               or pa.types.is_large_string(text_type)):
    drops("no_text_column", f"{path}:row 0",
          f"no string 'text' column (columns: {schema.names[:8]}, text type: {text_type})")
    return
  columns = [c for c in ("text", "id", "url") if c in schema.names]
  row = 0
  try:
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
      cols = {c: batch.column(c).to_pylist() for c in columns}
      for i, text in enumerate(cols["text"]):
        r = row + i
        where = f"{path}:row {r}"
        if text is None:
          drops("no_text", where, "text is null")
          continue
        if binary:
          try:
            text = text.decode("utf-8")
          except UnicodeDecodeError as e:
            drops("invalid_utf8", where, f"byte {e.start}: {e.reason}")
            continue
        if not text.strip():
          drops("empty_text", where)
          continue
        doc_id = cols["id"][i] if "id" in cols else None
        url = cols["url"][i] if "url" in cols else None
        url = url if isinstance(url, str) else ""
        yield Doc(id=f"{name}:{r}" if doc_id is None or doc_id == "" else str(doc_id), text=text,
                  domain=domain, url=url, host=host_of(url), source=source)
      row += batch.num_rows
  except (pa.ArrowException, OSError) as e:
    drops("corrupt", f"{path}:row {row}", f"corrupt Parquet data: {e}; the {row} rows before are kept")
  if row == 0 and not drops.n:
    drops("empty_file", f"{path}:row 0", "Parquet file has no rows")
