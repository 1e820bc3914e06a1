"""Synthetic alignment data from the model itself: constitutional critique → revision pairs, and
rejection sampling against a verifier.

    python -m align.constitution critique --checkpoint=runs/tiny-sft --prompts=hh_rlhf \\
        --constitution=configs/constitution.json --out=data/cai_pairs.jsonl [--limit=200 --seed=0]
    python -m align.constitution rejection --checkpoint=runs/tiny-sft --task=gsm8k --n=8 \\
        --out=data/gsm8k_rs.jsonl [--limit=200]
    python -m align.dpo --config=configs/align.py:dpo --config.init=runs/tiny-sft --config.align.data=data/cai_pairs.jsonl

`critique` (Bai et al. 2022, Constitutional AI, §3): for each prompt the model answers; then, in the
same conversation, it is asked a critique request from a principle sampled from the constitution file
(`{"principles": [{"critique": ..., "revision": ...}, ...]}`), answers it, is asked the principle's
revision request and writes a revised answer. Each (prompt, revised, original) becomes a preference
pair `{"messages", "chosen": revised, "rejected": original, "principle", "critique"}` — the file format
`align.dpo` and `align.reward` read. Prompts: `hh_rlhf` (the first user turn of the shared HH-RLHF
dialogues) or a JSONL with `prompt` or `messages` (ending in a user turn).

`rejection`: for each problem of a verifiable task (`gsm8k`: train split, or `arithmetic`) the model
samples `--n` answers; those the task's checker accepts become SFT data `{"prompt", "response"}`
(at most `--keep_per_prompt` per problem), the input format of `align.sft`.

Both write JSONL atomically and print counts (prompts, replies that did not finish their turn, pairs or
answers kept, dropped and why). Replies that did not end with `<|end|>` are dropped, never written.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys
import tempfile
from typing import Any, Sequence

from align.rollout import chat_replies
from configs.loader import ConfigError, main_guard


def load_constitution(path: str) -> list[dict[str, str]]:
  p = pathlib.Path(path)
  try:
    obj = json.loads(p.read_text())
  except FileNotFoundError:
    raise ConfigError(f"constitution file not found: {p}") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"{p}: invalid JSON: {e}") from None
  principles = obj.get("principles") if isinstance(obj, dict) else None
  if not isinstance(principles, list) or not principles:
    raise ConfigError(f"{p}: expected {{\"principles\": [{{\"critique\": ..., \"revision\": ...}}, ...]}}")
  for i, pr in enumerate(principles):
    if not (isinstance(pr, dict) and all(isinstance(pr.get(k), str) and pr[k].strip()
                                         for k in ("critique", "revision"))):
      raise ConfigError(f"{p}: principle {i} needs non-empty 'critique' and 'revision' strings")
  return principles


def load_prompts(spec: str, limit: int | None) -> list[list[dict]]:
  """Conversations ending in a user turn."""
  from data import chat, sft  # pylint: disable=g-import-not-at-top
  if spec == "hh_rlhf":
    pairs, _ = sft.hh_rlhf_pairs(limit=limit)
    return [p["prompt"][:1] for p in pairs]  # the first user turn: a single-turn request.
  path = pathlib.Path(spec)
  if not path.is_file():
    raise ConfigError(f"--prompts: {spec} is neither 'hh_rlhf' nor a file")
  out = []
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      if limit is not None and len(out) >= limit:
        break
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
      conv = obj.get("messages") if isinstance(obj, dict) else None
      if conv is None and isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
        conv = [dict(role="user", content=obj["prompt"])]
      chat.validate(conv, f"{path}:{lineno}", require_assistant=False)
      if conv[-1]["role"] != "user":
        raise ConfigError(f"{path}:{lineno}: the prompt must end with a user turn")
      out.append(chat.normalize(conv))
  if not out:
    raise ConfigError(f"{path}: no prompts")
  return out


def write_jsonl(rows: list[dict[str, Any]], out: str) -> None:
  path = pathlib.Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def critique_pairs(model, tokenizer, prompts: list[list[dict]], principles: list[dict], *, seed: int,
                   max_new_tokens: int, temperature: float) -> tuple[list[dict], dict]:
  """Answer → critique → revision for every prompt, batched stage by stage; (pairs, counts)."""
  rng = random.Random(seed)
  picks = [rng.choice(principles) for _ in prompts]
  kw = dict(max_new_tokens=max_new_tokens, temperature=temperature)
  counts = dict(prompts=len(prompts), kept=0, dropped={})

  def drop(reason):
    counts["dropped"][reason] = counts["dropped"].get(reason, 0) + 1

  answers = chat_replies(model, tokenizer, prompts, seed=seed, **kw)
  live = [i for i, a in enumerate(answers) if a.ended and a.text.strip()]
  for _ in range(len(prompts) - len(live)):
    drop("answer_unfinished")
  convs = {i: prompts[i] + [dict(role="assistant", content=answers[i].text),
                            dict(role="user", content=picks[i]["critique"])] for i in live}
  critiques = dict(zip(live, chat_replies(model, tokenizer, [convs[i] for i in live], seed=seed + 1, **kw)))
  live2 = [i for i in live if critiques[i].ended and critiques[i].text.strip()]
  for _ in range(len(live) - len(live2)):
    drop("critique_unfinished")
  for i in live2:
    convs[i] = convs[i] + [dict(role="assistant", content=critiques[i].text),
                           dict(role="user", content=picks[i]["revision"])]
  revisions = dict(zip(live2, chat_replies(model, tokenizer, [convs[i] for i in live2], seed=seed + 2, **kw)))
  pairs = []
  for i in live2:
    rev = revisions[i]
    if not (rev.ended and rev.text.strip()):
      drop("revision_unfinished")
    elif rev.text.strip() == answers[i].text.strip():
      drop("revision_identical")
    else:
      pairs.append(dict(messages=prompts[i], chosen=rev.text, rejected=answers[i].text,
                        principle=picks[i]["critique"], critique=critiques[i].text))
  counts["kept"] = len(pairs)
  return pairs, counts


def rejection_samples(model, tokenizer, task: str, *, n: int, limit: int | None, seed: int,
                      max_new_tokens: int, temperature: float, keep_per_prompt: int) -> tuple[list[dict], dict]:
  from data.tasks import gsm8k  # pylint: disable=g-import-not-at-top
  if task == "gsm8k":
    problems = gsm8k.load("train", limit=limit)
  elif task == "arithmetic":
    from data.tasks import arithmetic  # pylint: disable=g-import-not-at-top
    problems = arithmetic.make(limit or 500, seed=seed)
  else:
    raise ConfigError(f"--task={task!r}: known tasks are gsm8k, arithmetic")
  convs = [[dict(role="user", content=p["question"])] for p in problems for _ in range(n)]
  replies = chat_replies(model, tokenizer, convs, max_new_tokens=max_new_tokens, temperature=temperature,
                         seed=seed)
  rows, counts = [], dict(problems=len(problems), samples=len(replies), unfinished=0, wrong=0, kept=0,
                          duplicate=0, problems_with_a_kept_answer=0)
  for j, p in enumerate(problems):
    kept = set()
    for r in replies[j * n:(j + 1) * n]:
      if not r.ended:
        counts["unfinished"] += 1
      elif not gsm8k.is_correct(r.text, p["target"]):
        counts["wrong"] += 1
      elif r.text in kept or len(kept) >= keep_per_prompt:
        counts["duplicate"] += 1
      else:
        kept.add(r.text)
        rows.append(dict(prompt=p["question"], response=r.text))
    counts["problems_with_a_kept_answer"] += bool(kept)
  counts["kept"] = len(rows)
  return rows, counts


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m align.constitution", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  for name in ("critique", "rejection"):
    p = sub.add_parser(name)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
  sub.choices["critique"].add_argument("--prompts", default="hh_rlhf")
  sub.choices["critique"].add_argument("--constitution", default="configs/constitution.json")
  sub.choices["rejection"].add_argument("--task", default="gsm8k")
  sub.choices["rejection"].add_argument("--n", type=int, default=8)
  sub.choices["rejection"].add_argument("--keep_per_prompt", type=int, default=2)
  args = parser.parse_args(argv)

  def go() -> int:
    from train.sample import load_for_inference  # pylint: disable=g-import-not-at-top
    try:
      model, tokenizer, _ = load_for_inference(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f"--checkpoint={args.checkpoint}: {e}") from None
    kw = dict(seed=args.seed, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if args.cmd == "critique":
      principles = load_constitution(args.constitution)
      rows, counts = critique_pairs(model, tokenizer, load_prompts(args.prompts, args.limit), principles, **kw)
    else:
      if args.n < 1:
        raise ConfigError(f"--n={args.n} must be ≥ 1")
      rows, counts = rejection_samples(model, tokenizer, args.task, n=args.n, limit=args.limit,
                                       keep_per_prompt=args.keep_per_prompt, **kw)
    write_jsonl(rows, args.out)
    print(json.dumps(counts))
    print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    return 0

  return main_guard(go)


if __name__ == "__main__":
  sys.exit(main())
