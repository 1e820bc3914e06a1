"""Preference pairs as padded arrays for DPO-family training and reward models.

Library module, no entry point (`align/dpo.py` and `align/reward.py` use it):

    pairs, counts = data.sft.hh_rlhf_pairs()                    # or load_pairs("prefs.jsonl")
    arrays, counts = pair_arrays(pairs, tokenizer, seq_len=512)
    arrays["chosen_inputs"]  # [N, seq_len]; also *_targets, *_positions, *_segment_ids, *_loss_mask

A pair is `{"prompt": conversation ending in a user turn, "chosen": str, "rejected": str}`. Each side
is rendered with the chat format (`data/chat.py`): the prompt with the generation header `<|assistant|>`,
then the reply and `<|end|>`; the loss mask covers the reply and its `<|end|>` only, so summed masked
log-probs are log π(y | x). One pair per row, right-padded (segment id 0 marks padding). A side longer
than `seq_len` loses prompt tokens from the left (the reply is what is compared; TRL's "keep_end"); a
pair whose reply alone leaves fewer than `min_prompt` prompt tokens is dropped. Both are counted:
counts["read"] == counts["kept"] + sum(counts["dropped"].values()).

JSONL files (`load_pairs`): one `{"prompt": str | "messages": [...], "chosen": str, "rejected": str}`
per line; a line with a missing field, an empty reply, or a prompt not ending in a user turn is a
`DataError` naming file:line (or, with `skip_invalid=True`, a counted drop).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import numpy as np

from data import chat
from data.errors import DataError

SIDES = ("chosen", "rejected")
FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def load_pairs(path: str | pathlib.Path, *, limit: int | None = None, skip_invalid: bool = False
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path}: preference file not found")
  pairs: list[dict[str, Any]] = []
  counts: dict[str, Any] = dict(read=0, kept=0, dropped={})
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      if limit is not None and counts["read"] >= limit:
        break
      counts["read"] += 1
      where = f"{path}:{lineno}"
      try:
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise chat.ChatFormatError("invalid_json", f"{where}: invalid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
          raise chat.ChatFormatError("bad_record", f"{where}: expected a JSON object")
        if "messages" in obj:
          prompt = obj["messages"]
        elif isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
          prompt = [dict(role="user", content=obj["prompt"])]
        else:
          raise chat.ChatFormatError("missing_prompt", f"{where}: needs a non-empty 'prompt' or 'messages'")
        chat.validate(prompt, where, require_assistant=False)
        prompt = chat.normalize(prompt)
        if prompt[-1]["role"] != "user":
          raise chat.ChatFormatError("prompt_not_user", f"{where}: the prompt must end with a user turn")
        for side in SIDES:
          if not isinstance(obj.get(side), str) or not obj[side].strip():
            raise chat.ChatFormatError(f"empty_{side}", f"{where}: field {side!r} must be a non-empty string")
        pairs.append(dict(prompt=prompt, chosen=obj["chosen"], rejected=obj["rejected"]))
      except chat.ChatFormatError as e:
        if not skip_invalid:
          raise
        counts["dropped"][e.reason] = counts["dropped"].get(e.reason, 0) + 1
  counts["kept"] = len(pairs)
  if not pairs:
    raise DataError(f"{path}: no valid preference pair")
  return pairs, counts


def render_side(prompt: Sequence[dict], reply: str, tokenizer) -> tuple[list[int], list[int]]:
  """(ids, loss mask over the reply and its <|end|>) of one side of a pair."""
  head = chat.render_prompt(list(prompt), tokenizer)
  tail = tokenizer.encode(reply) + [chat.end_id(tokenizer)]
  return head + tail, [0] * len(head) + [1] * len(tail)


def _row(ids: list[int], mask: list[int], seq_len: int) -> tuple[dict[str, list[int]], bool]:
  """One right-padded next-token row of a rendered sequence, cut from the left (BOS kept) to fit."""
  truncated = len(ids) > seq_len + 1
  if truncated:
    cut = len(ids) - (seq_len + 1)
    ids, mask = [ids[0]] + ids[1 + cut:], [mask[0]] + mask[1 + cut:]  # keep BOS, drop old context.
  n = len(ids) - 1
  pad = seq_len - n
  return dict(inputs=ids[:-1] + [0] * pad, targets=ids[1:] + [0] * pad, positions=list(range(n)) + [0] * pad,
              segment_ids=[1] * n + [0] * pad,
              loss_mask=mask[1:] + [0] * pad), truncated  # mask[t+1]: is targets[t] a reply token?


def mismatched_arrays(arrays: dict[str, np.ndarray], side: str = "chosen", shift: int = 1,
                      prefix: str = "kl_") -> dict[str, np.ndarray]:
  """Rows pairing each row's prompt with the `side` reply of row (i + shift) mod N, as `<prefix><field>`.

  KTO's reference point z0 = KL(π‖π_ref) is estimated on such mismatched (x, y') pairs (Ethayarajh et
  al. 2024 §4.1; TRL shifts the completions within a batch). Built from the padded token rows of
  `pair_arrays`, so no text is re-rendered; a row longer than seq_len loses prompt tokens from the left.
  """
  inputs, targets, masks = (arrays[f"{side}_{f}"] for f in ("inputs", "targets", "loss_mask"))
  n, seq_len = inputs.shape
  prompts, replies = [], []
  for i in range(n):
    length = int(arrays[f"{side}_segment_ids"][i].sum())
    full = [int(inputs[i, 0])] + targets[i, :length].tolist()  # the rendered ids of row i.
    first = int(np.argmax(masks[i] > 0)) + 1  # full[first] is the reply's first token.
    prompts.append(full[:first])
    replies.append(full[first:])
  rows: dict[str, list] = {f: [] for f in FIELDS}
  for i in range(n):
    reply = replies[(i + shift) % n]
    row, _ = _row(prompts[i] + reply, [0] * len(prompts[i]) + [1] * len(reply), seq_len)
    for f in FIELDS:
      rows[f].append(row[f])
  return {prefix + f: np.asarray(v, np.int32).reshape(-1, seq_len) for f, v in rows.items()}


def pair_arrays(pairs: Sequence[dict[str, Any]], tokenizer, seq_len: int, *, min_prompt: int = 8
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Rows [N, seq_len] per side (`<side>_<field>`) plus `chosen_len`/`rejected_len` (reply tokens)."""
  rows: dict[str, list] = {f"{s}_{f}": [] for s in SIDES for f in FIELDS}
  lens: dict[str, list] = {f"{s}_len": [] for s in SIDES}
  counts: dict[str, Any] = dict(read=len(pairs), kept=0, truncated=0, dropped={})
  for pair in pairs:
    sides = {s: render_side(pair["prompt"], pair[s], tokenizer) for s in SIDES}
    # Inputs are ids[:-1] (the last token is only a target): a side fits when len(ids) ≤ seq_len + 1.
    reply = {s: sum(m) for s, (_, m) in sides.items()}
    if any(len(ids) - reply[s] < 1 or seq_len + 1 - reply[s] < min_prompt
           for s, (ids, _) in sides.items()):
      counts["dropped"]["reply_too_long"] = counts["dropped"].get("reply_too_long", 0) + 1
      continue
    truncated = False
    for s, (ids, mask) in sides.items():
      row, cut = _row(ids, mask, seq_len)
      for f in FIELDS:
        rows[f"{s}_{f}"].append(row[f])
      lens[f"{s}_len"].append(reply[s])
      truncated |= cut
    counts["truncated"] += truncated
    counts["kept"] += 1
  arrays = {k: np.asarray(v, np.int32).reshape(-1, seq_len) for k, v in rows.items()}
  arrays.update({k: np.asarray(v, np.float32) for k, v in lens.items()})
  return arrays, counts
