"""The OpenAI wire format: request schemas (pydantic), error bodies, and response/chunk builders.

Library module, no entry point; `serve/server.py` parses request bodies with `parse` and answers with
the builders here. Requests follow OpenAI's `/v1/completions` and `/v1/chat/completions` fields; what
this server does not implement is refused with a 400 naming the field (n > 1, echo, suffix, logit_bias,
penalties, tools, non-text content) rather than silently ignored. `top_k` is an extension (vLLM's).

Validation is strict (JSON types as written: "5" is not an integer, 1 is not a boolean) and unknown
fields are errors, as OpenAI's API answers them: a client's typo'd field gets a message, not a default.
"""
from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# OpenAI allows up to 4 stop sequences; longer lists only slow the per-token scan.
MAX_STOP = 4
MAX_LOGPROBS = 20  # serve.api.SamplingParams' bound (OpenAI: 5 for completions, 20 for chat).


class APIError(Exception):
  """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

  def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

  def body(self) -> dict:
    return error_body(self.message, kind=self.kind, param=self.param, code=self.code)


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
  """OpenAI's error object; `kind` is its "type" field."""
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- requests ---------------------------------------------------------------------------------------

class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
  include_usage: bool = False


class _Common(_Strict):
  model: str
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int = Field(0, ge=-1)  # extension; 0 or -1: off (vLLM uses -1).
  seed: int | None = None
  stop: Any = None  # str | list[str]: checked by `stop_strings` for a clearer message than a union's.
  n: int = 1
  stream: bool = False
  stream_options: StreamOptions | None = None
  user: str | None = None  # accepted and ignored, as it only labels the caller for abuse monitoring.
  frequency_penalty: float | None = None
  presence_penalty: float | None = None
  logit_bias: dict[str, float] | None = None


class CompletionRequest(_Common):
  prompt: Any  # str | list[str] | list[int] | list[list[int]]: checked by the server.
  max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions.
  logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
  echo: bool = False
  best_of: int | None = None
  suffix: str | None = None


class TextPart(_Strict):
  type: Literal["text"]
  text: str


class ChatMessage(_Strict):
  role: str
  content: str | list[TextPart]
  name: str | None = None

  def text(self) -> str:
    return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Common):
  messages: list[ChatMessage] = Field(min_length=1)
  max_tokens: int | None = Field(None, ge=1)  # default: the rest of the context.
  max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens.
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def _loc(loc: tuple) -> str:
  return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))


def parse(model_cls: type[_Strict], raw: bytes) -> Any:
  """`model_cls` from a JSON body; APIError 400 naming the first problems otherwise."""
  try:
    return model_cls.model_validate_json(raw or b"")
  except ValidationError as e:
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
      raise APIError(400, f"invalid JSON body: {first['msg'].removeprefix('Invalid JSON: ')}") from None
    if not first["loc"]:
      raise APIError(400, f"the request body must be a JSON object: {first['msg']}") from None
    parts = []
    for err in errors[:3]:
      msg = "unknown field (not supported by this server)" if err["type"] == "extra_forbidden" else err["msg"]
      parts.append(f"{_loc(err['loc'])}: {msg}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    raise APIError(400, "; ".join(parts) + more, param=_loc(first["loc"][:1])) from None


def check_unsupported(req: _Common) -> None:
  """400 for OpenAI fields set to values this server does not implement."""
  if req.n != 1:
    raise APIError(400, f"n={req.n} is not supported: only n=1 (send the request n times)", param="n")
  for name in ("frequency_penalty", "presence_penalty"):
    if getattr(req, name) not in (None, 0, 0.0):
      raise APIError(400, f"{name} is not supported (only 0)", param=name)
  if req.logit_bias:
    raise APIError(400, "logit_bias is not supported", param="logit_bias")
  if isinstance(req, CompletionRequest):
    if req.echo:
      raise APIError(400, "echo is not supported", param="echo")
    if req.best_of not in (None, 1):
      raise APIError(400, "best_of is not supported (only 1)", param="best_of")
    if req.suffix:
      raise APIError(400, "suffix is not supported", param="suffix")


def stop_strings(stop: Any) -> list[str]:
  if stop is None:
    return []
  if isinstance(stop, str):
    stop = [stop]
  if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
    raise APIError(400, "stop: expected a string or a list of strings", param="stop")
  if len(stop) > MAX_STOP:
    raise APIError(400, f"stop: at most {MAX_STOP} sequences, got {len(stop)}", param="stop")
  return [s for s in stop if s]


# --- responses --------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, choices: list[dict], usage_: dict | None,
               chunk: bool = False) -> dict:
  out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
         "choices": choices}
  if usage_ is not None or not chunk:
    out["usage"] = usage_
  return out


def chat(rid: str, model: str, choices: list[dict], usage_: dict | None, chunk: bool = False) -> dict:
  out = {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion",
         "created": int(time.time()), "model": model, "choices": choices}
  if usage_ is not None or not chunk:
    out["usage"] = usage_
  return out


def sse(obj: dict | str) -> str:
  """One server-sent event: `data: <json>` and a blank line (OpenAI ends a stream with `[DONE]`)."""
  data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
  return f"data: {data}\n\n"


# One generated token for logprobs: (text, UTF-8 bytes, logprob, [(text, bytes, logprob) alternatives]).
TokenLogprob = tuple[str, list[int], float, list[tuple[str, list[int], float]]]


def completion_logprobs(entries: list[TokenLogprob], offset: int, top: bool) -> dict:
  """/v1/completions' legacy shape: parallel lists; `text_offset` counts characters of the reply."""
  tokens, offsets = [], []
  for text, _, _, _ in entries:
    tokens.append(text)
    offsets.append(offset)
    offset += len(text)
  return {"tokens": tokens, "token_logprobs": [lp for _, _, lp, _ in entries],
          "top_logprobs": [{t: lp for t, _, lp in alts} for *_, alts in entries] if top else None,
          "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
  return {"content": [{"token": text, "logprob": lp, "bytes": b,
                       "top_logprobs": [{"token": t, "logprob": l, "bytes": bb} for t, bb, l in alts]}
                      for text, b, lp, alts in entries],
          "refusal": None}
