"""The training state pytree and its shardings; params created already sharded.

State is a plain dict of arrays — `params` (pure dict mirroring the NNX module tree), `opt_state`
(optax), `step` (int32) and `rng` (uint32[2]) — so Orbax saves it without pickling and the jitted step
is a pure function of it. `Setup` bundles the static pieces: NNX graph definition, logical axes, mesh
shardings, the optimizer.

The optimizer's moments take their params' shardings, except that `mesh.zero1=true` also splits them
over `data` (ZeRO-1, `sharding.ZERO1_OPT_RULES`) and `optim.offload=true` keeps them in pinned host
memory between steps (refused with a clear error on a backend without that memory kind).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from model.config import ModelConfig
from model.transformer import Transformer
from train import pipeline, sharding
from train.config import ConfigError
from train.optim import make_optimizer

HOST = "pinned_host"  # memory kind of `optim.offload`: page-locked host RAM the device reaches by DMA.


def check_memory_kind(device: jax.Device, kind: str, option: str) -> None:
  """`option` needs memory `kind` on `device`: one clear error on a backend without it."""
  kinds = sorted(m.kind for m in device.addressable_memories())
  if kind not in kinds:
    raise ConfigError(f"{option} needs {kind!r} memory, which {device.platform} devices do not offer "
                      f"(they have {kinds}); set it to false on this backend")


@dataclasses.dataclass
class Setup:
  model_cfg: ModelConfig
  mesh: Mesh
  rules: tuple
  graphdef: Any
  param_axes: dict
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: dict
  abstract_state: dict  # ShapeDtypeStructs with shardings: the restore target.

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def model(self, params) -> Transformer:
    return nnx.merge(self.graphdef, params)


def abstract_model(model_cfg: ModelConfig):
  """(graphdef, abstract params pure dict, logical axes pure dict) without allocating anything."""
  abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract, nnx.Param)
  axes = jax.tree.map(lambda v: tuple(v.get_metadata()["axes"]), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))
  return graphdef, shapes, nnx.to_pure_dict(axes)


def make_setup(cfg: ConfigDict, model_cfg: ModelConfig, mesh: Mesh) -> Setup:
  rules = sharding.rules_for(cfg.mesh)
  pipeline.validate(cfg, model_cfg, mesh)
  graphdef, shapes, axes = abstract_model(model_cfg)
  is_axes = lambda x: isinstance(x, tuple)
  param_sh = jax.tree.map(lambda a, s: sharding.named(a, s.shape, mesh, rules), axes, shapes,
                          is_leaf=is_axes)
  tx, schedule = make_optimizer(cfg.optim, cfg.train.steps, axes,
                                mup_width_mult=model_cfg.mup_width_mult if model_cfg.mup else None)
  repl = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(tx.init, shapes)
  # Moments mirror the params and take their shardings (split over `data` too under ZeRO-1, and in
  # host memory with optim.offload); counters and scalars are replicated on the device.
  opt_rules = sharding.opt_rules_for(cfg.mesh, rules)
  moment_sh = jax.tree.map(lambda a, s: sharding.named(a, s.shape, mesh, opt_rules), axes, shapes,
                           is_leaf=is_axes)
  if cfg.optim.get("offload", False):
    devices = getattr(mesh, "devices", None)  # an AbstractMesh (train.plan) has none: this host's.
    check_memory_kind(devices.flat[0] if devices is not None else jax.devices()[0], HOST,
                      "optim.offload=true")
    moment_sh = jax.tree.map(lambda s: s.with_memory_kind(HOST), moment_sh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, moment_sh,
                                 transform_non_params=lambda _: repl,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  state_sh = dict(params=param_sh, opt_state=opt_sh, step=repl, rng=repl)
  abstract_state = dict(params=shapes, opt_state=abstract_opt,
                        step=jax.ShapeDtypeStruct((), jnp.int32),
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sh)
  return Setup(model_cfg, mesh, rules, graphdef, axes, tx, schedule, state_sh, abstract_state)


def init_state(setup: Setup, seed: int) -> dict:
  """Initializes params and optimizer state inside jit, directly into their shardings."""

  def init(key):
    init_key, rng = jax.random.split(key)
    model = Transformer(setup.model_cfg, rngs=nnx.Rngs(params=init_key))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return dict(params=params, opt_state=setup.tx.init(params), step=jnp.zeros((), jnp.int32), rng=rng)

  return jax.jit(init, out_shardings=setup.state_shardings)(jax.random.PRNGKey(seed))
