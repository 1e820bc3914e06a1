"""The OpenAI-compatible HTTP server (FastAPI): completions, chat completions, models, health, chat page.

Started by `python -m serve --checkpoint=runs/<name>` (`serve/__main__.py`); in Python:

    driver = AsyncEngine(Engine(model, eos_id=tok.eos_id, max_slots=8), max_queue=64)
    app = create_app(driver, tok, model_name="tiny", context_len=model.cfg.max_seq_len)
    with BackgroundServer(app) as url:             # uvicorn on a free loopback port, in a thread
      openai.OpenAI(base_url=f"{url}/v1", api_key="-").completions.create(model="tiny", prompt="To be")

Routes: POST /v1/completions and /v1/chat/completions (both with `"stream": true` as server-sent events
in OpenAI's chunk format, ending with `data: [DONE]`), GET /v1/models[/{id}], GET /health, GET / (the
chat page, `serve/static/index.html`). Chat requests are rendered with `data.chat.render_prompt`; the
reply ends at the end-of-turn token (any chat control token, BOS or EOS stops it, as `parse_reply`).

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed or
unsupported request (the message names the field), 401 for a missing/wrong API key (when one is set),
404 for an unknown model or path, 429 when the admission queue is full, 503 while shutting down. A bad
request is never a 5xx. A client that disconnects (streaming or not) aborts its engine request, so its
slot and KV blocks are freed at the engine's next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import importlib.resources
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from data import chat as chat_format
from data.errors import DataError
from serve import protocol as P
from serve.api import Request, SamplingParams, TokenEvent
from serve.async_engine import AsyncEngine, EngineError, QueueFullError, ShuttingDownError
from serve.text import TextStream, token_text

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Step:
  """What one engine event of one choice adds: text, logprob entries, and the finish reason if last."""
  index: int
  text: str
  logprobs: list[P.TokenLogprob]
  offset: int  # characters of token texts before this step's entries (completions' text_offset).
  finish_reason: str | None


class _Choice:
  """One generated sequence: engine events → text deltas (detokenized, stop strings cut) + logprobs."""

  def __init__(self, index: int, events: AsyncIterator[TokenEvent], prompt_ids: Sequence[int],
               tokenizer, stop: Sequence[str], stop_ids: frozenset[int], want_logprobs: bool,
               token_text_fn):
    self.index, self.events, self.stop_ids = index, events, stop_ids
    self.text_stream = TextStream(tokenizer, prompt_ids, stop)
    self.want_logprobs, self.token_text = want_logprobs, token_text_fn
    self.n_tokens, self.finish_reason, self.logprobs = 0, None, []
    self._lp_chars = 0

  @property
  def text(self) -> str:
    return self.text_stream.text

  def _entry(self, ev: TokenEvent) -> list[P.TokenLogprob]:
    # The EOS / end-of-turn token that ended the reply is not part of it (its text is "").
    if (not self.want_logprobs or ev.logprob is None
        or (ev.finished and ev.finish_reason == "stop" and ev.token_id in self.stop_ids)):
      return []
    alts = [(*self.token_text(i), float(lp)) for i, lp in (ev.top_logprobs or ())]
    return [(*self.token_text(ev.token_id), float(ev.logprob), alts)]

  async def steps(self) -> AsyncIterator[_Step]:
    ts = self.text_stream
    async with contextlib.aclosing(self.events) as events:  # leaving early aborts the request.
      async for ev in events:
        self.n_tokens += 1
        delta = ts.push(ev.token_id)
        entries = self._entry(ev)
        offset = self._lp_chars
        self._lp_chars += sum(len(e[0]) for e in entries)
        self.logprobs += entries
        if ts.stopped:
          self.finish_reason = "stop"
        elif ev.finished:
          delta += ts.finish()
          self.finish_reason = ev.finish_reason or "stop"
        yield _Step(self.index, delta, entries, offset, self.finish_reason)
        if self.finish_reason is not None:
          return
    raise EngineError(f"request {self.index}: the event stream ended without a finished token")


async def _merge(choices: Sequence[_Choice]) -> AsyncIterator[_Step]:
  """The steps of several choices as they come (one task each); closing it cancels them all."""
  if len(choices) == 1:
    async with contextlib.aclosing(choices[0].steps()) as steps:
      async for step in steps:
        yield step
    return
  queue: asyncio.Queue = asyncio.Queue()
  done = object()

  async def pump(choice: _Choice):
    try:
      async with contextlib.aclosing(choice.steps()) as steps:
        async for step in steps:
          queue.put_nowait(step)
      queue.put_nowait(done)
    except Exception as e:  # pylint: disable=broad-except
      queue.put_nowait(e)

  tasks = [asyncio.create_task(pump(c)) for c in choices]
  try:
    remaining = len(tasks)
    while remaining:
      item = await queue.get()
      if item is done:
        remaining -= 1
      elif isinstance(item, Exception):
        raise item
      else:
        yield item
  finally:
    for t in tasks:
      t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class _SSEResponse(StreamingResponse):
  """Closes the event generator however the response ends, so a client that disconnected while a
  chunk was being sent (not only while waiting for a token) still aborts its engine requests."""

  def __init__(self, content):
    super().__init__(content, media_type="text/event-stream",
                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

  async def __call__(self, scope, receive, send):
    try:
      await super().__call__(scope, receive, send)
    finally:
      await self.body_iterator.aclose()


async def _disconnected(request: HTTPRequest) -> None:
  """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
  while (await request.receive())["type"] != "http.disconnect":
    pass


