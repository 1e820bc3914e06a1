"""One training loop for every post-training stage, on top of `train/` (mesh, rules, optimizer,
checkpoints, metrics are `train/`'s; nothing here re-implements them).

    trainer = Trainer(cfg, heads={"reward": {"w": ((d,), ("embed",), "normal"), "b": ((), (), "zeros")}})
    summary = trainer.fit(loss_fn, batches, frozen=dict(ref=trainer.base_params), eval_fn=...)

A stage (`align/sft.py`, `align/dpo.py`, ...) supplies:
- `loss_fn(trainer, trainable, frozen, batch, key) -> (loss, metrics)`, traced inside the one jitted step:
  `trainer.params(trainable, frozen)` gives the model's param tree (LoRA applied when enabled) and
  `trainer.model(params)` the NNX model; `trainable["heads"]` holds stage heads (reward, value);
- `batches`: an iterator of dicts of host numpy arrays whose first axis is the batch (sharded over the
  data axes); `frozen`: arrays the loss reads but doesn't train (reference params, cached log-probs).

Starting point: `cfg.init`, a run or step directory (pretrained, imported from Hugging Face, or an
earlier stage); its model config is taken as is — only `cfg.model`'s non-param fields (compute dtype,
attention kernel, remat, dropout) may change. With `cfg.lora.rank > 0` only adapters (and heads) train
and the optimizer holds state for them alone; the base params are frozen inputs of the step.

Run directory: the same layout as pretraining, so `model.load`, `train.sample`, `train.evaluate` and the
next stage read it: `checkpoints/<step>/state` holds `params` (the full model; LoRA merged in), plus
`lora`, `heads`, `opt_state`, `step`, `rng` to resume; `meta` carries the model config and the tokenizer
of the init checkpoint. Rerunning the same command resumes from the latest checkpoint.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict
from tqdm import tqdm

from configs.loader import ConfigError, main_guard, parse_args, to_json_dict
from data.errors import DataError
from data.tokenizer import tokenizer_from_meta
from model.config import ModelConfig
from model.load import find_step_dir, load_model, make_meta, model_config_from_meta, read_meta
from model.axes import activation_constraints
from train import sharding
from train.checkpoint import Checkpointer
from train.metrics import MetricsWriter
from train.optim import make_optimizer
from train.state import abstract_model

# Model fields a stage may change on top of the init checkpoint: they alter neither the param tree nor
# what the params mean.
MODEL_OVERRIDES = ("compute_dtype", "attention", "remat", "dropout", "logits_dtype")
HEAD_INITS = {"zeros": jax.nn.initializers.zeros, "normal": jax.nn.initializers.normal(0.02)}

LossFn = Callable[..., tuple[jax.Array, dict]]


def _init_model_config(cfg: ConfigDict) -> tuple[ModelConfig, pathlib.Path, dict]:
  if not cfg.init:
    raise ConfigError("--config.init is required: the run or checkpoint directory to start from")
  try:
    step_dir = find_step_dir(cfg.init)
    meta = read_meta(step_dir)
    model_cfg = model_config_from_meta(meta)
  except (FileNotFoundError, KeyError, ValueError) as e:
    raise ConfigError(f"--config.init={cfg.init}: {e}") from None
  unknown = sorted(set(cfg.model) - set(MODEL_OVERRIDES))
  if unknown:
    raise ConfigError(f"model.{unknown[0]} can't change after pretraining; only {MODEL_OVERRIDES} can")
  overrides = {k: v for k, v in cfg.model.items() if v is not None}
  try:
    return ModelConfig.from_dict(dict(model_cfg.to_dict(), **overrides)), step_dir, meta
  except ValueError as e:
    raise ConfigError(str(e)) from None


class Trainer:

  def __init__(self, cfg: ConfigDict, *, heads: dict[str, dict[str, tuple]] | None = None):
    self.cfg = cfg
    if not cfg.run.dir:
      with cfg.unlocked():
        cfg.run.dir = f"runs/{cfg.run.name}"
    self.run_dir = pathlib.Path(cfg.run.dir)
    if cfg.train.grad_accum != 1:
      raise ConfigError("align stages don't support train.grad_accum yet; lower train.batch_size")
    self.model_cfg, self.init_dir, self.init_meta = _init_model_config(cfg)
    self.tokenizer = tokenizer_from_meta(self.init_meta)
    self.mesh = sharding.make_mesh(cfg.mesh)
    self.rules = sharding.rules_for(cfg.mesh)
    self.graphdef, shapes, self.param_axes = abstract_model(self.model_cfg)
    is_axes = lambda x: isinstance(x, tuple)
    self.param_shardings = jax.tree.map(lambda a, s: self._named(a, s.shape), self.param_axes, shapes,
                                        is_leaf=is_axes)
    model, _ = load_model(self.init_dir, shardings=self.param_shardings,
                          **{k: getattr(self.model_cfg, k) for k in MODEL_OVERRIDES})
    self.base_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # frozen: reference / LoRA base.

    # Trainable tree: the model params (full fine-tuning) or LoRA adapters, plus stage heads.
    trainable, axes = {}, {}
    self.lora_cfg = None
    if cfg.lora.rank > 0:
      from align import lora  # pylint: disable=g-import-not-at-top
      self.lora_cfg = lora.LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets))
      trainable["lora"] = lora.init(self.base_params, self.param_axes, self.lora_cfg,
                                    jax.random.PRNGKey(cfg.run.seed))
      axes["lora"] = lora.lora_axes(self.param_axes, self.lora_cfg)
    else:
      trainable["params"] = jax.tree.map(jnp.copy, self.base_params)  # the base stays the reference.
      axes["params"] = self.param_axes
    if heads:
      key = jax.random.PRNGKey(cfg.run.seed + 1)
      trainable["heads"], axes["heads"] = {}, {}
      for name, leaves in heads.items():
        trainable["heads"][name], axes["heads"][name] = {}, {}
        for leaf, (shape, leaf_axes, init) in leaves.items():
          key, sub = jax.random.split(key)
          trainable["heads"][name][leaf] = HEAD_INITS[init](sub, shape, jnp.float32)
          axes["heads"][name][leaf] = tuple(leaf_axes)
    self.trainable_keys = tuple(trainable)
    self.trainable_axes = axes
    try:
      self.tx, self.schedule = make_optimizer(cfg.optim, cfg.train.steps, axes)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    trainable = jax.tree.map(lambda x, a: jax.device_put(x, self._named(a, x.shape)), trainable, axes,
                             is_leaf=lambda x: not isinstance(x, dict))
    state = dict(trainable, opt_state=self.tx.init(trainable), step=jnp.int32(0),
                 rng=jax.random.PRNGKey(cfg.run.seed))
    # Scalars (step, rng, optimizer counts) start on one device; the step returns them replicated over
    # the mesh, and that sharding change alone made the second step compile again (~7 s on CPU).
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding) else jax.device_put(x, replicated),
        state)
    self.ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint)
    self.start = self.ckpt.latest_step() or 0
    if self.start:
      self._restore(self.start)

  # --- pieces a stage's loss uses -------------------------------------------------------------------

  def _named(self, axes, shape):
    return sharding.named(axes, shape, self.mesh, self.rules)

  def params(self, trainable: dict, frozen: dict | None = None) -> dict:
    """The model's param tree: the trained params, or the frozen base with LoRA applied."""
    if "params" in trainable:
      return trainable["params"]
    from align import lora  # pylint: disable=g-import-not-at-top
    base = (frozen or {}).get("base", self.base_params)
    return lora.apply(base, trainable["lora"], self.lora_cfg)

  def model(self, params: dict):
    return nnx.merge(self.graphdef, params)

  def frozen_base(self) -> dict:
    """What `frozen` must hold for `params()` under LoRA (the step takes frozen arrays as arguments)."""
    return dict(base=self.base_params) if self.lora_cfg else {}

  def put_batch(self, batch: dict) -> dict:
    """Host arrays → device arrays sharded over the batch axes (first dim)."""
    def put(x):
      x = np.asarray(x)
      axes = ("batch",) + (None,) * (x.ndim - 1)
      return jax.device_put(x, self._named(axes, x.shape))
    return {k: put(v) for k, v in batch.items()}

  def current_model(self, frozen: dict | None = None):
    """The model with the current params (for sampling and evaluation between steps)."""
    trainable = {k: self.state[k] for k in self.trainable_keys}
    return self.model(self.params(trainable, dict(frozen or {}, **self.frozen_base())))

  # --- the step -------------------------------------------------------------------------------------

  def make_step(self, loss_fn: LossFn):
    keys, tx, schedule = self.trainable_keys, self.tx, self.schedule

    def step(state, frozen, batch):
      rng, key = jax.random.split(state["rng"])
      trainable = {k: state[k] for k in keys}
      with activation_constraints(sharding.activation_constraint(self.mesh, self.rules)):
        (loss, metrics), grads = jax.value_and_grad(
            lambda t: loss_fn(self, t, frozen, batch, key), has_aux=True)(trainable)
      updates, opt_state = tx.update(grads, state["opt_state"], trainable)
      trainable = optax.apply_updates(trainable, updates)
      metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]),
                     nonfinite=opt_state.notfinite_count)
      return dict(trainable, opt_state=opt_state, step=state["step"] + 1, rng=rng), metrics

    # Pin the state's shardings (as train/step.py does): left to the compiler, the returned state came
    # back with equivalent but differently spelled specs (P() for P(None, None)), a second dispatch.
    shardings = jax.tree.map(lambda x: x.sharding, self.state)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, donate_argnums=0, out_shardings=(shardings, replicated))

  # --- checkpoints ----------------------------------------------------------------------------------

  def meta(self) -> dict:
    config = to_json_dict(self.cfg)
    config["model"] = self.model_cfg.to_dict()  # what model.load rebuilds the network from.
    config["data"] = dict(self.init_meta.get("config", {}).get("data") or {})
    m = self.init_meta
    return make_meta(config, self.tokenizer.to_bytes(), self.model_cfg.vocab_size,
                     tokenizer_kind=m.get("tokenizer_kind", "sentencepiece"),
                     tokenizer_special=m.get("tokenizer_special") or {}, init=str(self.init_dir))

  def _saved_state(self) -> dict:
    state = dict(self.state)
    if self.lora_cfg:
      state["params"] = jax.jit(lambda b, l: self.params(dict(lora=l), dict(base=b)))(
          self.base_params, self.state["lora"])
    return state

  def save(self, step: int) -> None:
    self.ckpt.save(step, self._saved_state(), None, self.meta(), force=True)

  def _restore(self, step: int) -> None:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          self._saved_state())
    restored, _ = self.ckpt.restore(step, target)
    self.state = {k: restored[k] for k in self.state}

  # --- the loop -------------------------------------------------------------------------------------

  def fit(self, loss_fn: LossFn, batches: Iterator[dict], *, frozen: dict | None = None,
          eval_fn: Callable[["Trainer", int], dict] | None = None) -> dict[str, Any]:
    """Runs steps start..cfg.train.steps; logs, evaluates (`eval_fn(trainer, step) -> row`) and saves."""
    cfg, t0 = self.cfg, time.time()
    frozen = dict(frozen or {}, **self.frozen_base())
    step_fn = self.make_step(loss_fn)
    is_main = jax.process_index() == 0
    if is_main:
      self.run_dir.mkdir(parents=True, exist_ok=True)
      (self.run_dir / "config.json").write_text(json.dumps(self.meta()["config"], indent=2))
    writer = MetricsWriter(self.run_dir, resume_step=self.start, enabled=is_main)
    bar = tqdm(total=cfg.train.steps, initial=self.start, disable=not (cfg.train.progress and is_main),
               dynamic_ncols=True, desc=cfg.run.name)
    step, pending, last = self.start, [], {}
    try:
      if eval_fn and self.start == 0:
        row = eval_fn(self, 0)
        writer.write(dict(step=0, **row))
        last.update(row)
      while step < cfg.train.steps:
        self.state, metrics = step_fn(self.state, frozen, self.put_batch(next(batches)))
        pending.append(metrics)
        step += 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
          rows = jax.device_get(pending)
          pending.clear()
          row = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]}
          if int(rows[-1]["nonfinite"]) >= cfg.train.max_nonfinite:
            raise FloatingPointError(f"{int(rows[-1]['nonfinite'])} consecutive non-finite updates at step "
                                     f"{step}; lower optim.peak_lr")
          writer.write(dict(step=step, **row))
          last.update(row)
          bar.set_postfix(loss=f"{row['loss']:.4f}")
        if eval_fn and cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
          row = eval_fn(self, step)
          writer.write(dict(step=step, **row))
          last.update(row)
          bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                 if isinstance(v, (int, float))))
        if cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or step == cfg.train.steps):
          self.save(step)
    finally:
      bar.close()
      self.ckpt.close()
      writer.close()
    summary = dict(steps=step, wall_s=round(time.time() - t0, 1), **{k: v for k, v in last.items()
                                                                    if isinstance(v, (int, float))})
    if is_main:
      print(f"done: {self.run_dir} " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                   for k, v in summary.items()}), file=sys.stderr)
    return summary


