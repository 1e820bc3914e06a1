"""Curation extract stage: readable main text from the real WARC pages; the time limit really fires.

Run: python -m pytest -q -p no:xdist tests/test_curate_extract.py   (-k overhead -s prints timings)
"""
import os
import pickle
import re
import time

import pytest

from conftest import require, shared_data
from data.curate.base import Doc
from data.curate.extract import Extract, resiliparse_text
from data.curate.read import iter_file
from data.errors import DataError

WARCS = ("cc_sample_0000.warc.gz", "cc_sample_0001.warc.gz", "warcio_example.warc.gz")
# Checked by hand against the pages: sentences of the main body, and the page title.
EXPECTED = {
    "http://example.com/": ["Example Domain", "This domain is established to be used for "
                            "illustrative examples in documents."],
    "https://www.cs.washington.edu/people/faculty/weld": [
        "Daniel S. Weld is Professor Emeritus at the Paul G. Allen School",
        "He landed a Ph.D. from the MIT Artificial Intelligence Lab in 1988"],
    "https://commoncrawl.org/faq": [
        "Frequently asked questions", "What is Common Crawl?",
        "Common Crawl is a 501(c)(3) non-profit organization"],
    "https://creativecommons.org/mission/": [
        "Who We Are", "Creative Commons (CC) is an international nonprofit organization"],
}
TAG = re.compile(r"</?(html|head|body|div|span|p|a|script|style|meta|link|br|li|ul|img)\b[^>]*>", re.I)
SCRIPT_OR_STYLE = re.compile(r"<(script|style)\b[^>]*>(.*?)</\1\s*>", re.I | re.S)


@pytest.fixture(scope="module")
def pages():
  docs = []
  for name in WARCS:
    path = shared_data() / "web" / name
    require(path.is_file(), f"{path} missing")
    docs.extend(iter_file(path, "web", lambda r, w: None))
  return docs


def copy(doc: Doc) -> Doc:
  return Doc.from_json(doc.to_json())


@pytest.fixture
def stage():
  s = Extract()
  yield s
  s.close()


def test_real_pages_are_readable_main_text(pages, stage):
  out = {}
  for doc in pages:
    got = stage.process(copy(doc))
    assert isinstance(got, Doc), f"{doc.url}: dropped as {got}"
    assert got.html == "" and got.text and got.id == doc.id and got.url == doc.url
    out[doc.url] = (doc.html, got.text)
  for url, phrases in EXPECTED.items():
    for phrase in phrases:
      assert phrase in out[url][1], f"{url}: {phrase!r} missing"
  for url, (html, text) in out.items():
    assert not TAG.search(text), f"{url}: HTML tag left in the text"
    assert "window.dataLayer" not in text and "background-color" not in text
    # No line of script or style code (20+ chars, so not a lone brace or a JSON-LD phrase that is
    # also visible text) reaches the text.
    for _, code in SCRIPT_OR_STYLE.findall(html):
      for line in code.splitlines():
        line = line.strip()
        if len(line) >= 20 and re.search(r"[{};=]", line):
          assert line not in text, f"{url}: script/style line {line[:60]!r} in the text"
  assert stage.counts == {}  # one child process, never restarted


def test_same_text_as_resiliparse_called_directly(pages, stage):
  options = {k: stage.config[k] for k in ("main_content", "alt_texts", "links", "list_bullets",
                                          "preserve_formatting", "comments")}
  for doc in pages:
    assert stage.process(copy(doc)).text == resiliparse_text(doc.html, **options).strip()


def test_docs_without_html_pass_through(stage):
  doc = Doc(id="j", text="already plain text", domain="web", meta={"k": 1})
  assert stage.process(doc) is doc and doc.text == "already plain text"
  assert stage._sandbox is None  # no child process started for plain-text input


def test_empty_and_oversized_html(stage):
  empty = Doc(id="e", text="", domain="web",
              html="<html><head><script>var x = 1;</script><style>p {color: red}</style></head>"
                   "<body><nav></nav></body></html>")
  assert stage.process(empty) == "empty"
  small = Extract(max_html_chars=100)
  big = Doc(id="b", text="", domain="web", html="<p>" + "word " * 100 + "</p>")
  assert small.process(big) == "html_too_large"
  assert small._sandbox is None


SLOW_EXTRACTOR = '''
import os, time
def extract(html, **options):
  if "SLEEP" in html:
    time.sleep(60)
  if "RAISE" in html:
    raise ValueError("bad page")
  if "CRASH" in html:
    os._exit(3)
  return "text of " + html
'''


