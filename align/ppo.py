"""PPO for language models (RLHF): a value head, per-token KL-penalized rewards, GAE, clipped policy and
value losses.

    python -m align.ppo --config=configs/align.py:ppo --config.init=runs/tiny-sft          # verifier reward
    python -m align.ppo --config=configs/align.py:ppo --config.init=runs/tiny-sft \\
        --config.align.task=hh_rlhf --config.align.reward_model=runs/tiny-rm               # learned reward

Each step follows InstructGPT (Ouyang et al. 2022, §3.5) as TRL's PPOTrainer and "The N+ Implementation
Details of RLHF with PPO" (Huang et al. 2024) spell it out:
1. rollout: `align.prompts_per_step` prompts of `align.task`, one reply each sampled from the current
   policy (KV-cache sampler, temperature `align.temperature`, at most `align.max_new_tokens`, stopping
   at <|end|>);
2. score: the task's checker (1/0 exact match on `arithmetic` / `gsm8k`), or a reward model trained by
   `python -m align.reward` when `align.reward_model` names its run (required for `hh_rlhf` prompts);
   a reply that never reached <|end|> loses `align.missing_end_penalty`;
3. per-token rewards r_t = −β·(log π_old − log π_ref)(token t) (the k1 KL estimate, β = `align.kl_coef`),
   plus the score on the reply's last token;
4. values V_t from a scalar head on the policy's final-norm features (one trunk, `Transformer.features`
   then `unembed`: the value loss is scaled by `align.vf_coef` = 0.1, TRL's default, so it does not
   dominate the shared trunk); GAE(γ, λ) advantages (`losses.gae`) and returns; advantages whitened
   over the batch's reply tokens;
5. `align.ppo_epochs` optimizer steps on the same rollout: clipped surrogate (ε = `align.clip`) +
   vf_coef · clipped value loss (`align.vf_clip`), token-mean over the batch.
Log-probs are those of softmax(logits / temperature), the sampling distribution, for the ratio and the KL.

Rows, prompts and evaluation are GRPO's (`align/grpo.py`): prompt + reply padded to one length so the
step compiles once, loss mask on the reply and its <|end|>. Every `train.eval_every` steps (and before the
first) the run reports greedy exact match on `align.eval_examples` held-out problems, or, with a reward
model, the mean reward of greedy replies to held-out prompts (`eval_reward`). Logged per step: `score`,
`accuracy` (verifier tasks), `kl` (k1 per token, policy at rollout vs reference), `completion_len`,
`ended`, and the losses' `policy/*` and `value/*` diagnostics.
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align import grpo, losses
from align.trainer import Trainer, _init_model_config, stage_main
from configs.loader import ConfigError
from data import chat, sft

HEAD = "value"
TASKS = ("arithmetic", "gsm8k", "hh_rlhf")


# --- config and data --------------------------------------------------------------------------------

def validate(cfg) -> None:
  a = cfg.align
  if a.task not in TASKS:
    raise ConfigError(f"align.task={a.task!r} unknown; known: {TASKS}")
  if a.task == "hh_rlhf" and not a.reward_model:
    raise ConfigError("align.task=hh_rlhf has no verifier: set align.reward_model to an `align.reward` run")
  for key in ("prompts_per_step", "ppo_epochs", "max_new_tokens"):
    if a[key] < 1:
      raise ConfigError(f"align.{key}={a[key]} must be >= 1")
  if a.temperature <= 0:
    raise ConfigError(f"align.temperature={a.temperature} must be > 0 (rollouts are sampled)")
  if not 0 < a.clip < 1:
    raise ConfigError(f"align.clip={a.clip} must be in (0, 1)")
  if a.vf_clip < 0 or a.vf_coef < 0 or a.kl_coef < 0:
    raise ConfigError("align.vf_clip, align.vf_coef and align.kl_coef must be >= 0")
  if not (0 <= a.gamma <= 1 and 0 <= a.lam <= 1):
    raise ConfigError(f"align.gamma={a.gamma} and align.lam={a.lam} must be in [0, 1]")


def load_prompts(cfg) -> tuple[list[list[dict]], list[str | None], list[list[dict]], list[str | None]]:
  """(train conversations, their targets, held-out conversations, targets); targets are None for
  `hh_rlhf`, whose prompts (the dialogue before the last reply) are scored by the reward model only.
  HH-RLHF's held-out prompts are the last `align.eval_examples` pairs of the shared file."""
  a = cfg.align
  if a.task == "hh_rlhf":
    pairs, _ = sft.hh_rlhf_pairs(limit=(a.train_examples + a.eval_examples) or None)
    convs = [p["prompt"] for p in pairs]
    if len(convs) <= a.eval_examples:
      raise ConfigError(f"{len(convs)} HH-RLHF prompts: need more than align.eval_examples={a.eval_examples}")
    cut = len(convs) - a.eval_examples
    return convs[:cut], [None] * cut, convs[cut:], [None] * a.eval_examples
  train, test = grpo.load_problems(cfg)
  user = lambda ps: [[dict(role="user", content=p["question"])] for p in ps]
  return user(train), [p["target"] for p in train], user(test), [p["target"] for p in test]


