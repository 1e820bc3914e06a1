"""The serving engine's request/response types: what the HTTP server, benchmarks and alignment rollouts
hand to `serve.engine.Engine` and get back from it.

The engine works on token ids only; text (detokenization, stop strings, chat rendering) is the
server's job (`serve/server.py`), so one engine serves any tokenizer.

    engine.add_request(Request("r1", prompt_ids, SamplingParams(max_tokens=64, temperature=0.7, seed=1)))
    while engine.has_unfinished():
      for ev in engine.step():          # one scheduler iteration: prefill chunks + decode tokens per slot
        ...ev.request_id, ev.token_id, ev.finished, ev.finish_reason
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_tokens: int = 16
  temperature: float = 1.0  # 0: greedy.
  top_k: int = 0  # 0: off.
  top_p: float = 1.0  # 1.0: off.
  seed: int | None = None  # same seed → same tokens, whatever else shares the batch.
  stop_token_ids: tuple[int, ...] = ()  # besides the engine's EOS; the stop token is emitted, then finished.
  logprobs: int | None = None  # None: none; 0: the sampled token's log-prob; n: also the top-n alternatives.

  def __post_init__(self):
    if self.max_tokens < 1:
      raise ValueError(f"max_tokens must be ≥ 1, got {self.max_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be ≥ 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.logprobs is not None and not 0 <= self.logprobs <= 20:
      raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")


@dataclasses.dataclass(frozen=True)
class Request:
  request_id: str
  prompt_ids: tuple[int, ...]
  params: SamplingParams = SamplingParams()


@dataclasses.dataclass(frozen=True)
class TokenEvent:
  """One generated token of one request: at most one per request per step, or with a speculative draft up
  to spec_k + 1 (in order; none after the one with `finished`)."""
  request_id: str
  token_id: int
  logprob: float | None = None  # log p(token) under the (temperature-1, unfiltered) model distribution.
  top_logprobs: tuple[tuple[int, float], ...] | None = None  # (token id, log-prob), best first.
  finished: bool = False
  finish_reason: str | None = None  # "stop" (EOS / stop token) or "length" (max_tokens or context).
