"""GRPO with verifiable rewards (RLVR): sample a group of replies per prompt, score them with the task's
checker, push the policy toward the replies that beat their group's mean.

    python -m align.grpo --config=configs/align.py:grpo --config.init=runs/tiny-sft
    python -m align.grpo --config=configs/align.py:grpo --config.init=runs/tiny-sft \\
        --config.align.task=gsm8k --config.align.max_new_tokens=256 --config.align.advantage_scale=none \\
        --config.align.aggregation=seq_mean_token_sum_norm --config.align.beta_kl=0   # Dr.GRPO

Each step (Shao et al. 2024, DeepSeekMath §4): `align.prompts_per_step` problems of `align.task`
(`arithmetic`: data/tasks/arithmetic.py; `gsm8k`: the shared train split), `align.group_size` replies
each sampled from the current policy (KV-cache sampler, temperature `align.temperature`, at most
`align.max_new_tokens`, stopping at <|end|>); reward 1/0 from the task's exact-match checker (the
number after `####`), plus `align.format_bonus` for a reply that ends with <|end|> and has a `####`
line; group-normalized advantages (`losses.grpo_advantages`, `std` or `none` = Dr.GRPO); then
`align.inner_steps` optimizer steps on the clipped objective with a k3 KL penalty to the init policy
(`losses.grpo_loss`). The old log-probs are the sampling policy's, computed before the first update of
each rollout batch, so the first ratio is 1 up to float rounding. Log-probs are those of the sampling
distribution, logits / temperature (as TRL does), for the ratio and the KL alike.

Rows: prompt + reply (+ <|end|> if the reply stopped), right-padded to one fixed length (max prompt of
the task + max_new_tokens), so the step compiles once; the loss mask covers the reply's tokens and its
<|end|>, never the prompt or the padding. Every `train.eval_every` steps, and before the first, the
run reports greedy exact-match accuracy on `align.eval_examples` held-out problems (`eval_accuracy`).
Logged per step: `reward`, `accuracy`, `completion_len`, `ended` (fraction stopped by <|end|>),
`zero_adv_groups` (fraction of groups whose replies all scored the same: no learning signal), plus the
loss's `policy/*` and `kl`.

Resume: rerunning the same command continues from the latest checkpoint; rollout k uses seed
(run.seed, k), so a resumed run draws the prompts it would have drawn.

Demo (2 shared CPU cores): a `tiny,smoke` model (140k params) pretrained 200 steps, SFT'd 1200 steps on
10k arithmetic problems (`python -m data.tasks.arithmetic --n=10000 --out=...`, then `align.sft` at
lr 3e-3 constant, 10 min), then

    python -m align.grpo --config.init=<sft run> --config.optim.peak_lr=2e-4 --config.train.steps=1000 \
        --config.align.max_new_tokens=24 --config.align.eval_examples=400

takes greedy held-out accuracy from 48.8% to 70.3% in 230 s (train reward 0.49 → 0.61). 450 more SFT
steps in 165 s reach 66.8%: on this undertrained model RL is about as good as more SFT, not better.
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align import losses
from align.trainer import Trainer, stage_main
from configs.loader import ConfigError
from data import chat
from data.tasks import arithmetic, gsm8k
from train.sample import generate_ids

TASKS = ("arithmetic", "gsm8k")


# --- config and data --------------------------------------------------------------------------------

def validate(cfg) -> None:
  """ConfigError naming the first bad `align.*` value (checked before any model is loaded)."""
  a = cfg.align
  if a.task not in TASKS:
    raise ConfigError(f"align.task={a.task!r} unknown; known: {TASKS}")
  if a.group_size < 2:
    raise ConfigError(f"align.group_size={a.group_size}: GRPO needs >= 2 replies per prompt (advantages "
                      "are relative to the group)")
  for key in ("prompts_per_step", "inner_steps", "max_new_tokens"):
    if a[key] < 1:
      raise ConfigError(f"align.{key}={a[key]} must be >= 1")
  if a.eval_examples < 0 or a.train_examples < 0:
    raise ConfigError("align.eval_examples and align.train_examples must be >= 0")
  if a.temperature <= 0:
    raise ConfigError(f"align.temperature={a.temperature} must be > 0 (rollouts are sampled)")
  if not 0 < a.top_p <= 1:
    raise ConfigError(f"align.top_p={a.top_p} must be in (0, 1]")
  if not (0 < a.clip_low < 1 and a.clip_high > 0):
    raise ConfigError(f"align.clip_low must be in (0, 1) and clip_high > 0, got {a.clip_low}, {a.clip_high}")
  if a.beta_kl < 0:
    raise ConfigError(f"align.beta_kl={a.beta_kl} must be >= 0")
  if a.advantage_scale not in ("std", "none"):
    raise ConfigError(f"align.advantage_scale={a.advantage_scale!r} must be 'std' or 'none'")
  if a.aggregation not in losses.AGGREGATIONS:
    raise ConfigError(f"align.aggregation={a.aggregation!r} unknown; known: {losses.AGGREGATIONS}")
  if a.task == "arithmetic" and a.train_examples == 0:
    raise ConfigError("align.train_examples must be > 0 for the generated arithmetic task")


def load_problems(cfg) -> tuple[list[dict], list[dict]]:
  """(train pool, held-out eval problems) of `align.task`, each {"question", "target", ...}."""
  a = cfg.align
  if a.task == "arithmetic":
    try:
      kw = dict(digits=tuple(a.digits), ops=tuple(a.ops))
      return (arithmetic.load("train", a.train_examples, **kw), arithmetic.load("test", a.eval_examples, **kw))
    except ValueError as e:
      raise ConfigError(f"align.digits/ops/train_examples/eval_examples: {e}") from None
  return gsm8k.load("train", limit=a.train_examples or None), gsm8k.load("test", limit=a.eval_examples)


def encode_prompts(problems: Sequence[dict], tokenizer) -> list[list[int]]:
  """The chat prompt of each problem: <s> <|user|> question <|end|> <|assistant|>."""
  return [chat.render_prompt([{"role": "user", "content": p["question"]}], tokenizer) for p in problems]


# --- rollouts ---------------------------------------------------------------------------------------

def sample(model, prompts: Sequence[Sequence[int]], plen: int, *, eos_id: int, pad_id: int,
           max_new_tokens: int, temperature: float, top_p: float = 1.0,
           seed: int = 0) -> tuple[list[list[int]], list[bool]]:
  """(reply ids cut before <|end|>, whether each stopped) for prompts right-padded to `plen` tokens.

  A fixed `plen` (the task's longest prompt) compiles the sampler once per batch size instead of once
  per longest prompt. temperature 0 is greedy.
  """
  rows = generate_ids(model, prompts, eos_id=eos_id, pad_id=pad_id, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, seed=seed, pad_to=plen)
  return rows, [len(r) < max_new_tokens for r in rows]  # rows are cut before <|end|>: short = stopped.


def score(replies: Sequence[Sequence[int]], stopped: Sequence[bool], targets: Sequence[str], tokenizer,
          format_bonus: float = 0.0) -> dict[str, np.ndarray]:
  """Per reply (ids cut before <|end|>, `stopped` where the sampler met it): `correct` (the task checker
  on the text before the first control token), `ended` (that token is <|end|>: the reply finished its
  turn cleanly), `reward` = correct + format_bonus·(ended and has a '####' line)."""
  end = chat.end_id(tokenizer)
  correct, ended, formatted = [], [], []
  for ids, stop, target in zip(replies, stopped, targets, strict=True):
    text, clean = chat.parse_reply(list(ids) + ([end] if stop else []), tokenizer)
    correct.append(gsm8k.reward(text, target))
    ended.append(float(clean))
    formatted.append(float(clean and "####" in text))
  correct, ended, formatted = (np.asarray(x, np.float32) for x in (correct, ended, formatted))
  return dict(correct=correct, ended=ended, reward=correct + np.float32(format_bonus) * formatted)


def rollout_arrays(prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]],
                   ended: Sequence[bool], *, row_len: int, pad_id: int, end_id: int) -> dict[str, np.ndarray]:
  """Training rows [B, row_len] for prompt + reply (+ <|end|> when the reply stopped).

  Next-token layout as `data.sft.pack`: inputs = ids[:-1], targets = ids[1:]; loss_mask[t] = 1 where
  targets[t] is a reply token or its <|end|>, 0 on prompt targets and padding; segment_ids 1 on the
  row's tokens, 0 on padding; positions 0.. (the sampler's positions of the same tokens).
  """
  b = len(prompts)
  out = dict(inputs=np.full((b, row_len), pad_id, np.int32), targets=np.full((b, row_len), pad_id, np.int32),
             loss_mask=np.zeros((b, row_len), np.float32), segment_ids=np.zeros((b, row_len), np.int32),
             positions=np.zeros((b, row_len), np.int32))
  for i, (p, r, stop) in enumerate(zip(prompts, replies, ended, strict=True)):
    ids = list(p) + list(r) + ([end_id] if stop else [])
    n = len(ids) - 1
    if n > row_len:
      raise ValueError(f"row {i}: prompt {len(p)} + reply {len(ids) - len(p)} tokens exceed row_len + 1 = "
                       f"{row_len + 1}")
    out["inputs"][i, :n] = ids[:-1]
    out["targets"][i, :n] = ids[1:]
    out["loss_mask"][i, len(p) - 1:n] = 1.0  # targets[t] = ids[t + 1]: the first reply token is at t = |p| - 1.
    out["segment_ids"][i, :n] = 1
    out["positions"][i, :n] = np.arange(n)
  return out


def group_stats(rewards: np.ndarray, group_size: int, scale: str) -> tuple[np.ndarray, np.ndarray]:
  """(advantages [B], zero_adv [B]: 1 on every row of a group whose rewards are all equal)."""
  adv = np.asarray(jax.device_get(losses.grpo_advantages(jnp.asarray(rewards), group_size, scale)), np.float32)
  groups = rewards.reshape(-1, group_size)
  flat = np.all(groups == groups[:, :1], axis=1)
  return adv, np.repeat(flat, group_size).astype(np.float32)


# --- loss -------------------------------------------------------------------------------------------

def token_logps(trainer: Trainer, params, batch: dict, temperature: float) -> jax.Array:
  """log p(targets) [B, T] of the sampling distribution softmax(logits / temperature)."""
  logits = trainer.model(params)(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
  return losses.token_logps(logits.astype(jnp.float32) / temperature, batch["targets"])


def make_loss(cfg):
  a = cfg.align

  def loss_fn(trainer: Trainer, trainable, frozen, batch, key):
    del key
    logp = token_logps(trainer, trainer.params(trainable, frozen), batch, a.temperature)
    ref = token_logps(trainer, frozen["ref"], batch, a.temperature) if a.beta_kl else None
    loss, metrics = losses.grpo_loss(logp, batch["old_logp"], ref, batch["advantages"], batch["loss_mask"],
                                     clip_low=a.clip_low, clip_high=a.clip_high, beta_kl=a.beta_kl,
                                     aggregation=a.aggregation, max_len=a.max_new_tokens)
    # Rollout statistics ride along in the batch so the trainer logs them with the loss.
    for k in ("reward", "accuracy", "ended", "zero_adv_groups"):
      metrics[k] = batch[k].mean()
    metrics["completion_len"] = batch["loss_mask"].sum(-1).mean()
    return loss, metrics

  return loss_fn


# --- the run ----------------------------------------------------------------------------------------

def rollouts(trainer: Trainer, cfg, prompts: list[list[int]], targets: list[str], plen: int, row_len: int):
  """The `batches` iterator of `Trainer.fit`: samples with the current policy each time it is asked for
  the next rollout batch (between steps) and yields it `align.inner_steps` times."""
  a, tok = cfg.align, trainer.tokenizer
  end, g, p = chat.end_id(tok), a.group_size, a.prompts_per_step
  frozen = trainer.frozen_base()
  old_logps = jax.jit(lambda t, f, b: token_logps(trainer, trainer.params(t, f), b, a.temperature))
  k, repeat = divmod(trainer.start, a.inner_steps)
  repeat = a.inner_steps - repeat  # a run resumed mid-rollout finishes that rollout's inner steps.
  while True:
    rng = np.random.default_rng([cfg.run.seed, k])
    idx = np.repeat(rng.choice(len(prompts), p, replace=len(prompts) < p), g)
    model = trainer.current_model()
    replies, ended = sample(model, [prompts[i] for i in idx], plen, eos_id=end, pad_id=tok.pad_id,
                            max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                            seed=int(rng.integers(2**31)))
    del model  # its arrays are the state the next step donates.
    s = score(replies, ended, [targets[i] for i in idx], tok, a.format_bonus)
    adv, zero = group_stats(s["reward"], g, a.advantage_scale)
    batch = rollout_arrays([prompts[i] for i in idx], replies, ended, row_len=row_len, pad_id=tok.pad_id,
                           end_id=end)
    trainable = {key: trainer.state[key] for key in trainer.trainable_keys}
    batch["old_logp"] = np.asarray(jax.device_get(old_logps(trainable, frozen, trainer.put_batch(batch))))
    del trainable
    batch.update(advantages=adv, reward=s["reward"], accuracy=s["correct"], ended=s["ended"], zero_adv_groups=zero)
    for _ in range(repeat):
      yield batch
    k, repeat = k + 1, a.inner_steps


def evaluate(trainer: Trainer, cfg, prompts: list[list[int]], targets: list[str], plen: int,
             chunk: int | None = None) -> dict[str, Any]:
  """Greedy exact match on the held-out problems, in chunks of one rollout batch (default: the GRPO
  rollout's rows; the last chunk padded with copies of the first prompt, so the sampler compiles once)."""
  tok, chunk = trainer.tokenizer, chunk or cfg.align.prompts_per_step * cfg.align.group_size
  model = trainer.current_model()
  replies, stopped = [], []
  for i in range(0, len(prompts), chunk):
    part = prompts[i:i + chunk]
    r, e = sample(model, part + [prompts[0]] * (chunk - len(part)), plen, eos_id=chat.end_id(tok),
                  pad_id=tok.pad_id, max_new_tokens=cfg.align.max_new_tokens, temperature=0.0)
    replies += r[:len(part)]
    stopped += e[:len(part)]
  s = score(replies, stopped, targets, tok)
  return dict(eval_accuracy=float(s["correct"].mean()), eval_ended=float(s["ended"].mean()),
              eval_len=float(np.mean([len(r) for r in replies])))


def fitting(prompts: list[list[int]], targets: list[str], room: int, what: str):
  """The (prompts, targets) whose prompt leaves max_new_tokens of context; the rest counted on stderr
  (long GSM8K questions under a small model's context), never silently lost. `targets` may be any
  per-prompt values (PPO passes (conversation, target) pairs)."""
  keep = [i for i, q in enumerate(prompts) if len(q) <= room]
  if len(keep) < len(prompts):
    print(f"align: dropped {len(prompts) - len(keep)} of {len(prompts)} {what} prompts longer than "
          f"max_seq_len - max_new_tokens = {room} tokens", file=sys.stderr)
  return [prompts[i] for i in keep], [targets[i] for i in keep]


def run(cfg) -> dict:
  validate(cfg)
  a = cfg.align
  with cfg.unlocked():
    cfg.train.batch_size = a.prompts_per_step * a.group_size  # recorded in config.json as what ran.
  train_problems, eval_problems = load_problems(cfg)
  trainer = Trainer(cfg)
  tok = trainer.tokenizer
  prompts, eval_prompts = encode_prompts(train_problems, tok), encode_prompts(eval_problems, tok)
  room = trainer.model_cfg.max_seq_len - a.max_new_tokens
  prompts, targets = fitting(prompts, [p["target"] for p in train_problems], room, "train")
  if not prompts:
    raise ConfigError(f"no {a.task} train prompt fits max_seq_len - align.max_new_tokens = {room} tokens")
  eval_prompts, eval_targets = fitting(eval_prompts, [p["target"] for p in eval_problems], room, "held-out")
  plen = max(len(q) for q in prompts + eval_prompts)
  row_len = plen + a.max_new_tokens - 1
  print(f"grpo ({a.task}): {len(prompts)} train prompts, {len(eval_prompts)} held out; "
        f"{a.prompts_per_step} prompts x {a.group_size} replies per rollout, rows of {row_len} tokens",
        file=sys.stderr)

  eval_fn = (lambda t, step: evaluate(t, cfg, eval_prompts, eval_targets, plen)) if eval_prompts else None
  frozen = dict(ref=trainer.base_params) if a.beta_kl else {}
  return trainer.fit(make_loss(cfg), rollouts(trainer, cfg, prompts, targets, plen, row_len), frozen=frozen,
                     eval_fn=eval_fn)


def main(argv: Sequence[str] | None = None) -> int:
  return stage_main(run, "configs/align.py:grpo", argv)


if __name__ == "__main__":
  sys.exit(main())
