"""The training run config: `--config=configs/<file>.py:<args>` plus `--config.a.b=value` overrides.

The preset's `get_config(arg)` returns an `ml_collections.ConfigDict`; it is locked, so a typo'd key
or a value of the wrong type is a `ConfigError` naming the key (one line, no traceback at the CLI).
`resolve` then computes every derived value in one place (vocab size from the tokenizer, head_dim, the
run directory).
"""
from __future__ import annotations

import pathlib
from typing import Sequence

from ml_collections import ConfigDict

from configs import loader as _loader
from configs.loader import (ConfigError, apply_override, load_preset, main_guard,  # noqa: F401
                            to_json_dict)

DEFAULT_CONFIG = "configs/lm.py:tiny"


def parse_args(argv: Sequence[str], default: str = DEFAULT_CONFIG) -> tuple[ConfigDict, list[str]]:
  """`configs.loader.parse_args` with the training preset as default."""
  return _loader.parse_args(argv, default)


def run_dir(cfg: ConfigDict) -> pathlib.Path:
  return pathlib.Path(cfg.run.dir or f"runs/{cfg.run.name}")


def resolve(cfg: ConfigDict, tokenizer_vocab: int | None = None) -> ConfigDict:
  """Fills derived values in place. The only place they are computed."""
  with cfg.unlocked():
    if tokenizer_vocab is not None:
      if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = -(-tokenizer_vocab // 128) * 128  # multiple of 128: lane-aligned logits.
      elif cfg.model.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer_vocab})")
    if cfg.model.head_dim == 0:
      cfg.model.head_dim = cfg.model.d_model // cfg.model.n_heads
    if not cfg.run.dir:
      cfg.run.dir = str(run_dir(cfg))
  if cfg.data.seq_len > cfg.model.max_seq_len:
    raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
  if cfg.train.batch_size % cfg.train.grad_accum:
    raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                      f"train.grad_accum={cfg.train.grad_accum}")
  return cfg


def model_config(cfg: ConfigDict):
  from model.config import ModelConfig
  d = dict(cfg.model.to_dict())
  d["remat"] = cfg.train.remat
  try:
    return ModelConfig.from_dict(d)
  except ValueError as e:
    raise ConfigError(str(e)) from None


