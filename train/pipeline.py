"""Pipeline parallelism over the `stage` mesh axis: a GPipe schedule over micro-batches, one jitted program.

Library module: `train/step.py` installs `runner(...)` with `model.transformer.layer_runner` whenever
`mesh.stage > 1`, e.g. `python -m train --config.mesh.stage=2 --config.mesh.fsdp=4
--config.train.microbatches=8`.

The scanned layer stack [L, ...] is stored split over `stage` (the rules' ("layers", "stage")), so stage s
holds layers [s·L/S, (s+1)·L/S); here it is viewed as [S, L/S, ...]. The batch is cut into M micro-batches
and run with the "circular buffer" formulation of praxis/MaxText: a buffer [S, b, T, D] (split over
`stage`) goes through M + S - 1 iterations; in each, every stage applies its layers to its slot at once
(`vmap` with `spmd_axis_name="stage"`, so a device runs only its own stage), the last stage's output is
the finished micro-batch t - (S - 1), and the buffer shifts one stage on (`jnp.roll` of a stage-split axis:
a collective-permute), stage 0 taking micro-batch t + 1. Gradients come from autodiff through the loop
(its transpose runs the same schedule backwards). A stage idles in S - 1 of the M + S - 1 iterations:
the bubble fraction (S - 1) / (M + S - 1) (GPipe, Huang et al. 2019): 0.43 at S=4, M=4; 0.16 at S=4, M=16.

Everything outside the layer stack (embedding, final norm, logits, loss) runs on every stage. Each
micro-batch takes every M-th row (row j·M + i is in micro-batch i), so a micro-batch spans all the
batch shards of `data`/`fsdp` rather than sitting on one of them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from train import sharding
from train.config import ConfigError

STAGE = "stage"  # the mesh axis the stages are split over.


def bubble_fraction(stages: int, microbatches: int) -> float:
  """Share of a GPipe step that a stage spends idle: (S - 1) / (M + S - 1); 0 without a pipeline."""
  return (stages - 1) / (microbatches + stages - 1)


def stages_of(mesh) -> int:
  return int(dict(mesh.shape).get(STAGE, 1))


def validate(cfg: ConfigDict, model_cfg, mesh) -> None:
  """One clear error for a pipeline the model or batch cannot be cut into."""
  stages, m = stages_of(mesh), int(cfg.train.get("microbatches", 1))
  if m < 1:
    raise ConfigError(f"train.microbatches={m} must be >= 1")
  if stages == 1:
    if m > 1:
      raise ConfigError(f"train.microbatches={m} is the pipeline's micro-batch count and needs "
                        "mesh.stage > 1; use train.grad_accum to split a batch without a pipeline")
    return
  if not model_cfg.scan_layers:
    raise ConfigError(f"mesh.stage={stages} (pipeline) needs model.scan_layers=true: stages are slices "
                      "of the stacked layers")
  if model_cfg.n_layers % stages:
    raise ConfigError(f"mesh.stage={stages} does not divide model.n_layers={model_cfg.n_layers}: "
                      "each pipeline stage holds n_layers / stages layers")
  rows = cfg.train.batch_size // cfg.train.grad_accum
  if rows % m:
    raise ConfigError(f"train.microbatches={m} does not divide the {rows} rows of a step's batch "
                      f"(train.batch_size={cfg.train.batch_size} / train.grad_accum={cfg.train.grad_accum})")


def runner(mesh: Mesh, rules, microbatches: int):
  """`fn(layer_fn, x, stacked, keys, positions, segment_ids) -> (x, aux)` for `layer_runner`, or None
  when the mesh has one stage (the plain `lax.scan` then)."""
  n_stages, m = stages_of(mesh), microbatches
  if n_stages == 1:
    return None

  def on_stages(a, axes=None):
    """Constrains [S, ...]: dim 0 over `stage`, the rest by the rules (left to XLA when axes is None)."""
    rest = ([P.UNCONSTRAINED] * (a.ndim - 1) if axes is None
            else list(sharding.logical_to_spec(axes, a.shape[1:], mesh, rules)))
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(STAGE, *rest)))

  def run(layer_fn, x, stacked, keys, positions, segment_ids):
    s = n_stages
    per_stage = lambda a: a.reshape(s, a.shape[0] // s, *a.shape[1:])  # [L, ...] -> [S, L/S, ...]
    params = jax.tree.map(lambda a: on_stages(per_stage(a)), stacked)
    keys = None if keys is None else per_stage(keys)
    split = lambda a: a.reshape(a.shape[0] // m, m, *a.shape[1:]).swapaxes(0, 1)  # [M, B/M, ...]
    xs = split(x)
    inputs = jax.tree.map(split, (positions, segment_ids))
    act_axes = ("batch", "length", "embed")

    def stage_fn(stage_params, h, stage_keys, stage_inputs, micro):
      """One stage's L/S layers on one micro-batch (dropout keys differ per micro-batch)."""
      def body(h, xs):
        layer_params, key = xs
        key = None if key is None else jax.random.fold_in(key, micro)
        return layer_fn(layer_params, h, key, *stage_inputs)
      return jax.lax.scan(body, h, (stage_params, stage_keys))

    stage_ids = jnp.arange(s)

    def iteration(carry, t):
      buf, outs = carry
      # Stage 0 takes micro-batch t; past the last one it recomputes it, and that output is never read.
      first = jax.lax.dynamic_index_in_dim(xs, jnp.minimum(t, m - 1), 0, keepdims=False)
      buf = on_stages(jnp.where((stage_ids == 0)[:, None, None, None], first[None], buf), act_axes)
      micro = t - stage_ids  # the micro-batch each stage works on; outside [0, M): the bubble.
      clipped = jnp.clip(micro, 0, m - 1)
      stage_inputs = jax.tree.map(lambda a: a[clipped], inputs)
      out, aux = jax.vmap(stage_fn, spmd_axis_name=STAGE)(params, buf, keys, stage_inputs, clipped)
      # The last stage finished micro-batch t - (S - 1); before that it wrote bubble garbage, overwritten.
      outs = jax.lax.dynamic_update_index_in_dim(outs, out[s - 1], jnp.clip(t - (s - 1), 0, m - 1), 0)
      buf = jnp.roll(out, 1, axis=0)  # stage i's output is stage i + 1's input in the next iteration.
      return (buf, outs), (aux, (micro >= 0) & (micro < m))

    buf = on_stages(jnp.zeros((s,) + xs.shape[1:], x.dtype), act_axes)
    (_, outs), (aux, valid) = jax.lax.scan(iteration, (buf, jnp.zeros_like(xs)), jnp.arange(m + s - 1))
    x = outs.swapaxes(0, 1).reshape(x.shape)

    def mean_over_micro(a):  # [iterations, S, L/S, ...] -> [L, ...], the mean over real micro-batches.
      mask = valid.reshape(valid.shape + (1,) * (a.ndim - 2))
      a = jnp.where(mask, a, 0).sum(0) / m  # where, not ×: bubble garbage must not leak NaN/Inf.
      return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])
    return x, jax.tree.map(mean_over_micro, aux)

  return run
