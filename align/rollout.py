"""Chat replies sampled from a model: the one sampling helper of the align stages.

Library module (used by `align/sft.py`'s format check, `align/constitution.py`, GRPO rollouts):

    replies = chat_replies(model, tokenizer, [conversation, ...], max_new_tokens=128, temperature=0.8)
    replies[0].text, replies[0].ended, replies[0].ids

Each conversation ends with a user turn; it is rendered with the chat format's generation header
(`data.chat.render_prompt`) and left-truncated so prompt + reply fit the model's context, then the batched
KV-cache sampler (`train.sample.generate_ids`) runs with `<|end|>` as its stop token. `ended` is True when
the reply stopped at `<|end|>` before `max_new_tokens` and holds no other control token — the chat
format's notion of a finished turn.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from data import chat
from train.sample import generate_ids


@dataclasses.dataclass(frozen=True)
class Reply:
  text: str
  ended: bool
  ids: tuple[int, ...]


def chat_replies(model, tokenizer, conversations: Sequence[Sequence[dict]], *, max_new_tokens: int = 128,
                 temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0, seed: int = 0,
                 context: int | None = None, batch_size: int = 32) -> list[Reply]:
  context = min(context or model.cfg.max_seq_len, model.cfg.max_seq_len)
  keep = context - max_new_tokens
  if keep < 2:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a {context}-token context")
  end = chat.end_id(tokenizer)
  prompts = []
  for conv in conversations:
    ids = chat.render_prompt(list(conv), tokenizer)
    prompts.append(ids if len(ids) <= keep else [ids[0]] + ids[len(ids) - keep + 1:])  # keep BOS.
  controls = set(tokenizer.special_ids.values()) | {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
  out: list[Reply] = []
  for start in range(0, len(prompts), batch_size):
    rows = generate_ids(model, prompts[start:start + batch_size], eos_id=end, pad_id=tokenizer.pad_id,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed + start)
    for row in rows:  # generate_ids cuts before the stop id: a short row is one that produced <|end|>.
      clean = not set(row) & controls
      text, _ = chat.parse_reply(row, tokenizer)
      out.append(Reply(text=text, ended=len(row) < max_new_tokens and clean, ids=tuple(row)))
  return out