class _Service:
  """The routes' shared state: driver, tokenizer, the served model's name and context length."""

  def __init__(self, driver: AsyncEngine, tokenizer, *, model_name: str, context_len: int,
               api_key: str | None):
    self.driver, self.tok, self.model_name = driver, tokenizer, model_name
    self.context_len, self.api_key = int(context_len), api_key or None
    self.created = int(time.time())
    self.eos_id = int(tokenizer.eos_id)
    self.token_text = functools.lru_cache(maxsize=1 << 16)(functools.partial(token_text, tokenizer))
    self.stop_ids = frozenset(int(i) for i in getattr(tokenizer, "eos_ids", (self.eos_id,)))
    special = getattr(tokenizer, "special_ids", None) or {}
    # Chat replies end at <|end|>; any other control token, BOS or EOS would start a turn the model
    # must not write, so it ends the reply too (data.chat.parse_reply's rule).
    self.chat_stop_ids = (self.stop_ids | frozenset(int(i) for i in special.values())
                          | {int(tokenizer.bos_id), int(getattr(tokenizer, "pad_id", tokenizer.eos_id))})

  # --- checks -----------------------------------------------------------------------------------------

  def authorize(self, request: HTTPRequest) -> None:
    if self.api_key is None:
      return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
      raise P.APIError(401, "invalid or missing API key (send the header 'Authorization: Bearer <key>')",
                       code="invalid_api_key")

  def check_model(self, name: str) -> None:
    if name != self.model_name:
      raise P.APIError(404, f"the model '{name}' does not exist; this server serves "
                            f"'{self.model_name}' (GET /v1/models)", param="model", code="model_not_found")

  def check_length(self, prompt_len: int, max_tokens: int, param: str) -> None:
    if prompt_len + max_tokens > self.context_len:
      raise P.APIError(400, f"this model's maximum context length is {self.context_len} tokens, but "
                            f"{prompt_len + max_tokens} were requested ({prompt_len} in the prompt, "
                            f"{max_tokens} for the completion); shorten the prompt or reduce max_tokens",
                       param=param, code="context_length_exceeded")

  def completion_prompts(self, prompt: Any) -> list[list[int]]:
    """str | list[str] | list[int] | list[list[int]] → token-id prompts (text gets BOS, as in training)."""
    def ids_of(p, where):
      if isinstance(p, str):
        return [int(self.tok.bos_id)] + self.tok.encode(p)
      if (isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p)):
        bad = [i for i in p if not 0 <= i < self.tok.vocab_size]
        if bad:
          raise P.APIError(400, f"{where}: token id {bad[0]} out of range [0, {self.tok.vocab_size})",
                           param="prompt")
        return list(p)
      raise P.APIError(400, f"{where}: expected a string, a list of strings, or a non-empty list of "
                            "token ids (or a list of such lists)", param="prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
      return [ids_of(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [ids_of(prompt, "prompt")]

  def chat_prompt(self, req: P.ChatRequest) -> list[int]:
    conv = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in req.messages]
    try:
      return chat_format.render_prompt(conv, self.tok)
    except DataError as e:
      raise P.APIError(400, str(e), param="messages") from None

  # --- generation -------------------------------------------------------------------------------------

  def start(self, rid: str, prompts: list[list[int]], params: SamplingParams, stop: list[str],
            stop_ids: frozenset[int]) -> list[_Choice]:
    """Admits every prompt (all or none: 429 / 503 otherwise) and wraps each in a _Choice."""
    choices = []
    try:
      for i, ids in enumerate(prompts):
        events = self.driver.stream(Request(f"{rid}-{i}", tuple(ids), params))
        choices.append(_Choice(i, events, ids, self.tok, stop, stop_ids, params.logprobs is not None,
                               self.token_text))
    except QueueFullError as e:
      self._abort(rid, len(choices))
      raise P.APIError(429, str(e), kind="rate_limit_error", code="rate_limit_exceeded") from None
    except ShuttingDownError as e:
      self._abort(rid, len(choices))
      raise P.APIError(503, str(e), kind="service_unavailable", code="shutting_down") from None
    return choices

  def _abort(self, rid: str, n: int) -> None:
    for i in range(n):
      self.driver.abort(f"{rid}-{i}")

  async def collect(self, request: HTTPRequest, choices: list[_Choice]) -> bool:
    """Runs `choices` to the end; False (and every request aborted) if the client disconnects first."""
    async def run():
      async with contextlib.aclosing(_merge(choices)) as steps:
        async for _ in steps:
          pass
    work = asyncio.ensure_future(run())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
      await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
      for task in (work, gone):
        task.cancel()
      await asyncio.gather(work, gone, return_exceptions=True)
    if not work.cancelled() and work.exception() is not None:
      raise _engine_error(work.exception())
    return work.done() and not work.cancelled()


def _engine_error(e: BaseException) -> P.APIError:
  if isinstance(e, ValueError):  # the engine refused the request (add_request's checks).
    return P.APIError(400, str(e))
  if isinstance(e, ShuttingDownError):
    return P.APIError(503, str(e), kind="service_unavailable", code="shutting_down")
  return P.APIError(500, f"generation failed: {e}", kind="server_error")


def _sampling(req, max_tokens: int, stop_ids: frozenset[int], logprobs: int | None,
              eos_id: int, vocab_size: int) -> SamplingParams:
  # top_k ≥ vocab is "off" too; clamping keeps a huge value out of the engine's int32 arrays.
  top_k = min(max(req.top_k, 0), vocab_size)
  return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=top_k,
                        top_p=req.top_p, seed=req.seed, logprobs=logprobs,
                        stop_token_ids=tuple(sorted(stop_ids - {eos_id})))


def _usage(choices: list[_Choice], prompts: list[list[int]]) -> dict:
  return P.usage(sum(map(len, prompts)), sum(c.n_tokens for c in choices))


async def _stream(choices, prompts, chunk_fn, include_usage: bool) -> AsyncIterator[str]:
  """SSE body: one chunk per step that adds something, a finish chunk per choice, usage, [DONE]."""
  try:
    async with contextlib.aclosing(_merge(choices)) as steps:
      async for step in steps:
        if step.text or step.logprobs:
          yield P.sse(chunk_fn(step, False))
        if step.finish_reason is not None:
          yield P.sse(chunk_fn(step, True))
    if include_usage:
      yield P.sse(chunk_fn(None, _usage(choices, prompts)))
  except Exception as e:  # pylint: disable=broad-except
    err = _engine_error(e)  # headers are sent: the error goes into the stream, as OpenAI does.
    yield P.sse(err.body())
  yield P.sse("[DONE]")


def create_app(driver: AsyncEngine, tokenizer, *, model_name: str, context_len: int,
               api_key: str | None = None, drain_timeout_s: float = 60.0) -> FastAPI:
  """The FastAPI app; its lifespan starts `driver` and, at shutdown, drains it (≤ drain_timeout_s)."""
  svc = _Service(driver, tokenizer, model_name=model_name, context_len=context_len, api_key=api_key)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    driver.start()
    yield
    await driver.shutdown(drain_timeout_s)

  app = FastAPI(title="jaxlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
  app.state.service = svc

  @app.exception_handler(P.APIError)
  async def _api_error(_, e: P.APIError):
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(_, e: StarletteHTTPException):
    return JSONResponse(P.error_body(str(e.detail)), status_code=e.status_code)

  @app.exception_handler(Exception)
  async def _internal_error(_, e: Exception):
    log.exception("internal error")
    return JSONResponse(P.error_body(f"internal error: {type(e).__name__}", kind="server_error"),
                        status_code=500)

  @app.get("/health")
  async def health():
    if not driver.accepting:
      return JSONResponse({"status": "unavailable", "in_flight": driver.num_in_flight}, status_code=503)
    return {"status": "ok", "in_flight": driver.num_in_flight}

  @app.get("/", response_class=HTMLResponse)
  async def page():
    return HTMLResponse(_page_html())

  def model_card() -> dict:
    return {"id": model_name, "object": "model", "created": svc.created, "owned_by": "jaxlm",
            "max_model_len": svc.context_len}

  @app.get("/v1/models")
  async def models(request: HTTPRequest):
    svc.authorize(request)
    return {"object": "list", "data": [model_card()]}

  @app.get("/v1/models/{name:path}")
  async def model(name: str, request: HTTPRequest):
    svc.authorize(request)
    svc.check_model(name)
    return model_card()

  async def admit(request: HTTPRequest, schema):
    """Auth, the body parsed and validated against `schema`, a known model, no unsupported field."""
    svc.authorize(request)
    req = P.parse(schema, await request.body())
    svc.check_model(req.model)
    P.check_unsupported(req)
    return req, P.stop_strings(req.stop)

  @app.post("/v1/completions")
  async def completions(request: HTTPRequest):
    req, stop = await admit(request, P.CompletionRequest)
    prompts = svc.completion_prompts(req.prompt)
    max_tokens = req.max_tokens or 16
    for ids in prompts:
      svc.check_length(len(ids), max_tokens, "prompt")
    params = _sampling(req, max_tokens, svc.stop_ids, req.logprobs, svc.eos_id, svc.tok.vocab_size)
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    choices = svc.start(rid, prompts, params, stop, svc.stop_ids)
    want_top = bool(req.logprobs)

    def choice_body(index, text, entries, offset, finish):
      lp = P.completion_logprobs(entries, offset, want_top) if req.logprobs is not None else None
      return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}

    if req.stream:
      def chunk(step: _Step | None, last_or_usage):
        if step is None:
          return P.completion(rid, model_name, [], last_or_usage, chunk=True)
        body = (choice_body(step.index, "", [], 0, step.finish_reason) if last_or_usage else
                choice_body(step.index, step.text, step.logprobs, step.offset, None))
        return P.completion(rid, model_name, [body], None, chunk=True)
      include = bool(req.stream_options and req.stream_options.include_usage)
      return _SSEResponse(_stream(choices, prompts, chunk, include))
    if not await svc.collect(request, choices):
      return Response(status_code=499)  # nginx's "client closed request": nobody reads it.
    return P.completion(rid, model_name, [choice_body(c.index, c.text, c.logprobs, 0, c.finish_reason)
                                          for c in choices], _usage(choices, prompts))

  @app.post("/v1/chat/completions")
  async def chat_completions(request: HTTPRequest):
    req, stop = await admit(request, P.ChatRequest)
    prompt = svc.chat_prompt(req)
    max_tokens = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "messages"
    if max_tokens is None:
      max_tokens = max(svc.context_len - len(prompt), 1)
    svc.check_length(len(prompt), max_tokens, param)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = _sampling(req, max_tokens, svc.chat_stop_ids, logprobs, svc.eos_id, svc.tok.vocab_size)
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    choices = svc.start(rid, [prompt], params, stop, svc.chat_stop_ids)

    if req.stream:
      def chunk(step: _Step | None, last_or_usage):
        if step is None:
          return P.chat(rid, model_name, [], last_or_usage, chunk=True)
        if last_or_usage:
          body = {"index": step.index, "delta": {}, "logprobs": None,
                  "finish_reason": step.finish_reason}
        else:
          body = {"index": step.index, "delta": {"content": step.text},
                  "logprobs": P.chat_logprobs(step.logprobs) if req.logprobs else None,
                  "finish_reason": None}
        return P.chat(rid, model_name, [body], None, chunk=True)

      async def with_role():
        # OpenAI's first chunk announces the role, with empty content.
        yield P.sse(P.chat(rid, model_name, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}], None, True))
        async with contextlib.aclosing(_stream(choices, [prompt], chunk, include)) as rest:
          async for event in rest:
            yield event
      include = bool(req.stream_options and req.stream_options.include_usage)
      return _SSEResponse(with_role())
    if not await svc.collect(request, choices):
      return Response(status_code=499)
    c = choices[0]
    body = {"index": 0, "message": {"role": "assistant", "content": c.text},
            "logprobs": P.chat_logprobs(c.logprobs) if req.logprobs else None,
            "finish_reason": c.finish_reason}
    return P.chat(rid, model_name, [body], _usage(choices, [prompt]))

  return app


