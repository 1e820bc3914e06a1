"""The OpenAI-compatible server (serve/server.py), its async driver and text layer, over real HTTP.

A uvicorn server runs in a background thread on a free loopback port, serving a random tiny Transformer
(float32, so batching cannot change an argmax) with the `chat_tokenizer` fixture. Replies are compared
with the engine's own greedy output for the same prompt, computed before the server starts. A fake
engine (the Engine API in plain Python, its steps gated by the test) makes admission, draining and
abort timing deterministic where the real one would race.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
import types

import httpx
import openai
import pytest

from serve.api import Request, SamplingParams, TokenEvent
from serve.async_engine import AsyncEngine, QueueFullError, ShuttingDownError
from serve.server import BackgroundServer, create_app
from serve.text import StopMatcher, TextStream

MODEL = "tiny-test"
CONTEXT = 128


# --- text layer -------------------------------------------------------------------------------------

def test_detokenizer_streams_exactly_the_decoded_text(chat_tokenizer):
  tok = chat_tokenizer
  text = "To be, or not to be:  that is\n\tthe question — ünïcödé 日本語 🙂 ▁x"
  ids = tok.encode(text)
  assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # byte-fallback pieces are in play.
  ts = TextStream(tok, [tok.bos_id] + tok.encode("Hamlet:"))
  deltas = [ts.push(i) for i in ids] + [ts.finish()]
  assert "".join(deltas) == text == ts.text
  assert all("\ufffd" not in d for d in deltas)  # only whole characters are ever emitted.


def test_stop_strings_cut_text_and_hold_back_only_possible_starts():
  m = StopMatcher(["abc", "xyz!"])
  assert [m.push(c) for c in "12ab"] == ["1", "2", "", ""]  # "ab" could start "abc": held back.
  assert m.push("d") == "abd" and not m.stopped
  assert m.push("xy") == ""  # could start "xyz!".
  assert m.push("zz") == "xyzz"  # no stop string starts with "z": all of it is safe.
  assert m.push("qxyz") == "q" and m.finish() == "xyz"  # the end of generation releases the rest.
  m = StopMatcher(["abc"])
  assert m.push("hello ab") == "hello " and m.push("cdef") == "" and m.stopped
  assert m.push("more") == "" and m.finish() == ""


def test_stop_string_spanning_tokens(chat_tokenizer):
  tok = chat_tokenizer
  text = "Now is the winter of our discontent made glorious summer"
  ts = TextStream(tok, [tok.bos_id], stop=["discontent made", "never there"])
  out = ""
  for i in tok.encode(text):
    out += ts.push(i)
    if ts.stopped:
      break
  assert ts.stopped and out + ts.finish() == "Now is the winter of our "


# --- the async driver, on a fake engine -------------------------------------------------------------

class FakeEngine:
  """The Engine API in plain Python: request r emits ordinary ids 300 + (sum(prompt) + k) % 500,
  k = 1, 2, ..., finishing at max_tokens; `gate` cleared holds every step (requests stay in flight)."""

  def __init__(self, max_slots: int = 2, script: list[int] | None = None):
    self.max_slots, self.script = max_slots, script  # script: every request emits these ids instead.
    self.running: dict[str, list] = {}
    self.waiting: list[Request] = []
    self.aborted: list[str] = []
    self.gate = threading.Event()
    self.gate.set()

  def add_request(self, req: Request) -> None:
    if not req.prompt_ids:
      raise ValueError("empty prompt")
    self.waiting.append(req)

  def abort(self, request_id: str) -> None:
    self.aborted.append(request_id)
    self.running.pop(request_id, None)
    self.waiting = [r for r in self.waiting if r.request_id != request_id]

  def has_unfinished(self) -> bool:
    return bool(self.running or self.waiting)

  def step(self) -> list[TokenEvent]:
    if not self.gate.is_set():
      time.sleep(0.002)
      return []
    while self.waiting and len(self.running) < self.max_slots:
      req = self.waiting.pop(0)
      self.running[req.request_id] = [req, 0]
    events = []
    for rid, entry in list(self.running.items()):
      req, entry[1] = entry[0], entry[1] + 1
      token = (self.script[entry[1] - 1] if self.script else
               300 + (sum(req.prompt_ids) + entry[1]) % 500)
      reason = ("stop" if token in (2, *req.params.stop_token_ids) else
                "length" if entry[1] >= req.params.max_tokens else None)
      events.append(TokenEvent(rid, token, logprob=-1.0, top_logprobs=((token, -1.0),),
                               finished=reason is not None, finish_reason=reason))
      if reason:
        del self.running[rid]
    return events

  def stats(self) -> dict:
    return {"running": len(self.running), "waiting": len(self.waiting)}

  @staticmethod
  def expected(prompt_ids, max_tokens: int) -> list[int]:
    return [300 + (sum(prompt_ids) + k) % 500 for k in range(1, max_tokens + 1)]


def _req(rid: str, max_tokens: int = 5, prompt=(1, 2, 3)) -> Request:
  return Request(rid, tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0))


def test_driver_streams_events_and_aborts_a_closed_stream():
  engine = FakeEngine()
  driver = AsyncEngine(engine, max_queue=4).start()

  async def go():
    events = await driver.generate(_req("a", 6))
    assert [e.token_id for e in events] == FakeEngine.expected((1, 2, 3), 6)
    assert events[-1].finished and not any(e.finished for e in events[:-1])
    async with contextlib.aclosing(driver.stream(_req("b", 1000))) as stream:
      async for ev in stream:
        assert ev.request_id == "b"
        break  # the consumer goes away mid-stream.
  asyncio.run(go())
  deadline = time.monotonic() + 10
  while engine.has_unfinished() and time.monotonic() < deadline:
    time.sleep(0.01)
  assert engine.aborted == ["b"] and not engine.has_unfinished() and driver.num_in_flight == 0
  driver.close()


def test_driver_bounds_admission_and_drains_on_shutdown():
  engine = FakeEngine(max_slots=1)
  engine.gate.clear()
  driver = AsyncEngine(engine, max_queue=1).start()  # capacity: 1 running + 1 waiting.

  async def go():
    streams = [driver.stream(_req("a", 4)), driver.stream(_req("b", 3, prompt=(7,)))]
    with pytest.raises(QueueFullError, match="too many requests"):
      driver.stream(_req("c"))
    closer = asyncio.create_task(driver.shutdown())
    while driver.accepting:
      await asyncio.sleep(0.01)
    with pytest.raises(ShuttingDownError):
      driver.stream(_req("d"))
    assert not closer.done()  # waits for the admitted requests.
    engine.gate.set()
    got = [[e.token_id async for e in s] for s in streams]
    await closer
    return got
  got = asyncio.run(go())
  assert got == [FakeEngine.expected((1, 2, 3), 4), FakeEngine.expected((7,), 3)]
  assert engine.aborted == [] and not driver._thread.is_alive()


# --- HTTP: validation, admission, auth (fake engine) -------------------------------------------------

@contextlib.contextmanager
def _fake_server(tokenizer, *, max_slots=1, max_queue=1, api_key=None, script=None):
  engine = FakeEngine(max_slots=max_slots, script=script)
  driver = AsyncEngine(engine, max_queue=max_queue)
  app = create_app(driver, tokenizer, model_name=MODEL, context_len=CONTEXT, api_key=api_key)
  with BackgroundServer(app) as url:
    yield types.SimpleNamespace(url=url, engine=engine, driver=driver)
  engine.gate.set()


@pytest.fixture(scope="module")
def fake(chat_tokenizer):
  with _fake_server(chat_tokenizer) as server:
    yield server


C, CHAT = "/v1/completions", "/v1/chat/completions"
OK_MSG = [{"role": "user", "content": "hi"}]


def comp(**kw):
  return {"model": MODEL, "prompt": "hi", **kw}


def chat(**kw):
  return {"model": MODEL, "messages": OK_MSG, **kw}


BAD_REQUESTS = [  # (path, body, status, fragment of the message)
    (C, b'{"model": ', 400, "invalid JSON"),
    (C, b"[1, 2]", 400, "JSON object"),
    (C, {"prompt": "hi"}, 400, "model: Field required"),
    (C, {"model": MODEL}, 400, "prompt: Field required"),
    (C, comp(prompt=5), 400, "prompt: expected a string"),
    (C, comp(prompt=[]), 400, "prompt: expected a string"),
    (C, comp(prompt=[99999]), 400, "token id 99999 out of range"),
    (C, comp(max_tokens="5"), 400, "max_tokens: Input should be a valid integer"),
    (C, comp(max_tokens=-1), 400, "max_tokens: Input should be greater than or equal to 1"),
    (C, comp(max_tokens=0), 400, "max_tokens"),
    (C, comp(temperature="hot"), 400, "temperature: Input should be a valid number"),
    (C, comp(temperature=3), 400, "temperature"),
    (C, comp(top_p=0), 400, "top_p"),
    (C, comp(stream="yes"), 400, "stream: Input should be a valid boolean"),
    (C, comp(logprobs=50), 400, "logprobs"),
    (C, comp(stop=5), 400, "stop: expected a string or a list of strings"),
    (C, comp(bogus=1), 400, "bogus: unknown field"),
    (C, comp(n=2), 400, "n=2 is not supported"),
    (C, comp(echo=True), 400, "echo is not supported"),
    (C, comp(prompt="to be or not " * 40), 400, "maximum context length is 128 tokens"),
    (C, comp(max_tokens=500), 400, "maximum context length"),
    (C, comp(model="gpt-4"), 404, "the model 'gpt-4' does not exist"),
    (CHAT, {"model": MODEL}, 400, "messages: Field required"),
    (CHAT, chat(messages=[]), 400, "messages"),
    (CHAT, chat(messages="hi"), 400, "messages: Input should be a valid array"),
    (CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content: Field required"),
    (CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    (CHAT, chat(messages=[{"role": "robot", "content": "x"}]), 400, "unknown role 'robot'"),
    (CHAT, chat(messages=OK_MSG + [{"role": "assistant", "content": "yo"}]), 400, "after an assistant turn"),
    (CHAT, chat(max_completion_tokens=-3), 400, "max_completion_tokens"),
    (CHAT, chat(top_logprobs=30), 400, "top_logprobs"),
    (CHAT, chat(logprobs=1), 400, "logprobs: Input should be a valid boolean"),
    (CHAT, chat(n=3), 400, "n=3 is not supported"),
    (CHAT, chat(max_tokens=200), 400, "maximum context length"),
    (CHAT, chat(model="nope"), 404, "does not exist"),
]


def test_bad_requests_get_4xx_with_a_message(fake):
  with httpx.Client(base_url=fake.url, timeout=30) as http:
    for path, body, status, fragment in BAD_REQUESTS:
      kw = {"content": body} if isinstance(body, bytes) else {"json": body}
      r = http.post(path, **kw)
      assert r.status_code == status, (body, r.status_code, r.text)
      err = r.json()["error"]
      assert fragment in err["message"], (body, err)
      assert set(err) == {"message", "type", "param", "code"}
    for method, path, status in [("GET", "/v1/nothing", 404), ("POST", "/v1/models", 405),
                                 ("GET", "/v1/models/other", 404)]:
      r = http.request(method, path)
      assert r.status_code == status and r.json()["error"]["message"], r.text
  assert fake.driver.num_in_flight == 0  # none of them reached the engine.


def test_openai_client_sees_errors_and_models(fake, chat_tokenizer):
  client = openai.OpenAI(base_url=f"{fake.url}/v1", api_key="unused", max_retries=0)
  assert [m.id for m in client.models.list()] == [MODEL]
  with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
    client.completions.create(model=MODEL, prompt="hi", n=2)
  with pytest.raises(openai.NotFoundError, match="does not exist"):
    client.chat.completions.create(model="gpt-4o", messages=OK_MSG)
  r = client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
  prompt = [chat_tokenizer.bos_id] + chat_tokenizer.encode("hi")
  assert r.choices[0].text == chat_tokenizer.decode(FakeEngine.expected(prompt, 3))
  assert r.choices[0].finish_reason == "length"
  assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 3)


def test_queue_full_is_429_and_draining_is_503(chat_tokenizer):
  with _fake_server(chat_tokenizer, max_slots=1, max_queue=1) as srv:
    srv.engine.gate.clear()
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3}
    with httpx.Client(base_url=srv.url, timeout=60) as http:
      results = []
      threads = [threading.Thread(target=lambda: results.append(http.post(C, json=body)))
                 for _ in range(2)]
      for t in threads:
        t.start()
      deadline = time.monotonic() + 30
      while srv.driver.num_in_flight < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
      r = http.post(C, json=body)
      assert r.status_code == 429 and "retry later" in r.json()["error"]["message"]
      assert r.json()["error"]["code"] == "rate_limit_exceeded"
      closer = threading.Thread(target=srv.driver.close)
      closer.start()
      while srv.driver.accepting:
        time.sleep(0.01)
      r = http.post(C, json=body)
      assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
      assert http.get("/health").status_code == 503
      srv.engine.gate.set()  # the two admitted requests still finish: shutdown drains them.
      for t in threads + [closer]:
        t.join(timeout=30)
      assert [r.status_code for r in results] == [200, 200]
      assert all(r.json()["usage"]["completion_tokens"] == 3 for r in results)


def test_api_key_is_enforced(chat_tokenizer):
  with _fake_server(chat_tokenizer, api_key="sekret") as srv:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    with httpx.Client(base_url=srv.url, timeout=30) as http:
      assert http.post(C, json=body).status_code == 401
      r = http.post(C, json=body, headers={"Authorization": "Bearer wrong"})
      assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
      assert http.get("/v1/models").status_code == 401
      assert http.get("/health").status_code == 200  # probes and the page need no key.
      assert http.get("/").status_code == 200
    with pytest.raises(openai.AuthenticationError):
      openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sekret", max_retries=0)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2


# --- HTTP: the real engine ---------------------------------------------------------------------------

PROMPTS = ["To be, or not to be", "ROMEO:", "Natalia sold clips to 48 of her friends", "The quick brown"]
CHATS = [[{"role": "user", "content": "What is 2+2?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who was Hamlet?"}]]
MAX_TOKENS = 20


def tiny_model(vocab_size: int, seed: int = 0):
  """A random 2-layer Transformer in float32 (an argmax then does not depend on what shares the batch).
  init_std 0.3, not 0.02: the logits spread enough that greedy text varies instead of repeating."""
  from flax import nnx

  from model.config import ModelConfig
  from model.transformer import Transformer
  cfg = ModelConfig(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                    max_seq_len=CONTEXT, compute_dtype="float32", init_std=0.3)
  with nnx.use_eager_sharding(False):
    return Transformer(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def real(chat_tokenizer):
  from data.chat import render_prompt
  from serve.engine import Engine
  tok = chat_tokenizer
  engine = Engine(tiny_model(tok.vocab_size), eos_id=tok.eos_id, block_size=16, max_slots=8)
  app = create_app(AsyncEngine(engine, max_queue=64), tok, model_name=MODEL, context_len=CONTEXT)
  svc = app.state.service
  # References: the engine's own greedy output, alone in the batch, before the server owns the engine.
  greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
  prompts = [[tok.bos_id] + tok.encode(p) for p in PROMPTS]
  chat_params = dataclasses.replace(greedy, stop_token_ids=tuple(sorted(svc.chat_stop_ids - {tok.eos_id})))
  chat_prompts = [render_prompt(c, tok) for c in CHATS]
  ref = types.SimpleNamespace(
      completion=[engine.generate([p], greedy)[0] for p in prompts],
      chat=[engine.generate([p], chat_params)[0] for p in chat_prompts],
      long=engine.generate([prompts[0]], dataclasses.replace(greedy, max_tokens=100))[0])
  with BackgroundServer(app) as url:
    yield types.SimpleNamespace(url=url, tok=tok, engine=engine, driver=svc.driver, prompts=prompts,
                                chat_prompts=chat_prompts, ref=ref,
                                client=openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0))


def _finish(ids, stop_ids) -> str:
  return "stop" if ids[-1] in stop_ids else "length"


def test_completions_equal_the_engines_greedy_output(real):
  tok = real.tok
  for prompt, ids, text_prompt in zip(real.prompts, real.ref.completion, PROMPTS):
    r = real.client.completions.create(model=MODEL, prompt=text_prompt, max_tokens=MAX_TOKENS,
                                       temperature=0)
    assert r.choices[0].text == tok.decode(ids)
    assert r.choices[0].finish_reason == _finish(ids, {tok.eos_id})
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(ids))
    chunks = list(real.client.completions.create(model=MODEL, prompt=text_prompt, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == tok.decode(ids)
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
  # A batch of prompts (and token-id prompts) in one request: one choice each, in order.
  r = real.client.completions.create(model=MODEL, prompt=[PROMPTS[1], PROMPTS[0]], max_tokens=MAX_TOKENS,
                                     temperature=0)
  assert [c.text for c in r.choices] == [tok.decode(real.ref.completion[i]) for i in (1, 0)]
  r = real.client.completions.create(model=MODEL, prompt=real.prompts[2], max_tokens=MAX_TOKENS,
                                     temperature=0)
  assert r.choices[0].text == tok.decode(real.ref.completion[2])


def test_chat_equals_the_engines_greedy_reply(real):
  from data.chat import parse_reply
  svc_stop = {real.tok.eos_id} | set(real.tok.special_ids.values()) | {real.tok.bos_id, real.tok.pad_id}
  for conv, prompt, ids in zip(CHATS, real.chat_prompts, real.ref.chat):
    expected, _ = parse_reply(ids, real.tok)
    r = real.client.chat.completions.create(model=MODEL, messages=conv, max_tokens=MAX_TOKENS,
                                            temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == _finish(ids, svc_stop)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(ids))
    chunks = list(real.client.chat.completions.create(
        model=MODEL, messages=conv, max_completion_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == len(ids) and not chunks[-1].choices


def test_stop_strings_and_logprobs(real):
  tok = real.tok
  full = tok.decode(real.ref.completion[2])
  stop = full[len(full) // 2:len(full) // 2 + 3]
  expected = full[:full.index(stop)]
  body = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0, stop=[stop, "never!"])
  r = real.client.completions.create(**body)
  assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
  chunks = list(real.client.completions.create(**body, stream=True))
  assert "".join(c.choices[0].text for c in chunks) == expected
  assert chunks[-1].choices[0].finish_reason == "stop"
  # Logprobs, greedy: each sampled token is the best of its alternatives.
  ids = real.ref.completion[0]
  r = real.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                     temperature=0, logprobs=3)
  lp = r.choices[0].logprobs
  n = len(ids) - (ids[-1] == tok.eos_id)  # the EOS that ends a reply is not part of it.
  assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
  for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
    assert len(top) <= 3 and logprob <= 0 and top[token] == pytest.approx(logprob) == max(top.values())
  assert lp.text_offset == sorted(lp.text_offset)
  r = real.client.chat.completions.create(model=MODEL, messages=CHATS[0], max_tokens=MAX_TOKENS,
                                          temperature=0, logprobs=True, top_logprobs=2)
  content = r.choices[0].logprobs.content
  assert content and all(c.top_logprobs[0].token == c.token and len(c.top_logprobs) == 2 for c in content)
  raw = b"".join(bytes(c.bytes) for c in content)
  assert raw.decode("utf-8", errors="replace") == r.choices[0].message.content
  assert real.driver.num_in_flight == 0


def test_seeded_sampling_is_reproducible_and_extreme_values_are_safe(real):
  body = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=1.5, top_p=0.9,
              extra_body={"top_k": 10 ** 12}, seed=2 ** 70)
  a, b = (real.client.completions.create(**body).choices[0].text for _ in range(2))
  assert a == b and a != real.tok.decode(real.ref.completion[1])  # seeded; and not the greedy reply.
  assert real.driver.accepting  # the engine thread survived the out-of-range values.


def test_64_concurrent_streaming_clients(real):
  async def one(http, i):
    body = {"model": MODEL, "prompt": PROMPTS[i % 4], "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True}
    text, done = "", False
    async with http.stream("POST", "/v1/completions", json=body) as r:
      assert r.status_code == 200
      async for line in r.aiter_lines():
        if line == "data: [DONE]":
          done = True
        elif line.startswith("data: "):
          text += json.loads(line[6:])["choices"][0]["text"]
    return i, text, done

  async def go():
    async with httpx.AsyncClient(base_url=real.url, timeout=120,
                                 limits=httpx.Limits(max_connections=64)) as http:
      return await asyncio.gather(*(one(http, i) for i in range(64)))
  results = asyncio.run(go())
  assert all(done for _, _, done in results)
  for i, text, _ in results:  # 8 slots shared by 64 requests: each still gets its greedy reply.
    assert text == real.tok.decode(real.ref.completion[i % 4]), i
  stats = real.driver.stats()
  assert stats["requests_running"] == stats["requests_waiting"] == stats["blocks_used"] == 0


def test_disconnect_mid_stream_frees_the_slot_and_blocks(real):
  assert len(real.ref.long) == 100  # precondition: unaborted, this request runs 100 steps.
  before = real.driver.stats()["generated_tokens"]
  body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0, "stream": True}
  with httpx.Client(base_url=real.url, timeout=60) as http:
    with http.stream("POST", "/v1/completions", json=body) as r:
      for line in r.iter_lines():
        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
          break  # the first text: now hang up.
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline:
    stats = real.driver.stats()
    if stats["in_flight"] == stats["requests_running"] == stats["blocks_used"] == 0:
      break
    time.sleep(0.02)
  assert stats["in_flight"] == stats["requests_running"] == stats["requests_waiting"] == 0
  assert stats["blocks_used"] == 0
  assert stats["generated_tokens"] - before < 100  # it was aborted, not run to the end.


def test_health_models_and_page(real):
  with httpx.Client(base_url=real.url, timeout=30) as http:
    assert http.get("/health").json()["status"] == "ok"
    page = http.get("/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
  assert real.client.models.retrieve(MODEL).id == MODEL


def test_cli_bad_checkpoint_is_one_line_exit_2(tmp_path, capsys):
  from serve.__main__ import main
  with pytest.raises(SystemExit) as e:
    main([f"--checkpoint={tmp_path / 'missing'}"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "missing" in err and len(err.splitlines()) == 1



def test_chat_reply_ends_at_the_end_of_turn_token(chat_tokenizer):
  tok = chat_tokenizer
  end = tok.special_ids["<|end|>"]
  script = tok.encode("Hello there") + [end] + tok.encode(" <|user|> more") + [tok.eos_id]
  with _fake_server(tok, script=script) as srv:
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="-", max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=OK_MSG, logprobs=True)
    assert r.choices[0].message.content == "Hello there" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == script.index(end) + 1  # <|end|> counts, but is not text
    assert len(r.choices[0].logprobs.content) == script.index(end)  # nor a logprob entry.
    # /v1/completions stops only at EOS: control tokens in between decode to nothing.
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=50)
    assert r.choices[0].text == "Hello there <|user|> more" and r.choices[0].finish_reason == "stop"
