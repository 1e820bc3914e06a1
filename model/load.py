"""Loads a trained model's params and config from a run directory for inference.

    model, meta = model.load.load_model("runs/tiny")              # latest step
    model, meta = model.load.load_model("runs/tiny/checkpoints/400")

Reads only the `params` subtree of the Orbax `state` item (optimizer state stays on disk) and the
JSON `meta` item (resolved run config, tokenizer model bytes); nothing is unpickled. Params are placed
on the default device, or into `shardings` when given (a tree like the params).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from model.config import ModelConfig
from model.transformer import Transformer


def find_step_dir(path: str | pathlib.Path) -> pathlib.Path:
  """A run dir → its latest checkpoint step dir; a checkpoints/ dir → latest step; a step dir → itself."""
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"checkpoint not found: {p}")
  if (p / "state").is_dir() and (p / "meta").is_dir():
    return p
  if (p / "checkpoints").is_dir():
    p = p / "checkpoints"
  steps = sorted((int(c.name), c) for c in p.iterdir()
                 if c.name.isdigit() and (c / "state").is_dir() and (c / "meta").is_dir())
  if not steps:
    raise FileNotFoundError(f"no finished checkpoint under {p}")
  return steps[-1][1]


def read_meta(step_dir: pathlib.Path) -> dict[str, Any]:
  files = [f for f in (step_dir / "meta").iterdir() if f.is_file() and not f.name.startswith("_")]
  for f in files:
    try:
      return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
      continue
  raise FileNotFoundError(f"no readable meta JSON in {step_dir / 'meta'}")


def model_config_from_meta(meta: dict) -> ModelConfig:
  d = dict(meta["config"]["model"])
  d["remat"] = "none"
  return ModelConfig.from_dict(d)


def load_model(path: str | pathlib.Path, *, shardings=None) -> tuple[Transformer, dict]:
  step_dir = find_step_dir(path).absolute()  # Orbax's tensorstore paths must be absolute.
  meta = read_meta(step_dir)
  cfg = model_config_from_meta(meta)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract, nnx.Param)
  shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  target = {"params": jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                   shapes, shardings)}
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    restored = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  return nnx.merge(graphdef, restored["params"]), meta
