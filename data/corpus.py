"""The embedded default corpus: the running interpreter's standard library, as code and as prose.

No download: `build_stdlib_corpus(cache_dir)` reads the `.py` files under
`sysconfig.get_paths()["stdlib"]` and writes, into a cached directory,

  code.jsonl   one document per stdlib source file (id `code:<relpath>`)
  prose.jsonl  one document per topic of the bundled language reference (`pydoc_data/topics.py`,
               id `topic:<name>`), plus one per module holding its module/class/function docstrings,
               extracted with `ast` (nothing is imported or executed; id `doc:<relpath>`)
  corpus.json  {"python_version", "content_sha256", "domains": {"code": {"docs", "chars"}, "prose":
               {...}}, "files", "dropped": {"too_large", "not_utf8", "empty"}, ...}; files = code
               docs + sum(dropped) + 1 (topics.py, prose only)

Excluded: `site-packages`/`dist-packages`, `test`/`tests`/`idle_test` directories (they hold deliberately
odd code, e.g. bad encodings, and would dominate: ~60% of the stdlib's bytes), files over 1 MB (generated
tables), and `pydoc_data/topics.py` itself from `code` (it is the prose, as one 0.75 MB dict literal).

Python 3.11 gives ~730 files, ~12 MB of code and ~3 MB of prose; the build takes ~3 s (1.4 s of it
`ast.parse`). The directory name holds the Python version and the content hash, so a repeat call only
lists and hashes the files (~0.1 s). Library module, no entry point; `data.prepare` calls it.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import shutil
import sysconfig
import tempfile
from pathlib import Path

# Bump when the output format or the extraction rules change, so old caches are not reused.
CORPUS_VERSION = 1
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
# Above 1 MB a stdlib file is generated data, not code anyone writes (none qualify in 3.11's
# non-test stdlib, but vendored tables do appear in other builds).
MAX_FILE_BYTES = 1_000_000
_TOPICS_FILE = "pydoc_data/topics.py"


def stdlib_dir() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: Path) -> list[str]:
  """Relative paths (POSIX, sorted) of the `.py` files the corpus is built from."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Prune in place: the stdlib's site-packages can be 1 GB and must never be walked.
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    rel = Path(dirpath).relative_to(root)
    out.extend((rel / f).as_posix() for f in filenames if f.endswith(".py"))
  return sorted(out)


def content_sha256(root: Path, relpaths: list[str]) -> str:
  """Hash of (builder version, each relpath and its bytes) in sorted path order."""
  h = hashlib.sha256(f"stdlib-corpus-v{CORPUS_VERSION}\0".encode())
  for rel in relpaths:
    data = (root / rel).read_bytes()
    h.update(f"{rel}\0{len(data)}\0".encode())
    h.update(data)
  return h.hexdigest()


def module_docstrings(source: str, module: str) -> str:
  """The module's docstrings as prose: a header line per documented object, then its docstring.

  Raises SyntaxError if the source does not parse.
  """
  tree = ast.parse(source)
  parts = []
  doc = ast.get_docstring(tree, clean=True)
  if doc:
    parts.append(f"Module {module}\n\n{doc}")

  def visit(node: ast.AST, prefix: str) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        name = f"{prefix}{child.name}"
        doc = ast.get_docstring(child, clean=True)
        if doc:
          if isinstance(child, ast.ClassDef):
            header = f"class {name}"
          else:
            header = f"def {name}({ast.unparse(child.args)})"
          parts.append(f"{header}\n\n{doc}")
        visit(child, f"{name}.")

  visit(tree, f"{module}.")
  return "\n\n".join(parts)


def read_topics(path: Path) -> dict[str, str]:
  """`topics` from pydoc_data/topics.py, evaluated as a literal (the module is never imported)."""
  tree = ast.parse(path.read_bytes())
  for node in tree.body:
    if (isinstance(node, ast.Assign) and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "topics"):
      topics = ast.literal_eval(node.value)
      return {str(k): str(v) for k, v in topics.items()}
  return {}


def build_stdlib_corpus(cache_dir: str | Path, *, root: str | Path | None = None) -> Path:
  """Builds (or finds cached) the stdlib corpus under `cache_dir`; returns its directory.

  `root` defaults to the running interpreter's stdlib; tests pass a small fake tree.
  """
  root = Path(root) if root is not None else stdlib_dir()
  cache_dir = Path(cache_dir)
  relpaths = list_source_files(root)
  digest = content_sha256(root, relpaths)
  out = cache_dir / f"stdlib-py{platform.python_version()}-{digest[:16]}"
  if (out / "corpus.json").is_file():
    return out

  cache_dir.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=cache_dir))
  os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a shared cache must stay readable by others
  try:
    meta = _write_corpus(root, relpaths, digest, tmp)
    (tmp / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
      os.rename(tmp, out)  # atomic: readers see no directory or a complete one
    except OSError:
      if not (out / "corpus.json").is_file():  # not a concurrent builder winning the race
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def _write_corpus(root: Path, relpaths: list[str], digest: str, out: Path) -> dict:
  # Source files not in `code`, by reason; files = code docs + sum(dropped) (+1 for topics.py).
  dropped = {"too_large": 0, "not_utf8": 0, "empty": 0}
  unparsable = 0  # kept as code, but no docstrings: ast can't parse them (e.g. Python 2 syntax)
  stats = {"code": {"docs": 0, "chars": 0}, "prose": {"docs": 0, "chars": 0}}

  def write(f, domain: str, doc_id: str, text: str, url: str) -> None:
    f.write(json.dumps({"id": doc_id, "text": text, "url": url}, ensure_ascii=False) + "\n")
    stats[domain]["docs"] += 1
    stats[domain]["chars"] += len(text)

  with open(out / "code.jsonl", "w", encoding="utf-8") as code, \
       open(out / "prose.jsonl", "w", encoding="utf-8") as prose:
    if (root / _TOPICS_FILE).is_file():
      for name, text in sorted(read_topics(root / _TOPICS_FILE).items()):
        if text.strip():
          write(prose, "prose", f"topic:{name}", text, f"python-docs/reference/{name}")
    for rel in relpaths:
      path = root / rel
      if rel == _TOPICS_FILE:
        continue
      if path.stat().st_size > MAX_FILE_BYTES:
        dropped["too_large"] += 1
        continue
      try:
        source = path.read_bytes().decode("utf-8")
      except UnicodeDecodeError:
        dropped["not_utf8"] += 1
        continue
      if not source.strip():  # empty __init__.py files
        dropped["empty"] += 1
        continue
      url = f"python-stdlib/{rel}"
      write(code, "code", f"code:{rel}", source, url)
      module = rel[:-3].replace("/", ".").removesuffix(".__init__")
      try:
        docs = module_docstrings(source, module)
      except (SyntaxError, ValueError):
        unparsable += 1
        continue
      if docs:
        write(prose, "prose", f"doc:{rel}", docs, url)
  return {
      "corpus_version": CORPUS_VERSION,
      "python_version": platform.python_version(),
      "stdlib": str(root),
      "files": len(relpaths),
      "content_sha256": digest,
      "domains": stats,
      "dropped": dropped,
      "docstrings_unparsable": unparsable,
  }
