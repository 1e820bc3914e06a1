"""The chat format: conversations -> token ids + loss mask, with the project tokenizer's control tokens.

Library module, no entry point; SFT/DPO (`align/`) and chat sampling use it. Usage:

  conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
  ids, loss_mask = render(conv, tok)                 # training example
  prompt = render_prompt(conv[:1], tok)              # ends in <|assistant|>: sample from here,
  reply, ended = parse_reply(sampled_ids, tok)       # stopping at end_id(tok)

A conversation is a list of turns `{"role": "system" | "user" | "assistant", "content": str}`. Layout:
`<s>`, then per turn the role's control token, the content's ordinary tokens, and `<|end|>`:

  [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
   {"role": "assistant", "content": "4"}]
  ids        <s> <|system|> Be ▁brief . <|end|> <|user|> 2 + 2 ? <|end|> <|assistant|> 4 <|end|>
  loss_mask   0      0       0   0    0    0       0     0 0 0 0    0          0       1    1
  (content pieces are illustrative: they depend on the learned vocabulary; the ids are 1, 4, ..., 7,
  5, ..., 7, 6, ..., 7 for <s>, <|system|>, <|end|>, <|user|>, <|assistant|>)

The mask is 1 on the assistant's content *and its <|end|>* (so the model learns to stop: the sampler stops
on `end_id`), 0 on <s>, role headers and system/user text: the model is trained to answer, not to write
the user's turns. The mask is aligned with `ids` (mask[t] is about ids[t]); the packer (`data.sft.pack`)
shifts it onto next-token targets. `render(..., add_generation_prompt=True)` appends `<|assistant|>` after
a conversation that ends with a user (or system) turn: the prompt a reply is sampled from.

The control tokens are ids 4..7 of the project's SentencePiece tokenizer (`data.tokenizer`), inserted by
id: text never encodes to them, so a user typing "<|end|>" cannot forge a turn. A tokenizer without them
(a Hugging Face model's, `data.foreign_tokenizer`) is refused with a DataError: such a model was trained
with its own chat template, which this module does not implement.

Bad conversations raise `ChatFormatError` (a `DataError`) naming `where` (file:line for loaders) and
carrying a short `reason` code, which loaders count when they skip invalid records (`data.sft`).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from data.errors import DataError
from data.tokenizer import CHAT_TOKENS

ROLES = ("system", "user", "assistant")
# role -> control token piece; CHAT_TOKENS is (<|system|>, <|user|>, <|assistant|>, <|end|>).
_ROLE_PIECES = dict(zip(ROLES, CHAT_TOKENS[:3]))
_END_PIECE = CHAT_TOKENS[3]

Conversation = list[dict[str, str]]


class ChatFormatError(DataError):
  """A conversation that breaks the chat format; `reason` is a short code for drop counts."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


# --- the tokenizer's control ids --------------------------------------------------------------------

def _control_ids(tokenizer) -> dict[str, int]:
  """{"system", "user", "assistant", "end"} -> id; DataError for a tokenizer without the chat tokens."""
  special = getattr(tokenizer, "special_ids", None)
  if not isinstance(special, dict) or any(p not in special for p in CHAT_TOKENS):
    raise DataError(
        f"{tokenizer!r} has no chat control tokens {list(CHAT_TOKENS)}: the chat format needs the "
        "project's SentencePiece tokenizer (data.tokenizer.train_tokenizer). A model imported from "
        "Hugging Face was trained with its own chat template, which data.chat does not implement")
  ids = {role: special[p] for role, p in _ROLE_PIECES.items()}
  ids["end"] = special[_END_PIECE]
  return ids


def end_id(tokenizer) -> int:
  """The id of <|end|>: the token that ends every turn, and the sampler's stop token for chat."""
  return _control_ids(tokenizer)["end"]


# --- validation -------------------------------------------------------------------------------------

def _problem(conversation: Any, require_assistant: bool) -> tuple[str, str] | None:
  """(reason, message) for the first thing wrong with `conversation`, or None."""
  if not isinstance(conversation, list):
    return "not_list", f"a conversation is a list of turns, got {type(conversation).__name__}"
  if not conversation:
    return "no_turns", "conversation has no turns"
  prev = None
  for i, turn in enumerate(conversation):
    if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
      got = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
      return "bad_turn", f"turn {i}: expected an object with 'role' and 'content', got {got}"
    role, content = turn["role"], turn["content"]
    if role not in ROLES:
      return "unknown_role", f"turn {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})"
    if not isinstance(content, str):
      return "bad_content", f"turn {i} ({role}): content must be a string, got {type(content).__name__}"
    if not content.strip():
      return "empty_content", f"turn {i} ({role}): empty content"
    if role == "system" and i > 0:
      return "system_not_first", f"turn {i}: a system turn may only be the first turn"
    if role == prev:
      return "repeated_role", f"turns {i - 1} and {i} are both {role} turns (roles must alternate)"
    prev = role
  if require_assistant and not any(t["role"] == "assistant" for t in conversation):
    return "no_assistant", "conversation has no assistant turn (nothing to train on)"
  return None


