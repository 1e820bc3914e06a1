"""The chat page (serve/static/index.html) in headless Chromium, driven by Playwright.

Debian's Chromium (`apt-get install chromium`, which .ci/run does) is launched by path: Playwright's own
browser download is never used. Skips without Chromium or Playwright on a user's machine, fails under CI.
The server is the real one (serve/server.py + the engine) on a random tiny model; the replies the page
shows must equal the engine's greedy replies to the same conversation.
"""
from __future__ import annotations

import shutil

import pytest

from conftest import require
from test_serve_server import CONTEXT, MODEL, tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server(chat_tokenizer):
  from data.chat import parse_reply, render_prompt
  from serve.api import SamplingParams
  from serve.async_engine import AsyncEngine
  from serve.engine import Engine
  from serve.server import BackgroundServer, create_app
  tok = chat_tokenizer
  engine = Engine(tiny_model(tok.vocab_size, seed=1), eos_id=tok.eos_id, block_size=16, max_slots=4)
  app = create_app(AsyncEngine(engine, max_queue=4), tok, model_name=MODEL, context_len=CONTEXT)
  stop = tuple(sorted(app.state.service.chat_stop_ids - {tok.eos_id}))
  params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=stop)
  # The replies the page must show: greedy, for the conversation as the page keeps it.
  conv = [{"role": "user", "content": "Hello there!"}]
  replies = []
  for follow_up in ("And what next?", None):
    reply, _ = parse_reply(engine.generate([render_prompt(conv, tok)], params)[0], tok)
    assert reply.strip(), "precondition: a non-empty greedy reply"
    replies.append(reply)
    if follow_up:
      conv += [{"role": "assistant", "content": reply}, {"role": "user", "content": follow_up}]
  with BackgroundServer(app) as url:
    yield url, replies


def test_chat_page_streams_replies_and_keeps_the_conversation(server):
  require(CHROMIUM is not None, "Chromium not found (apt-get install chromium)")
  try:
    from playwright.sync_api import sync_playwright
  except ImportError:
    require(False, "playwright is not installed (pip install -e '.[test]')")
  url, replies = server
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # CI runs as root.
    try:
      page = browser.new_page()
      page.goto(url)
      page.wait_for_selector(f"#model:has-text('model: {MODEL}')")
      page.click("summary")  # settings: greedy, so the reply is known.
      page.fill("#temperature", "0")
      page.fill("#max_tokens", str(MAX_TOKENS))

      page.fill("#input", "Hello there!")
      page.click("#send")
      first = page.locator(".assistant").nth(0)
      first.and_(page.locator("[data-state=done]")).wait_for()
      assert first.text_content() == replies[0]
      assert int(first.get_attribute("data-chunks")) > 1  # it arrived in pieces, as a stream.

      page.fill("#input", "And what next?")
      page.press("#input", "Enter")  # Enter sends, too.
      second = page.locator(".assistant").nth(1)
      second.and_(page.locator("[data-state=done]")).wait_for()
      assert second.text_content() == replies[1]  # the request carried the whole conversation.
      assert page.locator(".user").all_text_contents() == ["Hello there!", "And what next?"]
      assert page.text_content("#error") in ("", "(the reply was cut at max tokens)")

      # A request the server refuses: its message is shown, and the conversation is unchanged.
      page.fill("#max_tokens", "100000")
      page.fill("#input", "One more?")
      page.click("#send")
      page.wait_for_selector("#error:has-text('maximum context length')")
      assert page.locator(".assistant").count() == 2 and page.input_value("#input") == "One more?"
    finally:
      browser.close()

