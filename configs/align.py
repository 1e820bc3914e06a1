"""Presets for post-training stages: `get_config("<stage>[,smoke]")`.

    python -m align.sft --config=configs/align.py:sft --config.init=runs/tiny --config.align.data=gsm8k
    python -m align.dpo --config=configs/align.py:dpo --config.init=runs/tiny-sft --config.align.loss=ipo
    python -m align.sft --config=configs/align.py:sft,smoke --config.init=runs/tiny --config.lora.rank=8

Shared subtrees mirror the pretraining config (`configs/lm.py`): `run`, `optim`, `train`, `mesh`,
`checkpoint`; `init` names the checkpoint to start from, whose architecture is kept (`model` here only
holds the fields a stage may change: compute dtype, attention kernel, remat, dropout); `lora` turns on
adapters (rank 0 = full fine-tuning); `align` holds the stage's own settings.
"""
from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from configs import lm

STAGES = ("sft", "dpo", "reward")


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
        loss="dpo",  # dpo | ipo | robust | simpo | orpo (align/losses.py registry)
        beta=0.1, label_smoothing=0.0, gamma=0.5, tau=0.1, lam=0.1,
        reference="cached"))  # cached: reference log-probs computed once; online: every step.
    c.optim.peak_lr = 5e-6
  elif stage == "reward":
    c.align = ConfigDict(dict(data="hh_rlhf", limit=0, seq_len=512, val_pairs=128, margin=0.0))
    c.optim.peak_lr = 1e-5
  if "smoke" in args:
    c.train.update(dict(steps=10, batch_size=4, log_every=5, eval_every=5))
    c.align.seq_len = 256  # GSM8K conversations: median ~230 tokens with a 1–4k vocabulary.
    c.checkpoint.every = 10
  return c
