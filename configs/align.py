"""Presets for post-training stages: `get_config("<stage>[,smoke]")`.

    python -m align.sft --config=configs/align.py:sft --config.init=runs/tiny --config.align.data=gsm8k
    python -m align.dpo --config=configs/align.py:dpo --config.init=runs/tiny-sft --config.align.loss=ipo
    python -m align.sft --config=configs/align.py:sft,smoke --config.init=runs/tiny --config.lora.rank=8
    python -m align.grpo --config=configs/align.py:grpo --config.init=runs/tiny-sft --config.align.task=arithmetic
    python -m align.ppo --config=configs/align.py:ppo --config.init=runs/tiny-sft --config.align.task=hh_rlhf \
        --config.align.reward_model=runs/tiny-rm

Shared subtrees mirror the pretraining config (`configs/lm.py`): `run`, `optim`, `train`, `mesh`,
`checkpoint`; `init` names the checkpoint to start from, whose architecture is kept (`model` here only
holds the fields a stage may change: compute dtype, attention kernel, remat, dropout); `lora` turns on
adapters (rank 0 = full fine-tuning); `align` holds the stage's own settings.
"""
from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from configs import lm

STAGES = ("sft", "dpo", "reward", "grpo", "ppo")


def base(stage: str) -> ConfigDict:
  pre = lm.base()
  c = ConfigDict()
  c.run = ConfigDict(dict(name=stage, dir="", seed=0))
  c.init = config_dict.placeholder(str)  # run or checkpoint directory of the starting model.
  c.model = ConfigDict(dict(compute_dtype="float32", attention="xla", remat="none", dropout=0.0))
  c.optim = pre.optim
  # Fine-tuning: a 10× lower peak than pretraining, short warmup, no decay toward 0.1 (Tulu/TRL-like).
  c.optim.update(dict(peak_lr=3e-5, warmup_steps=10, schedule="cosine", final_lr_frac=0.1,
                      weight_decay=0.0))
  c.train = ConfigDict(dict(steps=200, batch_size=16, grad_accum=1, log_every=10, eval_every=50,
                            max_nonfinite=20, progress=True))
  c.mesh = pre.mesh
  c.checkpoint = pre.checkpoint
  c.dist = pre.dist
  c.checkpoint.update(dict(every=100, async_save=False))
  c.lora = ConfigDict(dict(rank=0, alpha=16.0, targets=("wq", "wk", "wv", "wo")))
  return c