# --- scoring ----------------------------------------------------------------------------------------

def make_scorer(cfg, tokenizer):
  """`scorer(conversations, replies, stopped, targets) -> dict(score, accuracy?, ended)` per reply."""
  a = cfg.align
  if a.reward_model:
    from align.reward import load_reward_model  # pylint: disable=g-import-not-at-top
    try:
      rm = load_reward_model(a.reward_model)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f"align.reward_model={a.reward_model}: {e}") from None
    if rm.tokenizer.to_bytes() != tokenizer.to_bytes():
      raise ConfigError(f"align.reward_model={a.reward_model} uses a different tokenizer from the policy")

  def scorer(convs, replies, stopped, targets) -> dict[str, np.ndarray]:
    end = chat.end_id(tokenizer)
    parsed = [chat.parse_reply(list(r) + ([end] if s else []), tokenizer) for r, s in zip(replies, stopped)]
    ended = np.asarray([clean for _, clean in parsed], np.float32)
    if a.reward_model:
      score = np.asarray(rm(convs, [text for text, _ in parsed]), np.float32)
      out = {}
    else:
      out = grpo.score(replies, stopped, targets, tokenizer)
      score = out["correct"]
      out = dict(accuracy=out["correct"])
    return dict(out, score=score - np.float32(a.missing_end_penalty) * (1.0 - ended), ended=ended)

  return scorer


# --- model pieces -----------------------------------------------------------------------------------

def heads_spec(d_model: int) -> dict:
  # std 0.02 like the reward head: step-0 values are small, not all identical.
  return {HEAD: {"w": ((d_model,), ("embed",), "normal"), "b": ((), (), "zeros")}}


def policy_and_values(trainer: Trainer, params, head, batch: dict, temperature: float):
  """(log π(targets) [B, T] of softmax(logits / T), values [B, T]) from one trunk pass."""
  model = trainer.model(params)
  h = model.features(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
  logp = losses.token_logps(model.unembed(h).astype(jnp.float32) / temperature, batch["targets"])
  values = h.astype(jnp.float32) @ head["w"].astype(jnp.float32) + head["b"].astype(jnp.float32)
  return logp, values


def advantages(cfg, old_logp, ref_logp, old_values, score, mask):
  """Per-token rewards (−β·k1 KL, + score on the last reply token) → GAE advantages and returns [B, T]."""
  a = cfg.align
  kl = (old_logp - ref_logp) * mask if ref_logp is not None else jnp.zeros_like(old_logp)
  t = jnp.arange(mask.shape[1])
  last = jnp.max(jnp.where(mask > 0, t, -1), axis=-1)  # -1: a row with no reply token gets no score.
  rewards = -a.kl_coef * kl + jnp.where(t[None] == last[:, None], score[:, None], 0.0)
  adv, returns = losses.gae(rewards, old_values, mask, gamma=a.gamma, lam=a.lam)
  if a.whiten:
    adv = losses.whiten(adv, mask)
  return adv, returns, kl


def make_prepare(trainer: Trainer, cfg):
  """Jitted: the rollout's old log-probs and values, the reference log-probs, advantages, returns."""
  a = cfg.align

  def prepare(trainable, frozen, batch):
    params = trainer.params(trainable, frozen)
    old_logp, old_values = policy_and_values(trainer, params, trainable["heads"][HEAD], batch, a.temperature)
    ref_logp = (grpo.token_logps(trainer, frozen["ref"], batch, a.temperature) if a.kl_coef else None)
    mask = batch["loss_mask"]
    adv, returns, kl = advantages(cfg, old_logp, ref_logp, old_values, batch["score"], mask)
    return dict(old_logp=old_logp, old_values=old_values, advantages=adv, returns=returns,
                kl=kl.sum(-1) / jnp.maximum(mask.sum(-1), 1.0))

  return jax.jit(prepare)


def make_loss(cfg):
  a = cfg.align

  def loss_fn(trainer: Trainer, trainable, frozen, batch, key):
    del key
    logp, values = policy_and_values(trainer, trainer.params(trainable, frozen), trainable["heads"][HEAD],
                                     batch, a.temperature)
    mask = batch["loss_mask"]
    pg, metrics = losses.ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, clip_low=a.clip)
    vf, vm = losses.value_loss(values, batch["old_values"], batch["returns"], mask,
                               clip=a.vf_clip if a.vf_clip else None)
    metrics.update(vm)
    metrics.update({"policy/pg_loss": pg, "value/loss": vf, "completion_len": mask.sum(-1).mean()})
    for k in ("score", "kl", "ended") + (("accuracy",) if "accuracy" in batch else ()):
      metrics[k] = batch[k].mean()
    return pg + a.vf_coef * vf, metrics

  return loss_fn


# --- the run ----------------------------------------------------------------------------------------

