"""Asyncio front of the (synchronous, single-threaded) serving engine.

Library module, no entry point; `serve/server.py` owns one per process:

    driver = AsyncEngine(engine, max_queue=64)      # engine: serve.engine.Engine
    driver.start()
    async for ev in driver.stream(Request("r1", ids, SamplingParams(max_tokens=32))):
      ...                                           # serve.api.TokenEvent, as the engine emits them
    await driver.shutdown()                         # stop admitting, finish running requests, stop

One background thread owns the engine: it applies queued submissions and aborts between scheduler
iterations and calls `engine.step()` while anything is unfinished, so the event loop never waits on a
step (a decode step of a real model is 10–100 ms; a first step that compiles takes seconds). Every engine
call happens on that thread under `_lock` (`stats()` takes the lock from other threads). Each request's
events go to an `asyncio.Queue` on the loop that called `stream`, one `call_soon_threadsafe` per step.

A stream that is closed early — its consumer breaks out, or the task is cancelled because the HTTP
client went away — aborts its request, so the engine frees the slot and KV blocks at its next step.

Admission is bounded: at most `max_slots + max_queue` requests are in flight (running or waiting for a
slot); one more raises `QueueFullError` (HTTP 429) instead of queueing without limit. After `shutdown`
starts, `ShuttingDownError` (HTTP 503).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from serve.api import Request, TokenEvent

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
  """The admission queue is full: retry later (HTTP 429)."""


class ShuttingDownError(RuntimeError):
  """The driver is draining or stopped and admits no new request (HTTP 503)."""


class EngineError(RuntimeError):
  """`engine.step()` raised: every in-flight request fails with this, and the driver stops admitting."""


class _Stream:
  __slots__ = ("loop", "queue")

  def __init__(self, loop: asyncio.AbstractEventLoop):
    self.loop, self.queue = loop, asyncio.Queue()


class AsyncEngine:
  """Runs `engine.step()` on a background thread and streams each request's TokenEvents to asyncio."""

  def __init__(self, engine, *, max_queue: int = 64, max_slots: int | None = None):
    if max_queue < 0:
      raise ValueError(f"max_queue must be ≥ 0, got {max_queue}")
    self.engine = engine
    self.max_slots = int(max_slots if max_slots is not None else getattr(engine, "max_slots", 1))
    self.max_queue = max_queue
    self._lock = threading.Lock()  # every engine call.
    self._cv = threading.Condition()  # guards everything below; wakes the engine thread.
    self._inbox: collections.deque[tuple[str, Any]] = collections.deque()  # ("add", Request) / ("abort", id)
    self._streams: dict[str, _Stream] = {}  # in flight: admitted and not finished.
    self._closing = False  # no new admissions.
    self._stopping = False  # the thread exits once in-flight requests are gone.
    self._error: BaseException | None = None
    self._thread: threading.Thread | None = None

  # --- lifecycle --------------------------------------------------------------------------------------

  def start(self) -> AsyncEngine:
    if self._thread is None:
      self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
      self._thread.start()
    return self

  @property
  def num_in_flight(self) -> int:
    with self._cv:
      return len(self._streams)

  @property
  def accepting(self) -> bool:
    """Started, not draining, not failed: `stream` would admit (queue space permitting)."""
    with self._cv:
      return self._thread is not None and not self._closing and self._error is None

  @property
  def capacity(self) -> int:
    return self.max_slots + self.max_queue

  def close(self, timeout: float | None = None) -> None:
    """Stops admitting, lets in-flight requests finish (aborting them after `timeout` s), joins."""
    with self._cv:
      self._closing = True
      self._cv.notify_all()
      drained = self._cv.wait_for(lambda: not self._streams or self._error is not None, timeout)
      if not drained:
        log.warning("shutdown: aborting %d unfinished requests after %ss", len(self._streams), timeout)
        for rid in list(self._streams):
          self._fail(rid, ShuttingDownError("the server shut down before this request finished"))
          self._inbox.append(("abort", rid))
      self._stopping = True
      self._cv.notify_all()
    if self._thread is not None:
      self._thread.join()

  async def shutdown(self, timeout: float | None = None) -> None:
    """`close` without blocking the event loop (in-flight streams keep being fed meanwhile)."""
    await asyncio.to_thread(self.close, timeout)

  # --- requests ---------------------------------------------------------------------------------------

  def stream(self, request: Request) -> AsyncIterator[TokenEvent]:
    """Admits `request` now (QueueFullError / ShuttingDownError otherwise) and returns an async
    iterator of its TokenEvents; closing it before the last event aborts the request."""
    return self._events(request.request_id, self._submit(request))

  def _submit(self, request: Request) -> asyncio.Queue:
    stream = _Stream(asyncio.get_running_loop())
    with self._cv:
      if self._error is not None:
        raise ShuttingDownError(f"the engine failed: {self._error}")
      if self._closing or self._thread is None:
        raise ShuttingDownError("the server is shutting down" if self._closing
                                else "the engine driver is not started")
      if request.request_id in self._streams:
        raise ValueError(f"request id {request.request_id!r} is already in flight")
      if len(self._streams) >= self.capacity:
        raise QueueFullError(f"too many requests in flight ({len(self._streams)}: {self.max_slots} "
                             f"running + {self.max_queue} queued); retry later")
      self._streams[request.request_id] = stream
      self._inbox.append(("add", request))
      self._cv.notify_all()
    return stream.queue

  def abort(self, request_id: str) -> None:
    """Stops a request (idempotent; thread-safe): its slot and blocks are freed at the next step."""
    with self._cv:
      if self._streams.pop(request_id, None) is not None:
        self._inbox.append(("abort", request_id))
        self._cv.notify_all()

  async def _events(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[TokenEvent]:
    finished = False
    try:
      while True:
        item = await queue.get()
        if isinstance(item, BaseException):
          finished = True
          raise item
        finished = item.finished
        yield item
        if finished:
          return
    finally:
      if not finished:
        self.abort(request_id)

  async def generate(self, request: Request) -> list[TokenEvent]:
    """All of a request's events (`stream`, collected)."""
    async with contextlib.aclosing(self.stream(request)) as events:
      return [ev async for ev in events]

  def stats(self) -> dict:
    """The engine's `stats()` (taken between steps) plus the driver's in-flight count."""
    with self._lock:
      stats = dict(self.engine.stats())
    stats["in_flight"] = self.num_in_flight
    return stats

  # --- the engine thread ------------------------------------------------------------------------------

  def _run(self) -> None:
    idle = True  # the engine has nothing unfinished: sleep until a submission, abort or close.
    while True:
      with self._cv:
        if idle:
          self._cv.wait_for(lambda: self._inbox or self._stopping)
        if self._stopping and not self._inbox and not self._streams:
          break
        inbox, self._inbox = list(self._inbox), collections.deque()
      try:
        with self._lock:
          for kind, arg in inbox:
            self._apply(kind, arg)
          events = self.engine.step() if self.engine.has_unfinished() else []
          idle = not self.engine.has_unfinished()
      except Exception as e:  # pylint: disable=broad-except
        log.exception("engine step failed")
        self._crash(e)
        return
      self._deliver(events)

  def _apply(self, kind: str, arg: Any) -> None:
    """One queued submission or abort (engine thread, under `_lock`)."""
    if kind == "abort":
      self.engine.abort(arg)
      return
    with self._cv:
      if arg.request_id not in self._streams:  # aborted before it reached the engine.
        return
    try:
      self.engine.add_request(arg)
    except ValueError as e:  # empty prompt, or prompt + max_tokens beyond the context.
      with self._cv:
        self._fail(arg.request_id, e)

  def _deliver(self, events: list[TokenEvent]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TokenEvent]]] = {}
    with self._cv:
      for ev in events:
        stream = self._streams.get(ev.request_id)
        if stream is None:  # aborted meanwhile.
          continue
        if ev.finished:
          del self._streams[ev.request_id]
          self._cv.notify_all()  # `close` waits for _streams to empty.
        by_loop.setdefault(stream.loop, []).append((stream.queue, ev))
    for loop, items in by_loop.items():
      _call_soon(loop, _put_all, items)

  def _fail(self, request_id: str, error: BaseException) -> None:
    """Ends one stream with `error` (caller holds `_cv`)."""
    stream = self._streams.pop(request_id, None)
    if stream is not None:
      _call_soon(stream.loop, _put_all, [(stream.queue, error)])
      self._cv.notify_all()

  def _crash(self, error: Exception) -> None:
    with self._cv:
      self._error = error
      for rid in list(self._streams):
        self._fail(rid, EngineError(f"the engine failed: {type(error).__name__}: {error}"))
      self._cv.notify_all()


def _put_all(items) -> None:
  for queue, item in items:
    queue.put_nowait(item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
  try:
    loop.call_soon_threadsafe(fn, *args)
  except RuntimeError:  # that loop is closed: its consumer is gone, nothing to deliver to.
    pass
