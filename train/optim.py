"""Optimizers and learning-rate schedules, chosen by registered name (`optim.name`, `optim.schedule`).

AdamW decays only matrices: params whose logical axes (less the scan `layers` axis) have ≥2 dims, so
norm scales and biases are never shrunk toward 0. Updates pass through global-norm clipping and
`optax.apply_if_finite`, which skips a step whose gradients hold a NaN/Inf and counts it; the loop aborts
after `train.max_nonfinite` consecutive skips.
"""
from __future__ import annotations

from typing import Callable

import optax
from ml_collections import ConfigDict

SCHEDULES: dict[str, Callable[[ConfigDict, int], optax.Schedule]] = {}
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {}


def register(table: dict, name: str):
  def deco(fn):
    table[name] = fn
    return fn
  return deco


@register(SCHEDULES, "cosine")
def cosine(o: ConfigDict, steps: int) -> optax.Schedule:
  """Linear warmup, cosine decay to `final_lr_frac`·peak at the last step, floor after."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.peak_lr, warmup_steps=o.warmup_steps,
      decay_steps=max(steps, o.warmup_steps + 1), end_value=o.peak_lr * o.final_lr_frac)


@register(SCHEDULES, "wsd")
def warmup_stable_decay(o: ConfigDict, steps: int) -> optax.Schedule:
  """Warmup-stable-decay (Hu et al. 2024, MiniCPM): constant peak, linear decay over the last `decay_frac`."""
  decay = max(1, int(steps * o.decay_frac))
  stable = max(0, steps - o.warmup_steps - decay)
  return optax.join_schedules([
      optax.linear_schedule(0.0, o.peak_lr, o.warmup_steps),
      optax.constant_schedule(o.peak_lr),
      optax.linear_schedule(o.peak_lr, o.peak_lr * o.final_lr_frac, decay),
  ], boundaries=[o.warmup_steps, o.warmup_steps + stable])


@register(SCHEDULES, "constant")
def constant(o: ConfigDict, steps: int) -> optax.Schedule:
  return optax.join_schedules([optax.linear_schedule(0.0, o.peak_lr, o.warmup_steps),
                               optax.constant_schedule(o.peak_lr)], boundaries=[o.warmup_steps])


@register(OPTIMIZERS, "adamw")
def adamw(o: ConfigDict, lr: optax.Schedule, decay_mask) -> optax.GradientTransformation:
  return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)


@register(OPTIMIZERS, "lion")
def lion(o: ConfigDict, lr: optax.Schedule, decay_mask) -> optax.GradientTransformation:
  return optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)


def decay_mask(param_axes) -> object:
  """True for matrices: a tree like the params, from their logical axes."""
  import jax
  return jax.tree.map(lambda axes: len([a for a in axes if a != "layers"]) >= 2, param_axes,
                      is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(o: ConfigDict, steps: int, param_axes) -> tuple[optax.GradientTransformation, optax.Schedule]:
  if o.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule={o.schedule!r} unknown; known: {sorted(SCHEDULES)}")
  if o.name not in OPTIMIZERS:
    raise ValueError(f"optim.name={o.name!r} unknown; known: {sorted(OPTIMIZERS)}")
  schedule = SCHEDULES[o.schedule](o, steps)
  chain = [optax.clip_by_global_norm(o.clip)] if o.clip > 0 else []
  chain.append(OPTIMIZERS[o.name](o, schedule, decay_mask(param_axes)))
  # The loop enforces the consecutive-skip limit itself; optax's own limit would let NaNs through.
  tx = optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=1 << 30)
  return tx, schedule
