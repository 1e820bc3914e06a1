"""Orbax training-state checkpoints: params, optimizer state, step, RNG, data-iterator state, config, tokenizer.

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    ckpt.save(step, state, data_iter, meta)          # async; keeps the last `keep` + every `keep_every`-th
    state, meta = ckpt.restore(step, setup.abstract_state, data_iter)

Items of one step directory: `state` (Orbax StandardSave: tensorstore arrays, restored straight into the
target shardings, so a different mesh works), `data` (Grain's per-process iterator state, JSON), `meta`
(JSON: resolved config, tokenizer model as base64, vocab). Nothing is pickled.
"""
from __future__ import annotations

import pathlib

import grain
import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

# One meta format for training checkpoints and imported models (model/load.py documents it).
from model.load import make_meta, tokenizer_bytes_from_meta  # noqa: F401  (re-exported)


class Checkpointer:

  def __init__(self, directory: str | pathlib.Path, ccfg: ConfigDict | None = None, *, read_only=False):
    ccfg = ccfg or ConfigDict(dict(every=0, keep=3, keep_every=0, async_save=False))
    self.directory = pathlib.Path(directory).absolute()
    self.every = ccfg.every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ccfg.keep or None,
        keep_period=ccfg.keep_every or None,
        enable_async_checkpointing=bool(ccfg.async_save) and not read_only,
        create=not read_only,
        read_only=read_only,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict, data_iter, meta: dict, *, force: bool = False) -> bool:
    args = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int | None, abstract_state: dict, data_iter=None) -> tuple[dict, dict]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    args = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out["state"], out["meta"]

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