def get_config(arg: str | None = None) -> ConfigDict:
  args = [a for a in (arg or "sft").split(",") if a]
  stage = next((a for a in args if a in STAGES), None)
  unknown = [a for a in args if a not in STAGES and a != "smoke"]
  if stage is None or unknown:
    raise ValueError(f"configs/align.py: expected one stage of {STAGES} (+ 'smoke'), got {args}")
  c = base(stage)
  if stage == "sft":
    c.align = ConfigDict(dict(
        data="gsm8k",  # gsm8k | hh_rlhf | path to JSONL ({"messages": [...]} or {"prompt", "response"}).
        limit=0,  # first N conversations (0: all).
        seq_len=512,
        val_examples=64,  # held out from the end of the data: val loss and the format check.
        sample_replies=32, max_new_tokens=128))  # replies sampled at each eval: do they end with <|end|>?
    c.optim.peak_lr = 1e-4
  elif stage == "dpo":
    c.align = ConfigDict(dict(
        data="hh_rlhf",  # hh_rlhf | path to JSONL {"prompt"|"messages", "chosen", "rejected"}.
        limit=0, seq_len=512, val_pairs=128,
        loss="dpo",  # dpo | ipo | robust | kto | simpo | orpo (align/losses.py registry)
        beta=0.1, label_smoothing=0.0, gamma=0.5, tau=0.1, lam=0.1,
        lambda_d=1.0, lambda_u=1.0,  # KTO's weights of desirable / undesirable examples.
        reference="cached"))  # cached: reference log-probs computed once; online: every step.
    c.optim.peak_lr = 5e-6
  elif stage == "reward":
    c.align = ConfigDict(dict(data="hh_rlhf", limit=0, seq_len=512, val_pairs=128, margin=0.0))
    c.optim.peak_lr = 1e-5
  elif stage == "grpo":
    c.align = ConfigDict(dict(
        task="arithmetic",  # arithmetic (data/tasks/arithmetic.py) | gsm8k (shared train/test files).
        digits=(1, 2), ops=("+", "-"),  # arithmetic only: operand digit range and operators.
        train_examples=5000,  # prompt pool (arithmetic: generated; gsm8k: first N of train, 0 = all).
        eval_examples=200,  # held-out problems: greedy exact match before training and every eval_every.
        prompts_per_step=8, group_size=8,  # rows per step = 8 × 8 = 64 sampled completions.
        temperature=1.0, top_p=1.0,  # T=1, no top-p: rollouts come from the very policy being trained.
        max_new_tokens=32,  # arithmetic replies are ~16-20 tokens (digits are single tokens); gsm8k ~256.
        inner_steps=1,  # optimizer steps per rollout batch (GRPO's μ; 1 = on-policy, ratio ≡ 1).
        clip_low=0.2, clip_high=0.2,  # PPO ε; clip_high=0.28 is DAPO's clip-higher.
        beta_kl=0.04,  # k3 KL to the init policy (Shao et al. 2024); 0 drops the reference pass.
        advantage_scale="std",  # std (GRPO) | none (Dr.GRPO: centred only).
        aggregation="seq_mean_token_mean",  # | token_mean (DAPO) | seq_mean_token_sum_norm (Dr.GRPO).
        format_bonus=0.0))  # added to the 0/1 reward when the reply ends with <|end|> and has a "####".
    # RL on a fine-tuned policy: a constant small lr (TRL's GRPO default is 1e-6 for 7B models). Tiny
    # models need far more: the 140k-param `tiny,smoke` demo (align/grpo.py) ran at 2e-4 — 49% → 70%
    # held-out arithmetic in 1000 steps, ~4 min on 2 CPU cores — where 1e-3 collapsed (49% → 26%).
    c.optim.update(dict(peak_lr=1e-5, warmup_steps=0, schedule="constant"))
    # batch_size is derived: prompts_per_step × group_size (align.grpo sets it).
    c.train.update(dict(steps=100, batch_size=64, log_every=5, eval_every=25))
  elif stage == "ppo":
    c.align = ConfigDict(dict(
        task="arithmetic",  # arithmetic | gsm8k (verifier rewards) | hh_rlhf (prompts; needs reward_model).
        reward_model="",  # run dir of `python -m align.reward`: scores replies instead of the task's checker.
        digits=(1, 2), ops=("+", "-"),  # arithmetic only (as grpo).
        train_examples=5000,  # prompt pool (hh_rlhf / gsm8k: first N of the file, 0 = all).
        eval_examples=200,  # held-out prompts: greedy exact match (or mean reward) every eval_every steps.
        prompts_per_step=32,  # rollouts per step: one reply per prompt.
        temperature=1.0, top_p=1.0, max_new_tokens=32,
        ppo_epochs=4,  # optimizer steps per rollout batch (TRL's num_ppo_epochs = 4).
        clip=0.2, vf_clip=0.2,  # PPO ε for the ratio and the value (TRL: cliprange, cliprange_value).
        vf_coef=0.1,  # value-loss weight on the shared trunk (TRL's default).
        kl_coef=0.05,  # β of the per-token −β·KL reward (TRL's PPO default 0.05).
        gamma=1.0, lam=0.95,  # GAE (TRL's defaults: undiscounted episodes, λ 0.95).
        whiten=True,  # normalize advantages over the batch's reply tokens.
        missing_end_penalty=0.0))  # subtracted from the score of a reply cut off before <|end|>.
    # TRL's PPO default is 3e-6 for billion-parameter models; 4M-parameter ones need ~100× more (see
    # the GRPO demo's LR notes in align/grpo.py).
    c.optim.update(dict(peak_lr=1e-5, warmup_steps=0, schedule="constant"))
    c.train.update(dict(steps=100, batch_size=32, log_every=4, eval_every=20))  # batch_size: derived.
  if "smoke" in args:
    c.train.update(dict(steps=10, batch_size=4, log_every=5, eval_every=5))
    if stage == "ppo":
      c.align.update(dict(train_examples=200, eval_examples=8, prompts_per_step=4, max_new_tokens=8,
                          ppo_epochs=2))
    elif stage == "grpo":
      c.align.update(dict(train_examples=200, eval_examples=8, prompts_per_step=2, group_size=4,
                          max_new_tokens=8))
      c.train.batch_size = 8
    else:
      c.align.seq_len = 256  # GSM8K conversations: median ~230 tokens with a 1–4k vocabulary.
    c.checkpoint.every = 10
  return c
