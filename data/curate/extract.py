"""Extract stage (`extract`): HTML -> main-content plain text, with a real per-document time limit.

Registered per-document stage; the pipeline config lists it right after reading WARC input:

  stages.extract.timeout_s=5.0   stages.extract.max_html_chars=2000000   stages.extract.alt_texts=False

A doc with `html` gets `text` = Resiliparse's main-content extraction
(`resiliparse.extract.html2text.extract_plain_text(html, main_content=True, ...)`, the extractor DCLM
uses) and `html` cleared; a doc without `html` (JSONL, WET, text) passes through unchanged. Drop
reasons: "empty" (nothing extracted), "timeout", "html_too_large", "error" (the extractor raised),
"crashed" (the extraction process died, e.g. a segfault or the OOM killer).

Time limit: Resiliparse is native code, so neither a signal nor a thread can stop it reliably. Each
stage instance therefore runs the extractor in one long-lived child process (started on the first
HTML doc, reused for every doc after it) and waits for the answer with a deadline; on a timeout the
child is killed and the next doc starts a fresh one (~0.15 s). The round trip through the pipes
costs ~0.05 ms per doc (45 KB of HTML in, 2 KB of text out, with a no-op extractor) against ~1-2 ms
for Resiliparse on a typical page of the Common Crawl samples in ../shared/data/web (~900 docs/s,
40 MB/s of HTML, one core; `python -m pytest -q -s tests/test_curate_extract.py -k overhead`).
A page near the limit may time out on a loaded machine and not on an idle one; at 5 s, ~2,500x the
median extraction time, only pathological pages get there.

`extractor` picks the function: "resiliparse" or "package.module:function" (any importable
`fn(html: str, **options) -> str`; the tests inject a slow one this way).
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from data.curate.base import Doc, Stage, register
from data.errors import DataError

log = logging.getLogger(__name__)

# Options passed through to the extractor function (Resiliparse's names).
_EXTRACTOR_OPTIONS = ("main_content", "alt_texts", "links", "list_bullets", "preserve_formatting",
                      "comments")
# Frame header: status byte (parent->child always 0) + payload length.
_HEADER = struct.Struct(">BI")
_OK, _ERROR = 0, 1
# Starting a child (interpreter + numpy + resiliparse import) takes ~0.15 s idle; 60 s leaves room for
# a machine whose CPUs are all busy, and a start that slow is an environment problem, not a doc's.
_START_TIMEOUT_S = 60.0


def resiliparse_text(html: str, **options: Any) -> str:
  from resiliparse.extract.html2text import extract_plain_text  # pylint: disable=g-import-not-at-top
  return extract_plain_text(html, **options)


EXTRACTORS = {"resiliparse": "data.curate.extract:resiliparse_text"}


def _resolve(name: str) -> Callable[..., str]:
  target = EXTRACTORS.get(name, name)
  module, sep, attr = target.partition(":")
  if not sep or not module or not attr:
    raise DataError(f"stage 'extract': extractor {name!r} is neither one of {sorted(EXTRACTORS)} "
                    "nor 'package.module:function'")
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise DataError(f"stage 'extract': cannot load extractor {name!r}: {e}") from None
  if not callable(fn):
    raise DataError(f"stage 'extract': extractor {name!r} is not callable")
  return fn


class ExtractTimeout(Exception):
  pass


class ExtractCrashed(Exception):
  pass


class ExtractFailed(Exception):
  pass


class Sandbox:
  """One child process running `extractor(html, **options)` per request, with a deadline each."""

  def __init__(self, extractor: str, options: dict[str, Any]):
    self.spec = {"extractor": extractor, "options": options}
    self.proc: subprocess.Popen | None = None
    self.owner = 0
    self.starts = 0

  def _start(self) -> None:
    env = dict(os.environ)
    # The child must import what this process imports (the repo, a test's module directory).
    env["PYTHONPATH"] = os.pathsep.join([p or os.getcwd() for p in sys.path])
    self.proc = subprocess.Popen(
        [sys.executable, "-c", "from data.curate.extract import child_main; child_main()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
    self.owner = os.getpid()
    self.starts += 1
    try:
      status, payload = self._call(json.dumps(self.spec), _START_TIMEOUT_S)
    except (ExtractTimeout, ExtractCrashed):
      self.close()
      raise DataError(f"stage 'extract': extraction process did not start within "
                      f"{_START_TIMEOUT_S:.0f} s") from None
    if status != _OK:
      self.close()
      raise DataError(f"stage 'extract': extraction process failed to start: {payload}")

  def extract(self, html: str, timeout_s: float) -> str:
    if self.proc is None or self.owner != os.getpid():  # after a fork the pipe is not ours
      self.proc = None
      self._start()
    try:
      status, payload = self._call(html, timeout_s)
    except (ExtractTimeout, ExtractCrashed):
      self.close()
      raise
    if status != _OK:
      raise ExtractFailed(payload)
    return payload

  def _call(self, message: str, timeout_s: float) -> tuple[int, str]:
    deadline = time.monotonic() + timeout_s
    data = message.encode("utf-8", errors="surrogatepass")
    try:
      self.proc.stdin.write(_HEADER.pack(0, len(data)) + data)
      self.proc.stdin.flush()
    except (BrokenPipeError, OSError):
      raise ExtractCrashed("extraction process is gone") from None
    fd = self.proc.stdout.fileno()
    status, length = _HEADER.unpack(self._read(fd, _HEADER.size, deadline))
    return status, self._read(fd, length, deadline).decode("utf-8", errors="surrogatepass")

  def _read(self, fd: int, n: int, deadline: float) -> bytes:
    parts, got = [], 0
    while got < n:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([fd], [], [], left)[0]:
        raise ExtractTimeout()
      part = os.read(fd, min(n - got, 1 << 20))
      if not part:
        raise ExtractCrashed(f"extraction process exited (code {self.proc.poll()})")
      parts.append(part)
      got += len(part)
    return b"".join(parts)

  def close(self) -> None:
    proc, self.proc = self.proc, None
    if proc is None or self.owner != os.getpid():
      return
    if proc.poll() is None:
      proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout):
      try:
        f.close()
      except OSError:
        pass


def child_main() -> None:
  """The extraction process: frames in on stdin, frames out on the original stdout."""
  out = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)  # stray prints from libraries must not corrupt the frames
  # The parent's exit closes our stdin, which ends the loop below; this watchdog also covers a parent
  # killed while we are busy (prctl's PR_SET_PDEATHSIG would fire when the parent *thread* ends).
  parent = os.getppid()

  def watchdog() -> None:
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)

  threading.Thread(target=watchdog, daemon=True).start()
  inp = sys.stdin.buffer

  def recv() -> str | None:
    header = inp.read(_HEADER.size)
    if len(header) < _HEADER.size:
      return None
    return inp.read(_HEADER.unpack(header)[1]).decode("utf-8", errors="surrogatepass")

  def send(status: int, text: str) -> None:
    data = text.encode("utf-8", errors="surrogatepass")
    out.write(_HEADER.pack(status, len(data)) + data)
    out.flush()

  spec = json.loads(recv() or "{}")
  try:
    fn = _resolve(spec["extractor"])
    options = spec["options"]
    fn("<html><body><p>warm up</p></body></html>", **options)  # first-call setup off the clock
  except Exception as e:  # pylint: disable=broad-except
    send(_ERROR, f"{type(e).__name__}: {e}")
    return
  send(_OK, "ready")
  while (html := recv()) is not None:
    try:
      send(_OK, fn(html, **options))
    except Exception as e:  # pylint: disable=broad-except
      send(_ERROR, f"{type(e).__name__}: {e}")


@register
class Extract(Stage):
  """HTML -> main text in a time-limited child process; see the module docstring."""
  name = "extract"
  defaults: ClassVar[dict[str, Any]] = {
      "timeout_s": 5.0,
      # Common Crawl truncates fetches at 1 MiB, so its pages never reach 2M characters; pages that do
      # are inline data blobs, and parsing them would cost more than their text is worth.
      "max_html_chars": 2_000_000,
      "extractor": "resiliparse",
      "main_content": True,
      # Image alt texts are labels ("profile.jpg", "logo"), not prose; links/forms are navigation.
      "alt_texts": False,
      "links": False,
      "list_bullets": True,
      "preserve_formatting": True,  # keep paragraph breaks: line-level filters (C4, FineWeb) need them
      "comments": True,             # user comments are text too; quality filters judge them later
  }

  def __init__(self, **config: Any):
    super().__init__(**config)
    c = self.config
    if not float(c["timeout_s"]) > 0:
      raise DataError(f"stage 'extract': timeout_s must be > 0, got {c['timeout_s']}")
    if int(c["max_html_chars"]) <= 0:
      raise DataError(f"stage 'extract': max_html_chars must be > 0, got {c['max_html_chars']}")
    _resolve(c["extractor"])  # fail on a bad name now, not in a worker later
    self._sandbox: Sandbox | None = None
    self._warned = False

  def __getstate__(self) -> dict:  # picklable for Ray: the child process stays behind
    state = dict(self.__dict__)
    state["_sandbox"] = None
    return state

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  (interpreter shutdown: modules half gone)
      pass

  def close(self) -> None:
    if getattr(self, "_sandbox", None) is not None:
      self._sandbox.close()

  def process(self, doc: Doc) -> Doc | str:
    if not doc.html:
      return doc
    if len(doc.html) > self.config["max_html_chars"]:
      return "html_too_large"
    if self._sandbox is None:
      self._sandbox = Sandbox(self.config["extractor"],
                              {k: self.config[k] for k in _EXTRACTOR_OPTIONS})
    starts = self._sandbox.starts
    try:
      text = self._sandbox.extract(doc.html, float(self.config["timeout_s"]))
    except ExtractTimeout:
      return "timeout"
    except ExtractCrashed:
      return "crashed"
    except ExtractFailed as e:
      if not self._warned:  # once per worker: the count in the report says how often
        self._warned = True
        log.warning("extract: %s failed: %s", doc.id, e)
      return "error"
    finally:
      if starts and self._sandbox.starts > starts:  # a fresh child after a timeout or crash
        self.counts["process_restarts"] += 1
    text = text.strip()
    if not text:
      return "empty"
    doc.text = text
    doc.html = ""
    return doc
