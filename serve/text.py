"""Token ids → text for streaming: incremental detokenization and stop strings.

Library module, no entry point; `serve/server.py` runs one `TextStream` per generated sequence:

    ts = TextStream(tokenizer, prompt_ids, stop=["\\n\\n"])
    for ev in events:                       # serve.api.TokenEvent, one token at a time
      delta = ts.push(ev.token_id)          # text that is final now ("" while a character or a possible
      ...                                   # stop string is still incomplete)
      if ts.stopped: break                  # a stop string appeared: abort the engine request
    delta += ts.finish()                    # the held-back rest (never part of a stop string)

Why not `decode(new_id)` per token: SentencePiece pieces carry their leading space ("▁the"), a tokenizer
with a dummy prefix (Llama 2's) drops the space of the *first* piece of a decoded sequence, and a
character outside the vocabulary arrives as 1–4 byte-fallback tokens whose partial decodes are U+FFFD.
So, as Hugging Face text-generation-inference's `decode_token` does, each step decodes a short window
ending at the new token twice — with and without it — and emits the difference once it no longer ends in
U+FFFD; the window starts a few tokens back (the prompt's tail at first) so the leading-space rule sees
the same context as the full text. Each token costs two decodes of ≤ ~6 + (held-back) tokens, not a
re-decode of the whole reply.

Stop strings follow OpenAI's semantics: generation stops at the first occurrence of any of them in the
generated text (not the prompt), and the text returned ends just before it. Text that could still be
the start of a stop string is held back (only the longest such suffix, not a fixed max-length window),
so a streaming client never receives characters that later turn out to belong to a stop string.
"""
from __future__ import annotations

from collections.abc import Sequence

# Tokens of prompt context before the first generated token: enough for a leading-space rule or a
# partial UTF-8 character at the prompt's end (a character is at most 4 byte tokens), as TGI uses 5.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Detokenizer:
  """Incremental ids → text: `push(id)` returns the newly completed text (maybe "")."""

  def __init__(self, tokenizer, prompt_ids: Sequence[int] = ()):
    self._tok = tokenizer
    context = [int(i) for i in prompt_ids[-_CONTEXT_TOKENS:]]
    self._ids = context
    # ids[prefix:read] is text already emitted (or prompt context); ids[read:] is not emitted yet.
    self._prefix, self._read = 0, len(context)

  def push(self, token_id: int) -> str:
    self._ids.append(int(token_id))
    return self._emit(final=False)

  def finish(self) -> str:
    """Whatever is left, even an incomplete character (as U+FFFD, like `tokenizer.decode` would)."""
    return self._emit(final=True)

  def _emit(self, final: bool) -> str:
    prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
    text = self._tok.decode(self._ids[self._prefix:])
    if len(text) <= len(prefix_text) or (text.endswith(_REPLACEMENT) and not final):
      return ""  # nothing new (a control token) or a character still waiting for its next byte.
    # By length, as TGI does: should the new token change how the window's start decodes, that
    # text is already on the client's screen either way.
    delta = text[len(prefix_text):]
    self._prefix, self._read = self._read, len(self._ids)
    return delta


class StopMatcher:
  """Finds OpenAI-style stop strings in streamed text, holding back what could be a stop's start."""

  def __init__(self, stop: Sequence[str] = ()):
    self.stop = tuple(s for s in stop if s)
    self._pending = ""
    self.stopped = False

  def push(self, text: str) -> str:
    """The part of `text` (with what was held back) that is now safe to emit; sets `stopped`."""
    if self.stopped:
      return ""
    pending = self._pending + text
    if not self.stop:
      return pending
    hits = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
    if hits:
      self.stopped = True
      self._pending = ""
      return pending[:min(hits)]
    hold = self._held_suffix(pending)
    self._pending = pending[len(pending) - hold:]
    return pending[:len(pending) - hold]

  def finish(self) -> str:
    rest, self._pending = ("" if self.stopped else self._pending), ""
    return rest

  def _held_suffix(self, text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in self.stop:
      for k in range(min(len(s) - 1, len(text)), best, -1):
        if text.endswith(s[:k]):
          best = k
          break
    return best


class TextStream:
  """Detokenizer + StopMatcher for one generated sequence."""

  def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()):
    self._detok = Detokenizer(tokenizer, prompt_ids)
    self._stops = StopMatcher(stop)
    self.text = ""  # everything emitted so far.

  @property
  def stopped(self) -> bool:
    return self._stops.stopped

  def push(self, token_id: int) -> str:
    return self._out(self._stops.push(self._detok.push(token_id)))

  def finish(self) -> str:
    """The rest of the text at the end of generation ("" after a stop string)."""
    if self.stopped:
      return ""
    tail = self._stops.push(self._detok.finish())
    return self._out(tail + self._stops.finish())

  def _out(self, delta: str) -> str:
    self.text += delta
    return delta


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
  """(text, UTF-8 bytes) of one token for logprobs, as OpenAI reports them.

  A byte-fallback piece (`<0xE2>`) decodes alone to U+FFFD: its text is then the piece name and its
  bytes the one raw byte, so a client can still rebuild the exact text from `bytes`.
  """
  text = tokenizer.decode([token_id])
  if _REPLACEMENT not in text:
    return text, list(text.encode("utf-8"))
  piece = tokenizer.id_to_piece(token_id)
  if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
    return piece, [int(piece[3:5], 16)]
  return piece, list(text.encode("utf-8"))