def test_timeout_fires_and_the_worker_recovers(tmp_path, monkeypatch):
  (tmp_path / "slow_extractor_for_test.py").write_text(SLOW_EXTRACTOR)
  monkeypatch.syspath_prepend(str(tmp_path))
  stage = Extract(extractor="slow_extractor_for_test:extract", timeout_s=1.0)
  try:
    def run(html):
      return stage.process(Doc(id="x", text="", domain="web", html=html))

    assert run("<p>one</p>").text == "text of <p>one</p>"
    first = stage._sandbox.proc
    t0 = time.monotonic()
    assert run("<p>SLEEP</p>") == "timeout"
    assert time.monotonic() - t0 < 5.0  # ~1 s limit, not the 60 s sleep
    assert first.poll() is not None  # the stuck child was killed
    assert run("<p>two</p>").text == "text of <p>two</p>"  # a fresh child serves the next doc
    assert run("<p>RAISE</p>") == "error"
    assert run("<p>three</p>").text == "text of <p>three</p>"  # an exception does not cost a restart
    assert run("<p>CRASH</p>") == "crashed"
    assert run("<p>four</p>").text == "text of <p>four</p>"
    assert stage.counts["process_restarts"] == 2  # after the timeout and after the crash
  finally:
    stage.close()


def test_stage_pickles_without_its_child(pages, stage):
  doc = pages[-1]
  first = stage.process(copy(doc)).text
  clone = pickle.loads(pickle.dumps(stage))
  assert clone._sandbox is None
  assert clone.process(copy(doc)).text == first
  clone.close()


def test_close_ends_the_child(stage):
  stage.process(Doc(id="x", text="", domain="web", html="<p>hello there</p>"))
  proc = stage._sandbox.proc
  stage.close()
  assert proc.poll() is not None
  with pytest.raises(ProcessLookupError):
    os.kill(proc.pid, 0)


def test_bad_options():
  with pytest.raises(DataError, match="extractor"):
    Extract(extractor="no_such_module_xyz:fn")
  with pytest.raises(DataError, match="extractor"):
    Extract(extractor="trafilatura_please")
  with pytest.raises(DataError, match="timeout_s"):
    Extract(timeout_s=0)
  with pytest.raises(DataError, match="unknown option"):
    Extract(timeout=5)


def test_overhead_of_the_child_process(pages, stage):
  """Sandboxed vs in-process extraction on the same pages; -s prints docs/s and overhead per doc."""
  options = {k: stage.config[k] for k in ("main_content", "alt_texts", "links", "list_bullets",
                                          "preserve_formatting", "comments")}
  stage.process(copy(pages[0]))  # start the child off the clock
  rounds = 3
  batches = [[copy(d) for d in pages] for _ in range(rounds)]
  t0 = time.perf_counter()
  for batch in batches:
    for d in batch:
      stage.process(d)
  sandbox = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(rounds):
    for d in pages:
      resiliparse_text(d.html, **options)
  direct = time.perf_counter() - t0
  n = rounds * len(pages)
  overhead_ms = (sandbox - direct) / n * 1e3
  mb = sum(len(d.html.encode()) for d in pages) * rounds / 1e6
  print(f"\nextract: {n / sandbox:.0f} docs/s ({mb / sandbox:.1f} MB/s of HTML) in the child process, "
        f"{n / direct:.0f} docs/s in-process; overhead {overhead_ms:.3f} ms/doc")
  # One child served every doc (a per-doc process start would cost ~100 ms). The figures printed above
  # are informative only: speed is measured by `python -m data.bench`, not asserted in tests.
  assert stage._sandbox.starts == 1


def test_child_exits_when_its_parent_is_killed(tmp_path):
  import signal
  import subprocess
  import sys
  script = ("from data.curate.extract import Extract\nfrom data.curate.base import Doc\n"
            "s = Extract()\ns.process(Doc(id='x', text='', domain='web', html='<p>hello there</p>'))\n"
            "print(s._sandbox.proc.pid, flush=True)\nimport time\ntime.sleep(60)\n")
  parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
      try:
        os.kill(child, 0)
      except ProcessLookupError:
        break
      time.sleep(0.1)
    else:
      os.kill(child, signal.SIGKILL)
      pytest.fail("extraction child outlived its parent")
  finally:
    if parent.poll() is None:
      parent.kill()