def logps_of(trainer: Trainer, params: dict, batch: dict, prefix: str = "") -> tuple[jax.Array, jax.Array]:
  """Σ log p(target) over loss-masked tokens per row [B], and the row's token count [B], for a batch
  holding `<prefix>inputs, targets, positions, segment_ids, loss_mask` (segments isolate packed rows)."""
  model = trainer.model(params)
  logits = model(batch[prefix + "inputs"], positions=batch[prefix + "positions"],
                 segment_ids=batch[prefix + "segment_ids"]).astype(jnp.float32)
  targets, mask = batch[prefix + "targets"], batch[prefix + "loss_mask"].astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logp = (picked - jax.nn.logsumexp(logits, axis=-1)) * mask
  return logp.sum(-1), mask.sum(-1)



def stage_main(run: Callable[[ConfigDict], Any], default_config: str, argv: Sequence[str] | None = None) -> int:
  """The command line of a stage: `--config=...` and `--config.<key>=...` overrides, then `run(cfg)`;
  bad config or data → one `error:` line and exit 2 (`configs.loader.main_guard`)."""
  def go():
    cfg, rest = parse_args(list(sys.argv[1:] if argv is None else argv), default_config)
    if rest:
      raise ConfigError(f"unknown arguments {rest}")
    from train import distributed
    distributed.initialize(cfg.get("dist"))  # multi-host start-up; no-op for one process.
    try:
      run(cfg)
    except DataError:
      raise
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(str(e)) from None
    return 0

  return main_guard(go)