def rollouts(trainer: Trainer, cfg, convs, prompts, targets, plen: int, row_len: int, scorer):
  """The `batches` iterator of `Trainer.fit`: a fresh rollout every `align.ppo_epochs` steps."""
  a, tok = cfg.align, trainer.tokenizer
  end = chat.end_id(tok)
  frozen = dict(trainer.frozen_base(), **({"ref": trainer.base_params} if a.kl_coef else {}))
  prepare = make_prepare(trainer, cfg)
  k, repeat = divmod(trainer.start, a.ppo_epochs)
  repeat = a.ppo_epochs - repeat  # a run resumed mid-rollout finishes that rollout's epochs.
  while True:
    rng = np.random.default_rng([cfg.run.seed, k])
    idx = rng.choice(len(prompts), a.prompts_per_step, replace=len(prompts) < a.prompts_per_step)
    model = trainer.current_model()
    replies, stopped = grpo.sample(model, [prompts[i] for i in idx], plen, eos_id=end, pad_id=tok.pad_id,
                                   max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                                   seed=int(rng.integers(2**31)))
    del model  # its arrays are the state the next step donates.
    s = scorer([convs[i] for i in idx], replies, stopped, [targets[i] for i in idx])
    batch = grpo.rollout_arrays([prompts[i] for i in idx], replies, stopped, row_len=row_len,
                                pad_id=tok.pad_id, end_id=end)
    batch.update(s)
    trainable = {key: trainer.state[key] for key in trainer.trainable_keys}
    batch.update(jax.device_get(prepare(trainable, frozen, trainer.put_batch(batch))))
    del trainable
    for _ in range(repeat):
      yield batch
    k, repeat = k + 1, a.ppo_epochs


def evaluate(trainer: Trainer, cfg, convs, prompts, targets, plen: int, scorer) -> dict[str, Any]:
  """Verifier tasks: greedy exact match (`grpo.evaluate`); a reward model: mean reward of greedy replies."""
  a = cfg.align
  if not a.reward_model:
    return grpo.evaluate(trainer, cfg, prompts, targets, plen, chunk=a.prompts_per_step)
  tok, chunk = trainer.tokenizer, a.prompts_per_step
  model = trainer.current_model()
  replies, stopped = [], []
  for i in range(0, len(prompts), chunk):
    part = prompts[i:i + chunk]
    r, e = grpo.sample(model, part + [prompts[0]] * (chunk - len(part)), plen, eos_id=chat.end_id(tok),
                       pad_id=tok.pad_id, max_new_tokens=a.max_new_tokens, temperature=0.0)
    replies += r[:len(part)]
    stopped += e[:len(part)]
  s = scorer(convs, replies, stopped, targets)
  return dict(eval_reward=float(s["score"].mean()), eval_ended=float(s["ended"].mean()),
              eval_len=float(np.mean([len(r) for r in replies])))


def run(cfg) -> dict:
  validate(cfg)
  a = cfg.align
  with cfg.unlocked():
    cfg.train.batch_size = a.prompts_per_step  # recorded in config.json as what ran.
  train_convs, train_targets, eval_convs, eval_targets = load_prompts(cfg)
  model_cfg, _, _ = _init_model_config(cfg)
  trainer = Trainer(cfg, heads=heads_spec(model_cfg.d_model))
  tok = trainer.tokenizer
  scorer = make_scorer(cfg, tok)
  room = trainer.model_cfg.max_seq_len - a.max_new_tokens
  enc = lambda cs: [chat.render_prompt(c, tok) for c in cs]
  # grpo.fitting drops (and counts) prompts too long for max_new_tokens; convs ride along with targets.
  prompts, train_pairs = grpo.fitting(enc(train_convs), list(zip(train_convs, train_targets)), room, "train")
  eval_prompts, eval_pairs = grpo.fitting(enc(eval_convs), list(zip(eval_convs, eval_targets)), room,
                                          "held-out")
  train_convs, train_targets = [c for c, _ in train_pairs], [t for _, t in train_pairs]
  eval_convs, eval_targets = [c for c, _ in eval_pairs], [t for _, t in eval_pairs]
  if not prompts:
    raise ConfigError(f"no {a.task} prompt fits max_seq_len - align.max_new_tokens = {room} tokens")
  plen = max(len(q) for q in prompts + eval_prompts)
  row_len = plen + a.max_new_tokens - 1
  print(f"ppo ({a.task}, reward: {a.reward_model or 'verifier'}): {len(prompts)} train prompts, "
        f"{len(eval_prompts)} held out; {a.prompts_per_step} rollouts x {a.ppo_epochs} epochs, rows of "
        f"{row_len} tokens", file=sys.stderr)
  eval_fn = ((lambda t, step: evaluate(t, cfg, eval_convs, eval_prompts, eval_targets, plen, scorer))
             if eval_prompts else None)
  data = rollouts(trainer, cfg, train_convs, prompts, train_targets, plen, row_len, scorer)
  return trainer.fit(make_loss(cfg), data, eval_fn=eval_fn)


def main(argv: Sequence[str] | None = None) -> int:
  return stage_main(run, "configs/align.py:ppo", argv)


if __name__ == "__main__":
  sys.exit(main())
