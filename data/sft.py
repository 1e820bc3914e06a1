"""SFT data: conversation loaders (JSONL, GSM8K, HH-RLHF), packing into rows, and shuffled batches.

Library module, no entry point; `align/` (SFT, DPO) uses it. Usage:

  convs, counts = load_conversations("sft.jsonl")            # or gsm8k_conversations("train")
  examples = [chat.render(c, tok) for c in convs]            # (ids, loss_mask) per conversation
  packed, pack_counts = pack(examples, seq_len=1024)         # dict of [N, seq_len] arrays
  for batch in batches(packed, batch_size=16, seed=0, epochs=2): ...

Loaders return `(conversations, counts)` with counts `{"read", "kept", "dropped": {reason: n}}` and
`read == kept + sum(dropped.values())` (the project's convention, see data/shards.py). `limit` is the
number of records read from the start of the file.

JSONL records are either `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "response"(, "system")}`
(other keys are ignored). By default the first invalid line raises a DataError naming file:line; with
`skip_invalid=True` it is counted under its reason (`chat.ChatFormatError.reason`, or `not_utf8`,
`invalid_json`, `not_object`, `unknown_record`) and skipped.

Packed rows have the meaning of the pretraining batches (data/pipeline.py): `inputs` tokens,
`targets[t] = inputs[t+1]`, `segment_ids` 1.. per conversation in its row (0 = padding), `positions`
restarting at 0 per conversation, and `loss_mask[t]` (float32) saying whether `targets[t]` is trained.
The render mask is about `ids[t]`; the packer shifts it: `loss_mask[t] = render_mask[t+1]` inside a
conversation, 0 at a conversation's last token (its target would be the next conversation's first
token) and on padding. Example, one conversation [<s> <|user|> hi <|end|> <|assistant|> yo <|end|>]
with render mask [0 0 0 0 0 1 1] in a row of 8:

  inputs       <s> <|user|> hi <|end|> <|assistant|> yo    <|end|> <pad>
  targets      <|user|> hi <|end|> <|assistant|> yo <|end|> <pad>  <pad>
  loss_mask     0    0   0     0          1       1     0      0
  segment_ids   1    1   1     1          1       1     1      0
  positions     0    1   2     3          4       5     6      0

Unlike pretraining, a conversation is never split across rows (a reply without its prompt teaches
nothing): each conversation of n <= seq_len tokens fills n positions of one row (its last token is only
an input, with no target; that costs 1 position per conversation). Rows are filled by first-fit
decreasing (Johnson 1973: at most 11/9 OPT + 6/9 rows).
"""
from __future__ import annotations

import gzip
import json
import pathlib
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from data import chat
from data.errors import DataError
from data.tasks import gsm8k, shared_data_dir

HH_RLHF = "preference/hh_rlhf_harmless_test.jsonl.gz"  # under shared_data_dir()
FEATURES = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


# --- counting ---------------------------------------------------------------------------------------

def _new_counts() -> dict[str, Any]:
  return {"read": 0, "kept": 0, "dropped": {}}


def _drop(counts: dict[str, Any], reason: str) -> None:
  counts["dropped"][reason] = counts["dropped"].get(reason, 0) + 1


# --- JSONL records ----------------------------------------------------------------------------------

def _records(path: pathlib.Path, limit: int | None) -> Iterator[tuple[str, Any]]:
  """(where, object) per non-blank line, at most `limit`; a line that isn't a JSON object yields
  (where, ChatFormatError) so the caller decides whether to raise or count it."""
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0, got {limit}")
  if not path.is_file():
    raise DataError(f"{path}: file not found")
  opener = gzip.open if path.suffix == ".gz" else open
  n = 0
  try:
    # Binary lines decoded one at a time, so a bad byte is blamed on its own line.
    with opener(path, "rb") as f:
      for line_no, raw in enumerate(f, start=1):
        if limit is not None and n >= limit:
          return
        where = f"{path}:{line_no}"
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          n += 1
          yield where, chat.ChatFormatError("not_utf8", f"{where}: not UTF-8 ({e.reason} at byte "
                                                        f"{e.start})")
          continue
        if not line.strip():
          continue
        n += 1
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          yield where, chat.ChatFormatError("invalid_json", f"{where}: invalid JSON ({e.msg} at "
                                                            f"column {e.colno})")
          continue
        if not isinstance(obj, dict):
          yield where, chat.ChatFormatError("not_object", f"{where}: expected a JSON object, got "
                                                          f"{type(obj).__name__}")
          continue
        yield where, obj
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise DataError(f"{path}: corrupt gzip stream ({e})") from None


