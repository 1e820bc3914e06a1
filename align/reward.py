"""Reward model: the language model with a scalar head, trained on chosen/rejected pairs (Bradley-Terry).

    python -m align.reward --config=configs/align.py:reward --config.init=runs/tiny-sft
    python -m align.reward --config=configs/align.py:reward,smoke --config.init=runs/tiny-sft \\
        --config.lora.rank=8 --config.align.margin=0.5

    rm = load_reward_model("runs/reward")               # later stages (PPO, best-of-n, data filtering)
    r = rm(prompts, replies)                            # np.ndarray [N] float32
    r = score("runs/reward", prompts, replies)          # the same, loading each time

Model: the init checkpoint's network up to its final norm (`Transformer.features`, no vocabulary
projection) and a head `reward = h · w + b`, with h the hidden state at the last reply position — the
last input whose target is in the reply's loss mask, i.e. the one that has read the whole reply (as
TRL's sequence-classification reward models read the last non-pad token). Full fine-tuning, or LoRA
adapters (`lora.rank > 0`) with the head trained in full.

Loss: −log σ(r_chosen − r_rejected − m) (Ouyang et al. 2022 eq. 1; the constant margin m =
`align.margin` is Llama 2's, Touvron et al. 2023 eq. 2). It only sees reward differences, so `b` is
not trained and stays at its initial 0: it is there for a later stage that wants to shift the scale.

Data as `align/dpo.py`: `hh_rlhf` (shared HH-RLHF harmless pairs) or a JSONL of
`{"prompt"|"messages", "chosen", "rejected"}`, rendered by `data.preference.pair_arrays`; the last
`align.val_pairs` pairs are held out. Before the first step and every `train.eval_every` steps the run
logs their accuracy (r_chosen > r_rejected), mean margin r_chosen − r_rejected and loss.

Checkpoints are the trainer's (`align/trainer.py`): `state["params"]` is the full model (LoRA merged),
`state["heads"]["reward"]` the head; `load_reward_model` restores just those two subtrees.
"""
from __future__ import annotations

import pathlib
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from align import dpo, losses
from align.trainer import Trainer, _init_model_config, stage_main
from configs.loader import ConfigError
from data import preference
from data.tokenizer import tokenizer_from_meta
from model.load import find_step_dir, load_model

HEAD = "reward"
# HF's sequence-classification head init (std = initializer_range = 0.02): step-0 rewards are small and
# distinct, so the step-0 accuracy is a real ~50% baseline; an all-zero head would tie every pair and
# give the trunk no gradient on the first step.
HEAD_INIT = "normal"


def heads_spec(d_model: int) -> dict:
  """The trainer's `heads` argument: one scalar head over the [D] final-norm features."""
  return {HEAD: {"w": ((d_model,), ("embed",), HEAD_INIT), "b": ((), (), "zeros")}}


def rewards_of(model, head: dict, inputs, positions, segment_ids, loss_mask) -> jax.Array:
  """Scalar reward per row [B] (fp32): h[last reply position] · w + b."""
  h = model.features(inputs, positions=positions, segment_ids=segment_ids)  # [B, T, D]
  t = jnp.arange(inputs.shape[1])
  # Last position whose target is a reply token (its input is the reply's last token, the end of what
  # the row has read); a row with no reply token reads position 0 (only padding rows of `score`).
  last = jnp.max(jnp.where(loss_mask > 0, t, 0), axis=-1)
  h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
  return h_last @ head["w"].astype(jnp.float32) + head["b"].astype(jnp.float32)


