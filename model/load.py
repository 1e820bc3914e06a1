"""Loads a trained model's params and config from a run directory for inference (and writes one).

    model, meta = model.load.load_model("runs/tiny")              # latest step
    model, meta = model.load.load_model("runs/tiny/checkpoints/400")
    model.load.save_model("runs/imported", model, meta)           # params-only step 0 (HF import)

Reads only the `params` subtree of the Orbax `state` item (optimizer state stays on disk) and the
JSON `meta` item (resolved run config, tokenizer model bytes); nothing is unpickled. Params are placed
on the default device, or into `shardings` when given (a tree like the params).

`meta` is the one description of a checkpoint's non-array contents, written by `make_meta` for both
training checkpoints (`train/checkpoint.py`) and imported models (`model/hf`): `config` (at least the
`model` subtree), `vocab_size`, and the tokenizer as opaque bytes with its kind — "sentencepiece" (a
SentencePiece model proto) or "hf_tokenizers" (a Hugging Face `tokenizer.json`) — plus the special ids
a foreign tokenizer declares. `data.tokenizer.tokenizer_from_meta` turns them back into a tokenizer.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from model.config import ModelConfig
from model.quantize import MODES as QUANT_MODES
from model.quantize import quantize_model, quantized_params
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


TOKENIZER_KINDS = ("sentencepiece", "hf_tokenizers")


def make_meta(config_json: dict, tokenizer_bytes: bytes, vocab_size: int, *,
              tokenizer_kind: str = "sentencepiece", tokenizer_special: dict | None = None,
              **extra) -> dict[str, Any]:
  if tokenizer_kind not in TOKENIZER_KINDS:
    raise ValueError(f"tokenizer_kind={tokenizer_kind!r} not in {TOKENIZER_KINDS}")
  return dict(config=config_json, vocab_size=vocab_size, tokenizer_kind=tokenizer_kind,
              tokenizer_special=dict(tokenizer_special or {}),
              tokenizer_sha256=hashlib.sha256(tokenizer_bytes).hexdigest(),
              tokenizer_model_b64=base64.b64encode(tokenizer_bytes).decode("ascii"),
              jax_version=jax.__version__, **extra)


def tokenizer_bytes_from_meta(meta: dict) -> bytes:
  return base64.b64decode(meta["tokenizer_model_b64"])


def model_config_from_meta(meta: dict) -> ModelConfig:
  d = dict(meta["config"]["model"])
  d["remat"] = "none"
  return ModelConfig.from_dict(d)


def load_model(path: str | pathlib.Path, *, shardings=None, quantize: str | None = None,
               **overrides) -> tuple[Transformer, dict]:
  """(model, meta); `overrides` replace model config fields that don't change params (compute_dtype,
  attention kernel, max_seq_len, scan_layers=False is not one of them: the layout is fixed by the save).
  `quantize="int8"|"int4"`: weight-only quantization of the restored params (`model.quantize`)."""
  if quantize is not None and quantize not in QUANT_MODES:
    raise ValueError(f"quantize={quantize!r} not in {QUANT_MODES}")
  step_dir = find_step_dir(path).absolute()  # Orbax's tensorstore paths must be absolute.
  meta = read_meta(step_dir)
  cfg = dataclasses.replace(model_config_from_meta(meta), **overrides)
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
  model = nnx.merge(graphdef, restored["params"])
  return (quantize_model(model, quantize) if quantize else model), meta


def save_model(run_dir: str | pathlib.Path, model: Transformer, meta: dict, *, step: int = 0) -> pathlib.Path:
  """Writes `model`'s params (no optimizer state) and `meta` as checkpoint `step` of `run_dir`.

  Same layout as a training checkpoint (`checkpoints/<step>/{state,meta}`, state = {"params": ...}),
  so `load_model`, `train.sample` and the evaluation harness read it unchanged. Refuses to overwrite.
  """
  if quantized_params(model):
    raise ValueError("save_model: the model is quantized; save the full-precision model and quantize at "
                     "load (load_model(path, quantize=...))")
  directory = pathlib.Path(run_dir).absolute() / "checkpoints"
  if (directory / str(step)).exists():
    raise FileExistsError(f"{directory / str(step)} already exists; choose a new output directory")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(directory, options=options, item_names=("state", "meta")) as manager:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(dict(params=params)),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
  (pathlib.Path(run_dir) / "config.json").write_text(json.dumps(meta["config"], indent=2))
  return directory / str(step)