def _record_conversation(obj: dict[str, Any], where: str) -> chat.Conversation:
  if "messages" in obj and ("prompt" in obj or "response" in obj):
    raise chat.ChatFormatError("unknown_record", f"{where}: record has both 'messages' and "
                                                 "'prompt'/'response'; use one format")
  if "messages" in obj:
    chat.validate(obj["messages"], where)
    return chat.normalize(obj["messages"])
  if "prompt" in obj and "response" in obj:
    return chat.from_prompt_response(obj["prompt"], obj["response"], obj.get("system"), where=where)
  raise chat.ChatFormatError("unknown_record", f"{where}: expected {{'messages': [...]}} or "
                                               f"{{'prompt', 'response'}}, got keys {sorted(obj)}")


def load_conversations(path: str | pathlib.Path, *, limit: int | None = None,
                       skip_invalid: bool = False) -> tuple[list[chat.Conversation], dict[str, Any]]:
  """Conversations of a JSONL(.gz) file (formats in the module docstring) and their counts.

  Invalid lines raise a DataError naming file:line, or with `skip_invalid` are counted by reason.
  A file with no valid conversation is a DataError either way.
  """
  path = pathlib.Path(path)
  convs, counts = [], _new_counts()
  for where, obj in _records(path, limit):
    counts["read"] += 1
    try:
      if isinstance(obj, chat.ChatFormatError):
        raise obj
      convs.append(_record_conversation(obj, where))
    except chat.ChatFormatError as e:
      if not skip_invalid:
        raise
      _drop(counts, e.reason)
  counts["kept"] = len(convs)
  if not convs and limit != 0:
    raise DataError(f"{path}: no valid conversations (read {counts['read']}, dropped "
                    f"{counts['dropped']})")
  return convs, counts


# --- shared datasets --------------------------------------------------------------------------------

def gsm8k_conversations(split: str = "train", limit: int | None = None, *,
                        path: str | pathlib.Path | None = None
                        ) -> tuple[list[chat.Conversation], dict[str, Any]]:
  """GSM8K rows as [user: question, assistant: answer] and counts (nothing is dropped: a bad row is a
  DataError naming file:line, from `data.tasks.gsm8k.load`).

  The answer is kept verbatim, calculator annotations ("<<48/2=24>>") and the final "#### n" line
  included: `gsm8k.is_correct` and the GRPO reward read the number after "####".
  """
  rows = gsm8k.load(split, path=path, limit=limit)
  convs = [chat.from_prompt_response(r["question"], r["answer"], where=f"gsm8k {split} row {i + 1}")
           for i, r in enumerate(rows)]
  return convs, {"read": len(rows), "kept": len(convs), "dropped": {}}


def _hh_path(path: str | pathlib.Path | None) -> pathlib.Path:
  return pathlib.Path(path) if path is not None else shared_data_dir() / HH_RLHF


def hh_rlhf_conversations(limit: int | None = None, which: str = "chosen", *,
                          path: str | pathlib.Path | None = None
                          ) -> tuple[list[chat.Conversation], dict[str, Any]]:
  """The `which` ("chosen" or "rejected") dialogue of each HH-RLHF pair, as conversations, and counts.

  Dialogues that break the chat format are counted and skipped, never raised: in the shared harmless
  test file (2,312 pairs), 12 chosen dialogues do (8 repeated_role: two consecutive "Assistant:" turns,
  4 empty_content: an empty final reply) and 5 rejected ones (repeated_role). For DPO use
  `hh_rlhf_pairs`, which keeps chosen and rejected aligned.
  """
  if which not in ("chosen", "rejected"):
    raise ValueError(f"which must be 'chosen' or 'rejected', got {which!r}")
  path = _hh_path(path)
  convs, counts = [], _new_counts()
  for where, obj in _records(path, limit):
    counts["read"] += 1
    try:
      if isinstance(obj, chat.ChatFormatError):
        raise obj
      if which not in obj:
        raise chat.ChatFormatError("bad_dialogue", f"{where}: missing field {which!r}")
      convs.append(chat.from_hh_rlhf(obj[which], where))
    except chat.ChatFormatError as e:
      _drop(counts, e.reason)
  counts["kept"] = len(convs)
  return convs, counts


