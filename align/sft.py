"""Supervised fine-tuning on chat conversations: loss on assistant tokens only, conversations packed.

    python -m align.sft --config=configs/align.py:sft --config.init=runs/tiny --config.align.data=gsm8k
    python -m align.sft --config=configs/align.py:sft --config.init=runs/tiny \\
        --config.align.data=convs.jsonl --config.lora.rank=16 --config.run.name=tiny-sft-lora

Data (`align.data`): `gsm8k` (train split: question → user, worked answer with its `#### n` line →
assistant), `hh_rlhf` (the chosen dialogues of the shared HH-RLHF file), or a JSONL of
`{"messages": [...]}` / `{"prompt", "response"}` lines. Conversations are rendered with the project's
chat format (`data/chat.py`), packed first-fit into `align.seq_len` rows with segment ids (no attention
or loss across conversations), and the loss is the mean cross-entropy over assistant tokens including
each assistant turn's `<|end|>`, so the model learns to stop. The last `align.val_examples`
conversations are held out: every `train.eval_every` steps the run reports their loss and samples
replies to their prompts, counting how many end with `<|end|>` and contain no other control token
(`ends_with_end`) — the issue's "≥ 95% of sampled replies end with the end-of-turn token".
"""
from __future__ import annotations

import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align.rollout import chat_replies
from align.trainer import Trainer, stage_main
from configs.loader import ConfigError
from data import chat, sft
from train.step import cross_entropy


def load(spec: str, limit: int | None):
  """Conversations of `align.data`, and the counts of what was read and dropped."""
  if spec == "gsm8k":
    return sft.gsm8k_conversations("train", limit=limit)
  if spec == "hh_rlhf":
    return sft.hh_rlhf_conversations(limit=limit)
  return sft.load_conversations(spec, limit=limit)


def sft_loss(trainer: Trainer, trainable, frozen, batch, key):
  del key
  model = trainer.model(trainer.params(trainable, frozen))
  logits = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
  ce, _, n = cross_entropy(logits, batch["targets"], batch["loss_mask"], 0.0)
  return ce / jnp.maximum(n, 1.0), dict(tokens=n)


def reply_format(model, tokenizer, prompts: list, *, max_new_tokens: int, seed: int, context: int) -> dict:
  """Samples a reply per prompt conversation (temperature 0.8, top-p 0.95); the fraction that end with
  <|end|> and hold no other control token."""
  replies = chat_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.8,
                         top_p=0.95, seed=seed, context=context)
  return dict(ends_with_end=float(np.mean([r.ended for r in replies])),
              reply_tokens=float(np.mean([len(r.ids) for r in replies])))


def run(cfg) -> dict:
  trainer = Trainer(cfg)
  tok = trainer.tokenizer
  a = cfg.align
  if a.seq_len > trainer.model_cfg.max_seq_len:
    raise ConfigError(f"align.seq_len={a.seq_len} exceeds the model's max_seq_len={trainer.model_cfg.max_seq_len}")
  conversations, counts = load(a.data, a.limit or None)
  if len(conversations) <= a.val_examples:
    raise ConfigError(f"align.data={a.data}: {len(conversations)} conversations, need more than "
                      f"align.val_examples={a.val_examples}")
  train_convs, val_convs = conversations[:-a.val_examples], conversations[-a.val_examples:]
  packed, pack_counts = sft.pack([chat.render(c, tok) for c in train_convs], a.seq_len)
  val_packed, _ = sft.pack([chat.render(c, tok) for c in val_convs], a.seq_len)
  n_rows = len(packed["inputs"])
  if n_rows == 0:
    raise ConfigError(f"no conversation fits align.seq_len={a.seq_len}")
  if len(val_packed["inputs"]) == 0:
    raise ConfigError(f"none of the {len(val_convs)} held-out conversations fits align.seq_len={a.seq_len}")
  print(f"sft: data {counts}; {len(train_convs)} train conversations packed into {n_rows} rows of "
        f"{a.seq_len} ({pack_counts}); {len(val_convs)} held out", file=sys.stderr)
  batches = sft.batches(packed, cfg.train.batch_size, seed=cfg.run.seed, start=trainer.start)
  val_prompts = [c[:-1] for c in val_convs[:a.sample_replies]]  # each ends with a user turn.

  eval_loss = jax.jit(lambda params, batch: cross_entropy(
      trainer.model(params)(batch["inputs"], positions=batch["positions"],
                            segment_ids=batch["segment_ids"]), batch["targets"], batch["loss_mask"], 0.0))

  def evaluate(t: Trainer, step: int) -> dict:
    model = t.current_model()
    params = t.params({k: t.state[k] for k in t.trainable_keys}, t.frozen_base())
    ce = n = 0.0
    for i in range(0, len(val_packed["inputs"]), cfg.train.batch_size):
      c, _, k = eval_loss(params, {k: jnp.asarray(v[i:i + cfg.train.batch_size]) for k, v in val_packed.items()})
      ce, n = ce + float(c), n + float(k)
    row = dict(val_loss=ce / max(n, 1.0))
    if val_prompts:
      row.update(reply_format(model, tok, val_prompts, max_new_tokens=a.max_new_tokens,
                              seed=cfg.run.seed + step, context=a.seq_len))
    return row

  return trainer.fit(sft_loss, batches, eval_fn=evaluate)


def main(argv: Sequence[str] | None = None) -> int:
  return stage_main(run, "configs/align.py:sft", argv)


if __name__ == "__main__":
  sys.exit(main())