def pair_rewards(model, head: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(r_chosen [B], r_rejected [B]) in one forward over both sides stacked along the batch."""
  fields = ("inputs", "positions", "segment_ids", "loss_mask")
  both = {f: jnp.concatenate([batch[f"{s}_{f}"] for s in preference.SIDES]) for f in fields}
  r = rewards_of(model, head, **both)
  n = batch["chosen_inputs"].shape[0]
  return r[:n], r[n:]


def make_loss(margin: float):
  def loss_fn(trainer: Trainer, trainable, frozen, batch, key):
    del key
    model = trainer.model(trainer.params(trainable, frozen))
    head = dict(trainable["heads"][HEAD])
    # The loss sees only r_c − r_r, so b's gradient is 0 up to summation rounding (~1e-9), which
    # Adam would normalize into lr-sized steps of noise: make it exactly 0.
    head["b"] = jax.lax.stop_gradient(head["b"])
    r_c, r_r = pair_rewards(model, head, batch)
    return losses.bradley_terry_loss(r_c, r_r, margin if margin else None)
  return loss_fn


def _chunks(arrays: dict, keys: Sequence[str], batch_size: int):
  """(chunk, n_real) of `batch_size` rows; the last one zero-padded to the same shape (one compile)."""
  n = len(arrays[keys[0]])
  for i in range(0, n, batch_size):
    chunk = {k: arrays[k][i:i + batch_size] for k in keys}
    real = len(chunk[keys[0]])
    if real < batch_size:
      chunk = {k: np.concatenate([v, np.zeros((batch_size - real,) + v.shape[1:], v.dtype)])
               for k, v in chunk.items()}
    yield chunk, real


def _pair_keys() -> list[str]:
  return [f"{s}_{f}" for s in preference.SIDES for f in ("inputs", "positions", "segment_ids", "loss_mask")]


def val_metrics(r_chosen: np.ndarray, r_rejected: np.ndarray, margin: float) -> dict:
  diff = np.asarray(r_chosen, np.float64) - np.asarray(r_rejected, np.float64)
  # −log σ(z) = log(1 + e^{−z}), stably.
  return dict(val_accuracy=float(np.mean(diff > 0)), val_margin=float(np.mean(diff)),
              val_loss=float(np.mean(np.logaddexp(0.0, -(diff - margin)))))


def run(cfg) -> dict:
  a = cfg.align
  if a.margin < 0:
    raise ConfigError(f"align.margin={a.margin} must be >= 0 (how much the chosen reply must win by)")
  model_cfg, _, _ = _init_model_config(cfg)  # the trainer's own check of --config.init, done first.
  if a.seq_len > model_cfg.max_seq_len:
    raise ConfigError(f"align.seq_len={a.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
  trainer = Trainer(cfg, heads=heads_spec(model_cfg.d_model))
  train, val = dpo.split_pairs(cfg, trainer.tokenizer, "reward")

  val_fn = jax.jit(lambda params, head, batch: pair_rewards(trainer.model(params), head, batch))
  keys = _pair_keys()

  def evaluate(t: Trainer, step: int) -> dict:
    del step
    trainable = {k: t.state[k] for k in t.trainable_keys}
    params, head = t.params(trainable, t.frozen_base()), trainable["heads"][HEAD]
    out = {s: [] for s in preference.SIDES}
    for chunk, real in _chunks(val, keys, cfg.train.batch_size):
      r_c, r_r = jax.device_get(val_fn(params, head, t.put_batch(chunk)))
      out["chosen"].append(np.asarray(r_c)[:real])
      out["rejected"].append(np.asarray(r_r)[:real])
    return val_metrics(np.concatenate(out["chosen"]), np.concatenate(out["rejected"]), a.margin)

  data = dpo.batches(train, {}, cfg.train.batch_size, seed=cfg.run.seed, start=trainer.start)
  return trainer.fit(make_loss(a.margin), data, eval_fn=evaluate)


# --- using a trained reward model -------------------------------------------------------------------

class RewardModel:
  """A trained reward model on one device: `rm(prompts, replies) -> np.ndarray [N]`.

  A prompt is a conversation ending in a user turn (`[{"role", "content"}, ...]`) or a string (one user
  turn); each reply is rendered as in training (`data.preference.render_side`, prompt cut from the left
  to `seq_len`, by default the training run's `align.seq_len`), so a pair scores as it did there.
  """

  def __init__(self, run_dir: str | pathlib.Path, *, seq_len: int | None = None, batch_size: int = 16):
    self.model, meta = load_model(run_dir)
    self.tokenizer = tokenizer_from_meta(meta)
    self.head = load_head(run_dir)
    if self.head["w"].shape != (self.model.cfg.d_model,):
      raise ValueError(f"{run_dir}: reward head w{self.head['w'].shape} doesn't match the model's "
                       f"d_model={self.model.cfg.d_model}")
    trained_len = (meta.get("config", {}).get("align") or {}).get("seq_len")
    self.seq_len = int(seq_len or trained_len or self.model.cfg.max_seq_len)
    self.batch_size = batch_size
    from flax import nnx  # pylint: disable=g-import-not-at-top
    graphdef, state = nnx.split(self.model, nnx.Param)
    self._params = nnx.to_pure_dict(state)
    self._fn = jax.jit(lambda params, head, batch: rewards_of(
        nnx.merge(graphdef, params), head, batch["chosen_inputs"], batch["chosen_positions"],
        batch["chosen_segment_ids"], batch["chosen_loss_mask"]))

  def __call__(self, prompts: Sequence, replies: Sequence[str]) -> np.ndarray:
    if len(prompts) != len(replies):
      raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    convs = [[dict(role="user", content=p)] if isinstance(p, str) else list(p) for p in prompts]
    # pair_arrays renders and truncates exactly as training did; the "rejected" side is a dummy copy.
    items = [dict(prompt=c, chosen=r, rejected=r) for c, r in zip(convs, replies)]
    arrays, counts = preference.pair_arrays(items, self.tokenizer, self.seq_len)
    if counts["kept"] != len(items):
      too_long = [i for i, item in enumerate(items)
                  if not preference.pair_arrays([item], self.tokenizer, self.seq_len)[1]["kept"]]
      raise ValueError(f"replies {too_long[:10]} leave no room for the prompt in seq_len={self.seq_len}")
    keys = [k for k in _pair_keys() if k.startswith("chosen_")]
    out = [np.asarray(self._fn(self._params, self.head, {k: jnp.asarray(v) for k, v in chunk.items()}))[:real]
           for chunk, real in _chunks(arrays, keys, self.batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def load_head(run_dir: str | pathlib.Path) -> dict:
  """The checkpoint's `state["heads"]["reward"]` ({"w": [D], "b": []}) alone, by Orbax partial restore."""
  state_dir = find_step_dir(run_dir).absolute() / "state"  # Orbax's tensorstore paths must be absolute.
  handler = ocp.PyTreeCheckpointHandler()
  # A partial restore of an absent subtree returns the target unfilled instead of failing: look first.
  saved = (handler.metadata(state_dir).tree.get("heads") or {}).get(HEAD) or {}
  if set(saved) != {"w", "b"}:
    raise ValueError(f"{state_dir.parent} has no reward head (state['heads']['{HEAD}'] with 'w' and 'b'): "
                     "is it a `python -m align.reward` run?")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"heads": {HEAD: {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
                             for k, m in saved.items()}}}
  with ocp.Checkpointer(handler) as ckptr:
    restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  return restored["heads"][HEAD]


def load_reward_model(run_dir: str | pathlib.Path, **kwargs) -> RewardModel:
  return RewardModel(run_dir, **kwargs)


def score(run_dir: str | pathlib.Path, prompts: Sequence, replies: Sequence[str], **kwargs) -> np.ndarray:
  """Rewards [N] of (prompt, reply) pairs under the reward model saved in `run_dir`."""
  return RewardModel(run_dir, **kwargs)(prompts, replies)


def main(argv: Sequence[str] | None = None) -> int:
  return stage_main(run, "configs/align.py:reward", argv)


if __name__ == "__main__":
  sys.exit(main())