@functools.lru_cache(maxsize=1)
def _page_html() -> str:
  return importlib.resources.files("serve").joinpath("static/index.html").read_text(encoding="utf-8")


class BackgroundServer:
  """uvicorn serving `app` from a daemon thread: `with BackgroundServer(app) as url: ...`.

  Binds `host:port` itself first (port 0: a free one), so the URL is known before requests are made;
  leaving the block asks uvicorn to exit (it finishes open requests, then runs the app's shutdown).
  """

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **uvicorn_kwargs):
    self.app, self.host, self.port = app, host, port
    self.kwargs = dict(log_level="warning", **uvicorn_kwargs)
    self.server: uvicorn.Server | None = None
    self._thread: threading.Thread | None = None
    self.url = ""

  def __enter__(self) -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((self.host, self.port))
    self.url = f"http://{self.host}:{sock.getsockname()[1]}"
    self.server = uvicorn.Server(uvicorn.Config(self.app, **self.kwargs))
    self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                    name="uvicorn")
    self._thread.start()
    deadline = time.monotonic() + 60
    while not self.server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f"uvicorn did not start on {self.url}")
      time.sleep(0.01)
    return self.url

  def __exit__(self, *exc) -> None:
    self.server.should_exit = True
    self._thread.join(timeout=120)