def hh_rlhf_pairs(limit: int | None = None, *, path: str | pathlib.Path | None = None
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Preference pairs `{"prompt": conversation ending in a user turn, "chosen": str, "rejected": str}`.

  A pair is kept only when both dialogues are valid and share every turn but the final assistant
  reply; otherwise it is counted under the first reason found (`prompt_mismatch` for the last case).
  Shared file: 2,299 of 2,312 pairs kept (dropped: 4 empty_content, 9 repeated_role; no mismatch).
  """
  path = _hh_path(path)
  pairs, counts = [], _new_counts()
  for where, obj in _records(path, limit):
    counts["read"] += 1
    try:
      if isinstance(obj, chat.ChatFormatError):
        raise obj
      sides = {}
      for which in ("chosen", "rejected"):
        if which not in obj:
          raise chat.ChatFormatError("bad_dialogue", f"{where}: missing field {which!r}")
        conv = chat.from_hh_rlhf(obj[which], f"{where} ({which})")
        if conv[-1]["role"] != "assistant":
          raise chat.ChatFormatError("no_final_reply", f"{where} ({which}): does not end with an "
                                                       "assistant turn")
        sides[which] = conv
      if sides["chosen"][:-1] != sides["rejected"][:-1]:
        raise chat.ChatFormatError("prompt_mismatch", f"{where}: chosen and rejected differ before "
                                                      "the final reply")
      pairs.append({"prompt": sides["chosen"][:-1], "chosen": sides["chosen"][-1]["content"],
                    "rejected": sides["rejected"][-1]["content"]})
    except chat.ChatFormatError as e:
      _drop(counts, e.reason)
  counts["kept"] = len(pairs)
  return pairs, counts


# --- packing ----------------------------------------------------------------------------------------

class _FirstFit:
  """Leftmost bin with room for a length, in O(log bins): a max segment tree over free space.

  Bins not yet opened hold `capacity`, so the leftmost fitting bin is an open one when any fits and
  otherwise the next new one — exactly first fit.
  """

  def __init__(self, max_bins: int, capacity: int):
    self.size = 1 << max(0, (max_bins - 1).bit_length())
    self.free = [capacity] * (2 * self.size)
    self.opened = 0

  def place(self, length: int) -> int:
    i = 1
    while i < self.size:
      i = 2 * i if self.free[2 * i] >= length else 2 * i + 1
    bin_index = i - self.size
    self.free[i] -= length
    i //= 2
    while i:
      self.free[i] = max(self.free[2 * i], self.free[2 * i + 1])
      i //= 2
    self.opened = max(self.opened, bin_index + 1)
    return bin_index


def pack(examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, *,
         drop_longer: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Packs (ids, loss_mask) examples (`chat.render` outputs) into [N, seq_len] rows; see the docstring.

  A conversation longer than `seq_len` is dropped (`dropped["longer_than_seq_len"]`), or with
  `drop_longer=False` cut to its first `seq_len` tokens (counted in `truncated`, kept): the cut loses the
  end of the conversation, usually the final reply's end and its <|end|>, so the model is trained on an
  unfinished reply. An example with no trained target (e.g. a prompt that fills the whole row) is
  dropped as `no_loss_tokens`. Padding uses id 0 (the project tokenizer's <pad>).

  Returns (arrays, counts): arrays as in `FEATURES` (int32; loss_mask float32) and counts
  `{"read", "kept", "truncated", "dropped": {reason: n}, "rows", "tokens", "trained_tokens",
  "padding_fraction"}` with read == kept + sum(dropped) and tokens == sum of kept lengths ==
  (segment_ids > 0).sum().
  """
  if seq_len < 2:
    raise DataError(f"seq_len must be >= 2, got {seq_len}")
  counts = {"read": len(examples), "kept": 0, "truncated": 0,
            "dropped": {"longer_than_seq_len": 0, "no_loss_tokens": 0}}
  kept: list[tuple[np.ndarray, np.ndarray]] = []
  for k, (ids, mask) in enumerate(examples):
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.float32)
    if ids.ndim != 1 or ids.shape != mask.shape:
      raise DataError(f"example {k}: ids and loss_mask must be 1-D of one length, got shapes "
                      f"{ids.shape} and {mask.shape}")
    truncated = len(ids) > seq_len
    if truncated:
      if drop_longer:
        counts["dropped"]["longer_than_seq_len"] += 1
        continue
      ids, mask = ids[:seq_len], mask[:seq_len]
    if not mask[1:].any():  # mask[0] is about a token that is never a target
      counts["dropped"]["no_loss_tokens"] += 1
      continue
    counts["truncated"] += int(truncated)
    kept.append((ids, mask))
  counts["kept"] = len(kept)

  # First-fit decreasing; the stable sort keeps equal lengths in input order (deterministic rows).
  order = sorted(range(len(kept)), key=lambda i: -len(kept[i][0]))
  bins = _FirstFit(max(1, len(kept)), seq_len)
  rows: list[list[int]] = []
  for i in order:
    b = bins.place(len(kept[i][0]))
    if b == len(rows):
      rows.append([])
    rows[b].append(i)

  shape = (len(rows), seq_len)
  inputs = np.zeros(shape, np.int32)
  segment_ids = np.zeros(shape, np.int32)
  positions = np.zeros(shape, np.int32)
  loss_mask = np.zeros(shape, np.float32)
  for r, members in enumerate(rows):
    start = 0
    for seg, i in enumerate(members, start=1):
      ids, mask = kept[i]
      end = start + len(ids)
      inputs[r, start:end] = ids
      segment_ids[r, start:end] = seg
      positions[r, start:end] = np.arange(len(ids))
      loss_mask[r, start:end - 1] = mask[1:]  # shift onto targets; the last token has no target
      start = end
  targets = np.zeros(shape, np.int32)
  targets[:, :-1] = inputs[:, 1:]
  tokens = int((segment_ids > 0).sum())
  counts.update(rows=len(rows), tokens=tokens, trained_tokens=int(loss_mask.sum()),
                padding_fraction=1.0 - tokens / inputs.size if inputs.size else 0.0)
  return ({"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
           "segment_ids": segment_ids, "positions": positions}, counts)


