"""Preference optimization (DPO family) on chosen/rejected pairs.

    python -m align.dpo --config=configs/align.py:dpo --config.init=runs/tiny-sft
    python -m align.dpo --config=configs/align.py:dpo --config.init=runs/tiny-sft --config.align.loss=ipo \\
        --config.align.reference=online --config.lora.rank=8

`align.loss` picks a registered loss of `align/losses.py`: `dpo` (sigmoid; `label_smoothing` > 0 is
conservative DPO), `robust` (rDPO), `ipo`, `kto` (each chosen reply desirable, each rejected one
undesirable; its reference point z0 is the policy/reference KL on mismatched rows, each prompt paired
with the next pair's chosen reply: `data.preference.mismatched_arrays`), `simpo` and `orpo`
(reference-free: no reference pass).
The reference is the init checkpoint. `align.reference=cached` computes its log-probs of every pair
once before training (one forward per pair instead of one per step); `online` recomputes them in each
step from the frozen params (what a run with changing data, e.g. iterative DPO, needs).

Data: `hh_rlhf` (the shared HH-RLHF harmless pairs: the dialogue up to the last reply is the prompt)
or a JSONL of `{"prompt"|"messages", "chosen", "rejected"}` (`data/preference.py`). The last
`align.val_pairs` pairs are held out: every `train.eval_every` steps (and before the first step) the
run reports their implicit-reward accuracy (β·log π/π_ref of the chosen reply above the rejected one)
and mean margin — for reference-free losses, the accuracy of the length-normalized policy
log-probability, the quantity SimPO/ORPO optimize.
"""
from __future__ import annotations

import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align import losses
from align.trainer import Trainer, logps_of, stage_main
from configs.loader import ConfigError
from data import preference, sft

REFERENCE_FREE = ("simpo", "orpo")


def load(spec: str, limit: int | None):
  if spec == "hh_rlhf":
    return sft.hh_rlhf_pairs(limit=limit)
  return preference.load_pairs(spec, limit=limit)


def split_pairs(cfg, tokenizer, label: str) -> tuple[dict, dict]:
  """`align.data` pairs as padded arrays, split into (train, held-out last `align.val_pairs`)."""
  a = cfg.align
  pairs, counts = load(a.data, a.limit or None)
  arrays, pack_counts = preference.pair_arrays(pairs, tokenizer, a.seq_len)
  n = len(arrays["chosen_inputs"])
  if n <= a.val_pairs + cfg.train.batch_size:
    raise ConfigError(f"{n} usable pairs (of {counts['read']} read; {pack_counts['dropped']} dropped): need more "
                      f"than align.val_pairs + train.batch_size = {a.val_pairs + cfg.train.batch_size}")
  print(f"{label}: {n} pairs ({counts}; {pack_counts}), {a.val_pairs} held out", file=sys.stderr)
  return ({k: v[:-a.val_pairs] for k, v in arrays.items()}, {k: v[-a.val_pairs:] for k, v in arrays.items()})


def hparams(cfg) -> dict:
  """The config values the chosen loss takes (align.beta, .label_smoothing, .gamma, .tau, .lam)."""
  a = cfg.align
  names = losses.preference_hparams(a.loss)
  return {k: a[k] for k in names if k in a}


def sides_of(arrays: dict) -> tuple[str, ...]:
  """The row sets present: chosen, rejected, and KTO's mismatched `kl` rows when built."""
  return tuple(s for s in preference.SIDES + ("kl",) if f"{s}_inputs" in arrays)


def side_logps(trainer: Trainer, params, batch: dict) -> dict:
  """Summed reply log-probs of each side under `params`, and their reply token counts."""
  out = {}
  for side in sides_of(batch):
    total, n = logps_of(trainer, params, batch, prefix=f"{side}_")
    out[side] = total
    out[f"{side}_n"] = n
  return out


def make_loss(cfg, reference_free: bool):
  name, hp, online = cfg.align.loss, hparams(cfg), cfg.align.reference == "online"

  def loss_fn(trainer: Trainer, trainable, frozen, batch, key):
    del key
    pol = side_logps(trainer, trainer.params(trainable, frozen), batch)
    inputs = dict(policy_chosen=pol["chosen"], policy_rejected=pol["rejected"],
                  chosen_len=batch["chosen_len"], rejected_len=batch["rejected_len"])
    if name == "kto":
      inputs["policy_kl"] = pol["kl"]
    if name == "orpo":
      inputs["chosen_nll"] = -pol["chosen"] / jnp.maximum(pol["chosen_n"], 1.0)
    if not reference_free:
      if online:
        ref = side_logps(trainer, frozen["ref"], batch)
      else:
        ref = {side: batch[f"ref_{side}"] for side in sides_of(batch)}
      inputs.update({f"ref_{side}": ref[side] for side in sides_of(batch)})
    return losses.preference_loss(name, inputs, **hp)

  return loss_fn


