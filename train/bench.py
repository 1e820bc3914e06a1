"""Training-step throughput benchmark: one JSON line per measured setup.

    python -m train.bench --config=configs/lm.py:tiny
    python -m train.bench --config=configs/lm.py:125m --config.train.batch_size=4 --config.data.seq_len=512
    python -m train.bench --config=configs/lm.py:350m --steps=20          # on a GPU/TPU
    python -m train.bench --config=configs/lm.py:tiny,smoke --mesh="data=8;data=2,fsdp=4;fsdp=4,tensor=2"

Times the real jitted step (same sharding, donation, optimizer) on random tokens, so the figure is the
model+optimizer cost without the input pipeline. Compilation and `--warmup` steps are excluded; the
timed steps end with `block_until_ready`. Prints {"bench", "setup", "device", "jax", "commit",
"tokens_per_s", "step_time_s", "flops_per_token", "achieved_tflops", "mfu", "params", ...}.

`--mesh` compares layouts of the same model and batch: `;`-separated layouts of `axis=size` pairs
(unnamed axes are 1, one axis may be -1), one JSON line each, with `mesh` and `relative_throughput`
(tokens/s over the first layout's).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import jax
import numpy as np

from model.params import count_params
from train import flops as flops_lib
from train import sharding
from train.config import ConfigError, main_guard, model_config, parse_args, resolve
from train.loop import provenance
from train.state import init_state, make_setup
from train.step import make_train_step


def random_batch(batch: int, seq_len: int, vocab: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  x = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
  return dict(inputs=x[:, :-1], targets=x[:, 1:], segment_ids=np.ones((batch, seq_len), np.int32),
              positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
              loss_mask=np.ones((batch, seq_len), np.float32))


def bench(cfg, *, steps: int, warmup: int, vocab: int) -> dict:
  resolve(cfg, vocab)
  model_cfg = model_config(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  setup = make_setup(cfg, model_cfg, mesh)
  state = init_state(setup, cfg.run.seed)
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  step_fn = make_train_step(setup, cfg, shape)
  batch_sh = sharding.batch_sharding(shape, mesh, setup.rules)
  batches = [{k: jax.device_put(v, batch_sh) for k, v in random_batch(*shape, model_cfg.vocab_size, i).items()}
             for i in range(2)]
  t0 = time.perf_counter()
  state, m = step_fn(state, batches[0])
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    state, m = step_fn(state, batches[i % 2])
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, m = step_fn(state, batches[i % 2])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_time = statistics.median(times)
  tokens = shape[0] * shape[1]
  fpt = flops_lib.flops_per_token(model_cfg, cfg.data.seq_len)
  tps = tokens / step_time
  n_dev = len(jax.devices())
  prov = provenance()
  return dict(bench="train_step", setup=f"{cfg.run.name} b{shape[0]}x{shape[1]} mesh{dict(mesh.shape)} "
              f"{model_cfg.compute_dtype} remat={model_cfg.remat}",
              device=f"{n_dev}x {jax.devices()[0].device_kind}", jax=jax.__version__, commit=prov["commit"],
              tokens_per_s=round(tps, 1), step_time_s=round(step_time, 5),
              step_time_min_s=round(min(times), 5), flops_per_token=fpt,
              achieved_tflops=round(tps * fpt / 1e12, 4),
              mfu=None if (v := flops_lib.mfu(tps, fpt, n_dev, flops_lib.peak_flops())) is None else round(v, 4),
              params=count_params(model_cfg)["total"], compile_s=round(compile_s, 2), steps=steps,
              loss_last=float(m["loss"]))


def parse_layouts(text: str) -> list[dict[str, int]]:
  """"data=2,fsdp=4;fsdp=8" -> [{"data": 2, "fsdp": 4}, {"fsdp": 8}] (ConfigError naming a bad part)."""
  layouts = []
  for part in (p.strip() for p in text.split(";")):
    if not part:
      continue
    layout = {}
    for item in part.split(","):
      axis, sep, size = item.strip().partition("=")
      if not sep or axis not in sharding.MESH_AXES or not size.strip().lstrip("-").isdigit():
        raise ConfigError(f"--mesh: bad layout item {item.strip()!r} in {part!r}; expected axis=size with "
                          f"axis in {sharding.MESH_AXES}")
      layout[axis] = int(size)
    layouts.append(layout)
  if not layouts:
    raise ConfigError(f"--mesh={text!r} names no layout")
  return layouts


def bench_layouts(cfg, layouts: list[dict[str, int]], **kw) -> list[dict]:
  """`bench` once per mesh layout (a fresh copy of `cfg` each), throughput relative to the first."""
  rows = []
  for layout in layouts:
    c = copy.deepcopy(cfg)
    with c.unlocked():
      for axis in sharding.MESH_AXES:
        c.mesh[axis] = layout.get(axis, 1)
    try:
      row = bench(c, **kw)
    except ValueError as e:  # a layout that doesn't fit the devices
      raise ConfigError(f"--mesh layout {layout}: {e}") from None
    row["mesh"] = dict(sharding.mesh_shape(c.mesh, len(jax.devices())))
    row["relative_throughput"] = round(row["tokens_per_s"] / rows[0]["tokens_per_s"], 3) if rows else 1.0
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  cfg_args = [a for a in argv if a.startswith("--config")]
  parser = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--vocab", type=int, default=4096, help="tokenizer vocab when model.vocab_size=0")
  parser.add_argument("--mesh", default="", help='layouts to compare, e.g. "data=8;data=2,fsdp=4"')
  args = parser.parse_args([a for a in argv if not a.startswith("--config")])

  def go():
    cfg, rest = parse_args(cfg_args)
    if rest:
      raise ConfigError(f"unknown arguments {rest}")
    if args.mesh:
      bench_layouts(cfg, parse_layouts(args.mesh), steps=args.steps, warmup=args.warmup, vocab=args.vocab)
      return 0
    print(json.dumps(bench(cfg, steps=args.steps, warmup=args.warmup, vocab=args.vocab)), flush=True)
    return 0

  return main_guard(go)


if __name__ == "__main__":
  sys.exit(main())