# --- batches ----------------------------------------------------------------------------------------

def batches(packed: dict[str, np.ndarray], batch_size: int, *, seed: int, epochs: int | None = None,
            start: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Batches {feature: [batch_size, seq_len]} of packed rows, reshuffled each epoch, deterministic by seed.

  The rows are read as one stream of epochs, each epoch a permutation drawn from (seed, epoch), and cut
  into consecutive batches: no row is skipped, and a batch may straddle two epochs. `epochs=None`
  repeats forever; otherwise there are floor(epochs * rows / batch_size) batches (the remainder, under
  one batch, is left out). `start` skips that many batches (resume at a step) without replaying them.
  """
  shapes = {k: np.shape(v) for k, v in packed.items()}
  if ("inputs" not in shapes or any(len(s) != 2 for s in shapes.values())
      or len({s[0] for s in shapes.values()}) != 1):
    raise DataError(f"batches: expected pack()'s arrays, all [rows, seq_len], got shapes {shapes}")
  n = shapes["inputs"][0]
  if n == 0:
    raise DataError("batches: no packed rows (every conversation was dropped by pack?)")
  if batch_size < 1 or n < batch_size:
    raise DataError(f"batches: batch_size must be in [1, {n}] (the packed rows), got {batch_size}")
  if epochs is not None and epochs < 1:
    raise DataError(f"batches: epochs must be >= 1 or None, got {epochs}")
  if start < 0:
    raise DataError(f"batches: start must be >= 0, got {start}")
  total = None if epochs is None else epochs * n // batch_size

  def permutation(epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)

  def generate() -> Iterator[dict[str, np.ndarray]]:
    step, cache = start, {}
    while total is None or step < total:
      flat = np.arange(step * batch_size, (step + 1) * batch_size)
      epoch = flat // n
      rows = np.empty(batch_size, np.int64)
      for e in np.unique(epoch):
        if e not in cache:
          cache = {k: v for k, v in cache.items() if k >= e - 1}  # at most 2 epochs live
          cache[e] = permutation(int(e))
        sel = epoch == e
        rows[sel] = cache[e][flat[sel] % n]
      yield {k: np.asarray(v)[rows] for k, v in packed.items()}
      step += 1

  return generate()