def validate(conversation: Any, where: str, *, require_assistant: bool = True) -> None:
  """ChatFormatError naming `where` unless `conversation` is a valid list of turns.

  Checks: a list of {"role", "content"} objects; roles in ROLES; content a non-blank string; a system
  turn only first; no two consecutive turns of the same role; at least one assistant turn (unless
  `require_assistant=False`, for prompts).
  """
  problem = _problem(conversation, require_assistant)
  if problem is not None:
    reason, message = problem
    raise ChatFormatError(reason, f"{where}: {message}")


# --- rendering --------------------------------------------------------------------------------------

def render(conversation: Conversation, tokenizer, *, add_generation_prompt: bool = False,
           where: str = "conversation") -> tuple[list[int], list[int]]:
  """(ids, loss_mask) of `conversation` in the layout of the module docstring.

  With `add_generation_prompt=True` the conversation may lack an assistant turn, must not end with one,
  and `<|assistant|>` (mask 0) is appended. Raises ChatFormatError for an invalid conversation and
  DataError for a tokenizer without the chat control tokens.
  """
  control = _control_ids(tokenizer)
  validate(conversation, where, require_assistant=not add_generation_prompt)
  if add_generation_prompt and conversation[-1]["role"] == "assistant":
    raise ChatFormatError("repeated_role", f"{where}: add_generation_prompt after an assistant turn "
                                           "would start a second assistant turn")
  ids, mask = [tokenizer.bos_id], [0]
  for turn in conversation:
    trained = int(turn["role"] == "assistant")
    content = tokenizer.encode(turn["content"])
    ids += [control[turn["role"]], *content, control["end"]]
    mask += [0] + [trained] * (len(content) + 1)
  if add_generation_prompt:
    ids.append(control["assistant"])
    mask.append(0)
  return ids, mask


def render_prompt(conversation: Conversation, tokenizer) -> list[int]:
  """The ids to sample an assistant reply from: render(..., add_generation_prompt=True)'s ids."""
  return render(conversation, tokenizer, add_generation_prompt=True)[0]


def parse_reply(ids: Iterable[int], tokenizer) -> tuple[str, bool]:
  """(text, ended) of a sampled reply (the ids generated after `render_prompt`).

  The reply is cut at the first control or special token: `ended` is True only when that token is
  <|end|>. Any other (a role header, <s>, </s>, <pad>) or running out of ids means the model did not
  finish its turn properly (the "replies end with <|end|>" metric counts these as failures).
  """
  control = _control_ids(tokenizer)
  stops = set(control.values()) | {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
  ids = [int(i) for i in ids]
  for n, i in enumerate(ids):
    if i in stops:
      return tokenizer.decode(ids[:n]), i == control["end"]
  return tokenizer.decode(ids), False


# --- building conversations -------------------------------------------------------------------------

def from_prompt_response(prompt: str, response: str, system: str | None = None, *,
                         where: str = "prompt/response") -> Conversation:
  """[system?, user: prompt, assistant: response], validated (ChatFormatError naming `where`)."""
  conv = [] if system is None else [{"role": "system", "content": system}]
  conv += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
  validate(conv, where)
  return conv


# "\n\nHuman: " / "\n\nAssistant: " turn markers (Bai et al. 2022, HH-RLHF); the first turn may lack
# the leading blank line. The space after the colon is optional: contents are stripped anyway.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def from_hh_rlhf(text: str, where: str = "hh-rlhf dialogue") -> Conversation:
  """An HH-RLHF dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ...") as a validated conversation.

  Contents are stripped. ChatFormatError naming `where` when the text has no turns, has text before the
  first turn, or breaks the chat format (an empty turn, two consecutive Assistant turns).
  """
  if not isinstance(text, str):
    raise ChatFormatError("bad_dialogue", f"{where}: dialogue must be a string, got "
                                          f"{type(text).__name__}")
  parts = _HH_TURN.split(text)
  if len(parts) < 3:
    raise ChatFormatError("bad_dialogue", f"{where}: no '\\n\\nHuman:' / '\\n\\nAssistant:' turns "
                                          f"in {text[:60]!r}")
  if parts[0].strip():
    raise ChatFormatError("bad_dialogue", f"{where}: text before the first turn: {parts[0][:60]!r}")
  conv = [{"role": _HH_ROLES[role], "content": content.strip()}
          for role, content in zip(parts[1::2], parts[2::2])]
  validate(conv, where)
  return conv


def normalize(conversation: Sequence[dict[str, Any]]) -> Conversation:
  """Fresh {"role", "content"} dicts (drops extra keys such as "name"); validate first."""
  return [{"role": t["role"], "content": t["content"]} for t in conversation]