def all_logps(trainer: Trainer, params, arrays: dict, batch_size: int, fn=None) -> dict[str, np.ndarray]:
  """Each side's summed reply log-probs for every pair (batched; pass one `logps_fn(trainer)` to every
  call so a run compiles it once, not once per call)."""
  fn = fn or logps_fn(trainer)
  keys = [k for k in arrays if k.split("_")[0] in sides_of(arrays) and not k.endswith("_len")]
  out: dict[str, list] = {side: [] for side in sides_of(arrays)}
  n = len(arrays["chosen_inputs"])
  for i in range(0, n, batch_size):
    chunk = {k: arrays[k][i:i + batch_size] for k in keys}
    short = batch_size - len(chunk["chosen_inputs"])
    if short:  # pad the last chunk to one shape (one compile), drop the pad rows' results.
      chunk = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
    res = jax.device_get(fn(params, trainer.put_batch(chunk)))
    for side in out:
      out[side].append(np.asarray(res[side])[:batch_size - short])
  return {side: np.concatenate(v) for side, v in out.items()}


def logps_fn(trainer: Trainer):
  return jax.jit(lambda p, b: side_logps(trainer, p, b))


def preference_metrics(cfg, policy: dict, ref: dict | None, arrays: dict) -> dict:
  beta = cfg.align.beta
  if ref is None:  # reference-free: length-normalized log-probs (SimPO's reward / β).
    c = policy["chosen"] / np.maximum(arrays["chosen_len"], 1)
    r = policy["rejected"] / np.maximum(arrays["rejected_len"], 1)
  else:
    c, r = beta * (policy["chosen"] - ref["chosen"]), beta * (policy["rejected"] - ref["rejected"])
  return dict(val_accuracy=float(np.mean(c > r)), val_margin=float(np.mean(c - r)),
              val_chosen_logp=float(np.mean(policy["chosen"])),
              val_rejected_logp=float(np.mean(policy["rejected"])))


def batches(arrays: dict, extra: dict, batch_size: int, *, seed: int, start: int):
  """Shuffled pair batches, epoch after epoch, deterministic by seed; skips `start` batches (resume)."""
  n = len(arrays["chosen_inputs"])
  data = dict(arrays, **extra)
  step, epoch = 0, 0
  while True:
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
      if step >= start:
        idx = order[i:i + batch_size]
        yield {k: v[idx] for k, v in data.items()}
      step += 1
    epoch += 1


def run(cfg) -> dict:
  a = cfg.align
  if a.loss not in losses.PREFERENCE_LOSSES:
    raise ConfigError(f"align.loss={a.loss!r} unknown; known: {sorted(losses.PREFERENCE_LOSSES)}")
  if a.reference not in ("cached", "online"):
    raise ConfigError(f"align.reference={a.reference!r} must be 'cached' or 'online'")
  reference_free = a.loss in REFERENCE_FREE
  trainer = Trainer(cfg)
  if a.seq_len > trainer.model_cfg.max_seq_len:
    raise ConfigError(f"align.seq_len={a.seq_len} exceeds the model's max_seq_len={trainer.model_cfg.max_seq_len}")
  train, val = split_pairs(cfg, trainer.tokenizer, f"dpo ({a.loss})")
  if a.loss == "kto":
    train.update(preference.mismatched_arrays(train))

  fn = logps_fn(trainer)  # one compile for the reference passes and every evaluation.
  ref_val = None if reference_free else all_logps(trainer, trainer.base_params, val, cfg.train.batch_size, fn)
  extra = {}
  if not reference_free and a.reference == "cached":
    ref_train = all_logps(trainer, trainer.base_params, train, cfg.train.batch_size, fn)
    extra = {f"ref_{side}": v for side, v in ref_train.items()}
  frozen = dict(ref=trainer.base_params) if (a.reference == "online" and not reference_free) else {}

  def evaluate(t: Trainer, step: int) -> dict:
    params = t.params({k: t.state[k] for k in t.trainable_keys}, t.frozen_base())
    return preference_metrics(cfg, all_logps(t, params, val, cfg.train.batch_size, fn), ref_val, val)

  data = batches(train, extra, cfg.train.batch_size, seed=cfg.run.seed, start=trainer.start)
  return trainer.fit(make_loss(cfg, reference_free), data, frozen=frozen, eval_fn=evaluate)


def main(argv: Sequence[str] | None = None) -> int:
  return stage_main(run, "configs/align.py:dpo", argv)


if __name__ == "__main__":
  sys.exit(main())
