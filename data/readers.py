"""Document readers: plain text, JSON lines (optionally gzip/zstd), Parquet -> `Document`s.

Library module, used by `data.shards` and `data.prepare`; no entry point. Usage:

  stats = ReadStats()
  for path in expand_paths("corpus/**/*.jsonl.zst"):
    for doc in iter_documents(path, stats):
      ...
  print(stats.read, stats.empty)   # read = kept + empty

Formats, chosen by suffix (a trailing `.gz`/`.zst` means compressed, the suffix before it the format):
  * `.jsonl`, `.json` (JSON lines, one object per line): `text` required (a string), `id` optional
    (default `"{path}:{line_no}"`, line numbers 1-based), `url` optional (becomes `Document.source`,
    default the file path). Blank lines are ignored.
  * `.parquet`: column `text` required, `id`/`url` optional, read in record batches of 1024 rows so
    memory stays bounded by one batch whatever the file size.
  * anything else (`.txt`, `.md`, `.rst`, `.py`, ...): the whole file is one UTF-8 document, newlines
    kept byte-exact (`\\r\\n` is not translated).

Documents whose text is empty or whitespace-only are skipped and counted in `ReadStats.empty`. Every
bad input (missing file, empty file, bad gzip/zstd, malformed JSON line, missing `text`, non-UTF-8,
Parquet without `text`) raises `DataError` naming the file and, for JSON lines, the line.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from data.errors import DataError

# Suffixes picked up when a directory is expanded; single files and glob matches may have any suffix
# (unknown ones are read as plain text).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl", ".json")
COMPRESSED_SUFFIXES = (".gz", ".zst")
SUPPORTED_SUFFIXES = (
    TEXT_SUFFIXES + JSONL_SUFFIXES + (".parquet",)
    + tuple(j + c for j in JSONL_SUFFIXES for c in COMPRESSED_SUFFIXES))

# 1 MiB reads: big enough that per-call overhead vanishes, small enough to keep memory flat.
_CHUNK_BYTES = 1 << 20
# Parquet rows per record batch: 1024 documents of ~4 KB is ~4 MB resident.
_PARQUET_BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class Document:
  id: str
  text: str
  source: str  # file path, or the record's `url` when it has one


@dataclasses.dataclass
class ReadStats:
  """Counts filled in by `iter_documents`; `read == kept + empty` always holds."""
  files: int = 0
  read: int = 0   # documents seen, empty ones included
  empty: int = 0  # skipped: text empty or whitespace-only

  @property
  def kept(self) -> int:
    return self.read - self.empty


def _is_supported(path: Path) -> bool:
  return path.name.endswith(SUPPORTED_SUFFIXES)


def expand_paths(spec: str | Path) -> list[Path]:
  """One glob, directory or file -> sorted list of files; DataError if nothing matches.

  A directory expands recursively to every non-hidden file with a supported suffix
  (SUPPORTED_SUFFIXES); a glob (`*`, `?`, `[`; `**` recurses) to every matching file, and matching
  directories as above.
  """
  spec = os.path.expanduser(str(spec))
  if not spec:
    raise DataError("empty path spec")
  if any(c in spec for c in "*?["):
    matches = sorted(glob.glob(spec, recursive=True))
    files: list[Path] = []
    for m in matches:
      p = Path(m)
      files.extend(_expand_dir(p) if p.is_dir() else [p] if p.is_file() else [])
    if not files:
      raise DataError(f"{spec}: glob matches no files")
    return sorted(set(files))
  path = Path(spec)
  if path.is_dir():
    files = _expand_dir(path)
    if not files:
      raise DataError(f"{path}: directory holds no supported files ({', '.join(SUPPORTED_SUFFIXES)})")
    return files
  if path.is_file():
    return [path]
  raise DataError(f"{path}: no such file or directory")


def _expand_dir(path: Path) -> list[Path]:
  # Hidden entries (.git, editor swap files, our own .tmp- build dirs) are skipped, as glob does.
  return sorted(p for p in path.rglob("*")
                if p.is_file() and _is_supported(p)
                and not any(part.startswith(".") for part in p.relative_to(path).parts))


def iter_documents(path: str | Path, stats: ReadStats | None = None) -> Iterator[Document]:
  """Yields the non-empty documents of one file; counts into `stats` if given."""
  path = Path(path)
  stats = stats if stats is not None else ReadStats()
  if not path.is_file():
    raise DataError(f"{path}: no such file")
  if path.stat().st_size == 0:
    raise DataError(f"{path}: file is empty")
  stats.files += 1
  name = path.name
  compression = next((c for c in COMPRESSED_SUFFIXES if name.endswith(c)), "")
  inner = name[: len(name) - len(compression)]
  if inner.endswith(".parquet") and not compression:
    docs = _read_parquet(path)
  elif inner.endswith(JSONL_SUFFIXES):
    docs = _read_jsonl(path, _byte_lines(path, compression))
  else:
    docs = _read_text(path, compression)
  for doc in docs:
    stats.read += 1
    if not doc.text.strip():
      stats.empty += 1
      continue
    yield doc


# --- plain text -------------------------------------------------------------------------------------

def _read_text(path: Path, compression: str) -> Iterator[Document]:
  data = b"".join(_chunks(path, compression))
  if not data:
    raise DataError(f"{path}: file is empty after decompression")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not valid UTF-8 (byte offset {e.start}: {e.reason})") from None
  yield Document(id=str(path), text=text, source=str(path))


# --- byte streams -----------------------------------------------------------------------------------

def _chunks(path: Path, compression: str) -> Iterator[bytes]:
  """Decompressed bytes of `path` in ~1 MiB chunks; truncation/corruption -> DataError."""
  try:
    if compression == ".gz":
      with gzip.open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
          yield chunk
    elif compression == ".zst":
      yield from _zstd_chunks(path)
    else:
      with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
          yield chunk
  except DataError:
    raise
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: unreadable or corrupt {compression or 'file'}: {e}") from None


def _zstd_chunks(path: Path) -> Iterator[bytes]:
  # zstandard's stream_reader returns a silently short stream for a truncated file, so decode frame
  # by frame with decompressobj and check each frame reached its end marker.
  import zstandard  # pylint: disable=g-import-not-at-top

  dctx = zstandard.ZstdDecompressor()
  obj = dctx.decompressobj()
  in_frame = False
  try:
    with open(path, "rb") as f:
      while chunk := f.read(_CHUNK_BYTES):
        while chunk:
          in_frame = True
          out = obj.decompress(chunk)
          if out:
            yield out
          if obj.eof:  # frame done; any bytes left over start the next frame
            chunk, obj, in_frame = obj.unused_data, dctx.decompressobj(), False
          else:
            chunk = b""
  except zstandard.ZstdError as e:
    raise DataError(f"{path}: corrupt zstd data: {e}") from None
  if in_frame:
    raise DataError(f"{path}: truncated zstd data (last frame has no end marker)")


def _byte_lines(path: Path, compression: str) -> Iterator[bytes]:
  pending = b""
  for chunk in _chunks(path, compression):
    lines = (pending + chunk).split(b"\n")
    pending = lines.pop()
    yield from lines
  if pending:
    yield pending


# --- JSON lines -------------------------------------------------------------------------------------

def _read_jsonl(path: Path, lines: Iterable[bytes]) -> Iterator[Document]:
  n_records = 0
  for line_no, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f"{path}:{line_no}"
    try:
      record = json.loads(line)
    except UnicodeDecodeError as e:
      raise DataError(f"{where}: not valid UTF-8 ({e.reason})") from None
    except ValueError as e:
      raise DataError(f"{where}: malformed JSON line: {e}") from None
    if not isinstance(record, dict):
      raise DataError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    text = record.get("text")
    if text is None and "text" not in record:
      raise DataError(f"{where}: record has no 'text' field (keys: {sorted(record)[:8]})")
    if text is None:
      text = ""
    if not isinstance(text, str):
      raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    doc_id = record.get("id")
    url = record.get("url")
    n_records += 1
    yield Document(
        id=f"{path}:{line_no}" if doc_id is None else str(doc_id),
        text=text,
        source=str(url) if url else str(path))
  if n_records == 0:
    raise DataError(f"{path}: no JSON records (file has only blank lines)")


# --- Parquet ----------------------------------------------------------------------------------------

def _read_parquet(path: Path) -> Iterator[Document]:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  try:
    pf = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: unreadable Parquet file: {e}") from None
  names = pf.schema_arrow.names
  if "text" not in names:
    raise DataError(f"{path}: Parquet file has no 'text' column (columns: {names[:8]})")
  columns = [c for c in ("text", "id", "url") if c in names]
  row = 0
  try:
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
      cols = {c: batch.column(c).to_pylist() for c in columns}
      for i, text in enumerate(cols["text"]):
        if text is not None and not isinstance(text, str):
          raise DataError(f"{path}: row {row + i}: 'text' must be a string column, got "
                          f"{batch.schema.field('text').type}")
        doc_id = cols["id"][i] if "id" in cols else None
        url = cols["url"][i] if "url" in cols else None
        yield Document(id=f"{path}:{row + i}" if doc_id is None else str(doc_id),
                       text=text or "", source=str(url) if url else str(path))
      row += batch.num_rows
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: corrupt Parquet data near row {row}: {e}") from None
  if row == 0:
    raise DataError(f"{path}: Parquet file has no rows")
