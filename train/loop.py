"""The training loop behind `python -m train`: data → sharded state → jitted steps → metrics, eval,
checkpoints, report.

Rerunning the same command resumes from the run directory's latest checkpoint (params, optimizer,
step, RNG and data-iterator state), so the resumed losses equal an uninterrupted run's. A different
model or data config in an existing run directory is an error naming the keys, raised before anything
is written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import platform
import subprocess
import sys
import time

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from data.pipeline import eval_batches, train_iterator
from data.prepare import from_manifest, parse_weights, prepare
from data.tokenizer import Tokenizer
from model.config import ModelConfig
from model.params import count_params
from train import distributed
from train import flops as flops_lib
from train import sharding
from train.checkpoint import Checkpointer, make_meta
from train.evaluate import evaluate as evaluate_tasks
from train.evaluate import flat_metrics, format_table
from train.evaluate import resolve as resolve_task
from train.config import ConfigError, model_config, resolve, to_json_dict
from train.metrics import MetricsWriter
from train.report import write_report
from train.sample import generate
from train.scoring import LanguageModel
from train.state import init_state, make_setup
from train.step import make_eval_step, make_train_step

# Keys whose change alters neither what is trained nor the checkpoint's layout: allowed when resuming.
# (model.scan_layers is not: it changes the param tree, stacked vs per-layer.)
_RESUME_FREE = {"data.num_workers", "data.prefetch", "data.cache_dir", "model.attention"}


def provenance() -> dict:
  repo = pathlib.Path(__file__).resolve().parents[1]
  def git(*args):
    try:
      return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""
  return dict(commit=git("rev-parse", "HEAD") or None, dirty=bool(git("status", "--porcelain")),
              jax=jax.__version__, devices=[str(d) for d in jax.devices()],
              device_kind=jax.devices()[0].device_kind, process_count=jax.process_count(),
              python=platform.python_version(), host=platform.node())


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def check_same_run(run_dir: pathlib.Path, new: dict) -> None:
  path = run_dir / "config.json"
  if not path.exists():
    return
  old = json.loads(path.read_text())
  old_flat = {k: v for k, v in _flatten(old).items() if k.split(".")[0] in ("model", "data")}
  new_flat = {k: v for k, v in _flatten(new).items() if k.split(".")[0] in ("model", "data")}
  # A model field added after the run was made (e.g. model.qkv_bias) matches at its default value.
  defaults = {f"model.{f.name}": f.default for f in dataclasses.fields(ModelConfig)}
  for k, v in new_flat.items():
    if k not in old_flat and k in defaults and v == defaults[k]:
      old_flat[k] = v
  diff = sorted(k for k in set(old_flat) | set(new_flat)
                if k not in _RESUME_FREE and old_flat.get(k) != new_flat.get(k))
  if diff:
    details = ", ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in diff[:6])
    raise ConfigError(f"run directory {run_dir} holds a different model/data config ({details}); "
                      f"use a new --config.run.dir or the original settings")


def run(cfg: ConfigDict) -> dict:
  t_start = time.time()
  if not cfg.run.dir:
    with cfg.unlocked():
      cfg.run.dir = f"runs/{cfg.run.name}"
  run_dir = pathlib.Path(cfg.run.dir)
  is_main = jax.process_index() == 0

  # ---------------------------------------------------------------- data and tokenizer
  tokenizer_path = cfg.data.tokenizer
  if not tokenizer_path and (run_dir / "tokenizer.model").exists():
    tokenizer_path = str(run_dir / "tokenizer.model")  # resume with the exact tokenizer of the run.
  def prepare_data():
    if cfg.data.manifest:
      return from_manifest(cfg.data.manifest, tokenizer_path)
    return prepare(sources=cfg.data.sources, vocab_size=cfg.data.vocab_size,
                   tokenizer=tokenizer_path, cache_dir=cfg.data.cache_dir,
                   val_fraction=cfg.data.val_fraction, num_workers=cfg.data.num_workers,
                   seed=cfg.data.tokenizer_seed, tokenizer_sample_chars=cfg.data.tokenizer_sample_chars)

  # Several hosts: process 0 builds the tokenizer and shards first; on a shared cache the others then
  # find them (no two hosts racing to write the same files), on host-local caches they rebuild them.
  prepared = prepare_data() if is_main else None
  distributed.barrier("prepare")
  prepared = prepared or prepare_data()
  tokenizer = Tokenizer.load(prepared.tokenizer_path)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    try:
      multihost_utils.assert_equal(np.frombuffer(bytes.fromhex(tokenizer.sha256), np.uint8), "tokenizer")
    except AssertionError:
      raise ConfigError("processes built different tokenizers; put data.cache_dir on a filesystem all "
                        "hosts share, or pass data.tokenizer") from None
  resolve(cfg, tokenizer.vocab_size)
  weights = parse_weights(cfg.data.weights) if cfg.data.weights else None
  if weights and set(weights) - set(prepared.domains):
    raise ConfigError(f"data.weights names unknown domains {sorted(set(weights) - set(prepared.domains))}; "
                      f"domains are {list(prepared.domains)}")
  model_cfg = model_config(cfg)
  config_json = to_json_dict(cfg)
  check_same_run(run_dir, config_json)

  # ---------------------------------------------------------------- mesh and state
  mesh = sharding.make_mesh(cfg.mesh)
  setup = make_setup(cfg, model_cfg, mesh)
  global_batch, seq_len = cfg.train.batch_size, cfg.data.seq_len
  batch_shape = (global_batch, seq_len)
  batch_sh = sharding.batch_sharding(batch_shape, mesh, setup.rules)
  # This process loads only the rows its devices hold: part `shard` of `n_shards` of every batch.
  shard, n_shards = distributed.batch_shard(batch_sh, batch_shape)
  data_iter = train_iterator(prepared.manifest_path, seq_len=seq_len, batch_size=global_batch // n_shards,
                             weights=weights, seed=cfg.run.seed, process_index=shard,
                             process_count=n_shards, prefetch=cfg.data.prefetch,
                             shuffle_window=cfg.data.shuffle_window)
  ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
  start = ckpt.latest_step()
  if start is not None:
    state, _ = ckpt.restore(start, setup.abstract_state, data_iter)
  else:
    start = 0
    state = init_state(setup, cfg.run.seed)

  # Everything validated: only now touch the run directory.
  if is_main:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dict(config_json, provenance=provenance()), indent=2))
    if not (run_dir / "tokenizer.model").exists():
      (run_dir / "tokenizer.model").write_bytes(tokenizer.to_bytes())
  meta = make_meta(config_json, tokenizer.to_bytes(), tokenizer.vocab_size)

  step_fn = make_train_step(setup, cfg, batch_shape)
  val = eval_batches(prepared.manifest_path, seq_len=seq_len, batch_size=global_batch // n_shards,
                     num_batches=cfg.train.eval_batches, process_index=shard, process_count=n_shards)
  eval_fn = make_eval_step(setup, batch_shape, cfg) if val else None
  if not val and is_main:
    print("warning: the validation split is empty (too few documents for data.val_fraction="
          f"{cfg.data.val_fraction}); no val_loss will be reported", file=sys.stderr)
  token_bytes = jax.device_put(np.pad(tokenizer.token_bytes(), (0, model_cfg.vocab_size - tokenizer.vocab_size)),
                               setup.replicated)

  fpt = flops_lib.flops_per_token(model_cfg, seq_len)
  peak = flops_lib.peak_flops()
  params = count_params(model_cfg)
  writer = MetricsWriter(run_dir, resume_step=start, enabled=is_main)
  if is_main:
    print(f"run {run_dir}: {params['total']:,} params, {len(jax.devices())} devices "
          f"{dict(mesh.shape)}, batch {global_batch}x{seq_len}, steps {start}->{cfg.train.steps}",
          file=sys.stderr)

  def evaluate(step: int) -> dict:
    ce = nbytes = ntok = 0.0
    for b in val:
      c, nb, n = eval_fn(state["params"], distributed.global_batch(b, batch_sh, batch_shape), token_bytes)
      ce, nbytes, ntok = ce + float(c), nbytes + float(nb), ntok + float(n)
    return dict(step=step, val_loss=ce / max(ntok, 1), val_bpb=ce / math.log(2) / max(nbytes, 1))

  tasks = tuple(cfg.eval.tasks or ()) if cfg.eval.every else ()
  for t in tasks:
    resolve_task(t)  # a typo'd task fails now, not after the first `every` steps.

  def run_tasks(step: int) -> dict:
    lm = LanguageModel(setup.model(state["params"]), tokenizer, batch_size=cfg.eval.batch_size,
                       max_len=min(seq_len, model_cfg.max_seq_len))
    results = evaluate_tasks(lm, tasks, limit=cfg.eval.limit or None, gsm8k_shots=cfg.eval.gsm8k_shots,
                             humaneval_samples=cfg.eval.humaneval_samples, max_gen_toks=cfg.eval.max_gen_toks,
                             seed=cfg.run.seed)
    if is_main:
      out = run_dir / "eval" / f"step_{step}.json"
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps(dict(step=step, tasks=results), indent=2))
    return results

  # ---------------------------------------------------------------- loop
  bar = tqdm(total=cfg.train.steps, initial=start, disable=not (cfg.train.progress and is_main),
             dynamic_ncols=True, desc="train")
  last_time, last_step = time.time(), start
  step = start
  last_loss = None
  interval_losses = []  # device scalars: averaged at each log, so a row is not one noisy batch.
  try:
    while step < cfg.train.steps:
      batch = distributed.global_batch(next(data_iter), batch_sh, batch_shape)
      state, metrics = step_fn(state, batch)
      interval_losses.append(metrics["loss"])
      step += 1
      bar.update(1)
      if step == start + 1:  # keep compilation out of the throughput figures.
        jax.block_until_ready(metrics)
        last_time, last_step = time.time(), step
      if step % cfg.train.log_every == 0 or step == cfg.train.steps:
        m = jax.device_get(metrics)
        interval_loss = float(np.mean(jax.device_get(interval_losses)))
        interval_losses.clear()
        now = time.time()
        dt = (now - last_time) / max(step - last_step, 1) if step > last_step else float("nan")
        tps = global_batch * seq_len / dt
        row = dict(step=step, loss=interval_loss, last_loss=float(m["loss"]),
                   grad_norm=float(m["grad_norm"]), lr=float(m["lr"]),
                   tokens_seen=step * global_batch * seq_len, tokens_per_s=tps, step_time_s=dt,
                   achieved_tflops=tps * fpt / 1e12, mfu=flops_lib.mfu(tps, fpt, len(jax.devices()), peak),
                   skipped_steps=int(m["nonfinite_total"]))
        row.update({k: float(v) for k, v in m.items() if k.startswith(("moe/", "pipeline/"))})  # last step's
        writer.write(row)
        last_loss = row["loss"]
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tps:,.0f}")
        last_time, last_step = time.time(), step
        if int(m["nonfinite"]) >= cfg.train.max_nonfinite:
          raise FloatingPointError(f"{int(m['nonfinite'])} consecutive steps had non-finite gradients "
                                   f"(step {step}); stopping. Lower optim.peak_lr or check the data.")
      if eval_fn and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
        row = evaluate(step)
        writer.write(row)
        if is_main:
          bar.write(f"step {step}: val_loss {row['val_loss']:.4f}  val_bpb {row['val_bpb']:.4f}")
        last_time = time.time()  # eval time is not training throughput.
      if tasks and (step % cfg.eval.every == 0 or step == cfg.train.steps):
        results = run_tasks(step)
        writer.write(dict(step=step, **flat_metrics(results)))
        if is_main:
          bar.write(f"step {step}: eval\n{format_table(results)}")
        last_time = time.time()
      if cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or step == cfg.train.steps):
        ckpt.save(step, state, data_iter, meta, force=True)
  finally:
    bar.close()
    ckpt.close()
    writer.close()

  summary = dict(steps=step, final_loss=last_loss, wall_s=round(time.time() - t_start, 1),
                 params=params["total"], flops_per_token=fpt, device=jax.devices()[0].device_kind)
  samples = []
  if cfg.sample.prompts and cfg.sample.max_new_tokens:  # on every process: params span all hosts.
    model = setup.model(state["params"])
    texts = generate(model, tokenizer, list(cfg.sample.prompts), max_new_tokens=cfg.sample.max_new_tokens,
                     temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, top_p=cfg.sample.top_p,
                     seed=cfg.run.seed)
    samples = list(zip(cfg.sample.prompts, texts))
  if is_main:
    report = write_report(run_dir, samples=samples, summary=summary)
    print(f"done: {report}", file=sys.stderr)
  return summary
