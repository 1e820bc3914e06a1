"""μP coordinate check: do activations stay the same size as the model gets wider?

    python -m train.coordcheck [--widths=64,128,256,512] [--steps=4] [--lr=3e-3] [--out=runs/coordcheck]
                               [--n_layers=2] [--sources=...] [--vocab_size=4096] [--cache_dir=...]

The check of Tensor Programs V (Yang et al. 2022, Fig. 5) and of the `mup` library's `get_coord_data`:
for the standard parametrization (SP) and for μP (`model.mup_base_width` = the smallest width), a
2-layer, 4-head model of each width (head_dim ∝ width; d_ff = 4·width, so every hidden dim scales by
the same m) trains `steps` Adam steps at the SAME learning rate on the same real-text batches (8 × 128
tokens from the project's data pipeline; default the embedded stdlib corpus, cached by `data.prepare`),
through the project's own train state, optimizer and jitted step (clipping, weight decay and z-loss
off: plain Adam, as in the paper). At init and after every step it records, on a fixed probe batch,
mean |x| of the embedding output, every block's output (residual stream) and the logits.

Writes <out>/coordcheck.json (all numbers) and <out>/coordcheck.png (one panel per parametrization ×
activation, mean |x| vs width on log-log axes, one line per step), and prints one verdict line per
parametrization: the slope of log mean|logits| vs log width after the last step.

Measured with the defaults (2 busy CPU cores, ~2 min): logits slope SP +0.85, μP -0.00; the last
block's output grows 45x from width 64 to 512 under SP (slope +1.9) and stays flat under μP (-0.04).
At lr 1e-2 SP's logits slope is +0.58 only because the widest SP model is already unstable (residual
stream 150x); μP stays at +0.01. At init μP's logits fall as width^-0.5 (readout 1/m on O(√width)
init logits), which the paper allows: they are dominated by the learned part after one or two steps.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs.loader import ConfigError, load_preset, main_guard
from data.pipeline import train_iterator
from data.prepare import prepare
from data.tokenizer import Tokenizer
from train import sharding
from train.config import DEFAULT_CONFIG, model_config, resolve
from train.state import init_state, make_setup
from train.step import make_train_step

PARAMETRIZATIONS = ("sp", "mup")
N_HEADS = 4
STABLE_SLOPE = 0.25  # |slope| below this: the logits neither blow up nor vanish with width.


def run_config(width: int, parametrization: str, base_width: int, *, steps: int, lr: float,
               batch_size: int, seq_len: int, vocab_size: int, n_layers: int = 2):
  """The run config of one coordinate-check model: the default preset with the check's overrides."""
  cfg = load_preset(DEFAULT_CONFIG)
  cfg.model.update(dict(d_model=width, n_layers=n_layers, n_heads=N_HEADS, n_kv_heads=N_HEADS, head_dim=0,
                        d_ff=4 * width, vocab_size=0, dropout=0.0,
                        scan_layers=False,  # so the probe can run the blocks one by one.
                        compute_dtype="float32",
                        mup_base_width=base_width if parametrization == "mup" else 0))
  cfg.optim.update(dict(name="adamw", peak_lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.0,
                        clip=0.0))  # global-norm clipping would couple the step size to width.
  cfg.train.update(dict(steps=steps, batch_size=batch_size, grad_accum=1, z_loss=0.0, remat="none"))
  cfg.data.seq_len = seq_len
  cfg.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  return resolve(cfg, vocab_size)


def make_probe(setup):
  """jitted fn(params, batch) -> {embed, block0.., logits: mean |x|}, running the model piece by piece."""

  def probe(params, batch):
    model = setup.model(params)
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    # The first line of Transformer._forward (rope: no additive position table).
    x = jnp.take(model.embed.get_value(), batch["inputs"], axis=0).astype(model.cfg.compute_dtype)
    out = {"embed": jnp.abs(x).mean()}
    for i, block in enumerate(model.blocks):
      x = block(x, **kw)[0]  # (x, cache, aux)
      out[f"block{i}"] = jnp.abs(x).mean()
    out["logits"] = jnp.abs(model(batch["inputs"], **kw)).mean()  # the real forward, multiplier included.
    return out

  return jax.jit(probe)


def coord_data(widths, parametrization: str, batches: list[dict], *, lr: float, vocab_size: int,
               n_layers: int = 2, seed: int = 0) -> dict[str, list[list[float]]]:
  """{kind: [[mean |x| per width] per t]}, t = 0 (init) .. len(batches) - 1 (steps done).

  `batches[0]` is the probe batch; `batches[1:]` are trained on, one per step.
  """
  batch_size, seq_len = batches[0]["inputs"].shape
  steps = len(batches) - 1
  rows: dict[str, list[list[float]]] = {}
  for width in widths:
    cfg = run_config(width, parametrization, min(widths), steps=steps, lr=lr, batch_size=batch_size,
                     seq_len=seq_len, vocab_size=vocab_size, n_layers=n_layers)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])  # tiny models: one device, no collectives.
    setup = make_setup(cfg, model_config(cfg), mesh)
    state = init_state(setup, seed)
    step_fn = make_train_step(setup, cfg, (batch_size, seq_len))
    probe = make_probe(setup)
    per_t = [jax.device_get(probe(state["params"], batches[0]))]
    for batch in batches[1:]:
      state, _ = step_fn(state, batch)
      per_t.append(jax.device_get(probe(state["params"], batches[0])))
    for kind in ["embed"] + [f"block{i}" for i in range(n_layers)] + ["logits"]:  # forward order.
      rows.setdefault(kind, [[] for _ in per_t])
      for t, values in enumerate(per_t):
        rows[kind][t].append(float(values[kind]))
  return rows


def slope(widths, values) -> float:
  """Least-squares slope of log(values) against log(widths)."""
  return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def real_text_batches(n: int, *, batch_size: int, seq_len: int, sources: str = "", vocab_size: int = 0,
                      cache_dir: str = "", seed: int = 0) -> tuple[list[dict], int]:
  """`n` packed training batches and the tokenizer's vocab size, through `data.prepare` (cached)."""
  d = load_preset(DEFAULT_CONFIG).data  # the default preset's tokenizer settings, so its cache is reused.
  prepared = prepare(sources=sources, vocab_size=vocab_size or d.vocab_size, cache_dir=cache_dir,
                     val_fraction=d.val_fraction, seed=seed, tokenizer_sample_chars=d.tokenizer_sample_chars)
  it = train_iterator(prepared.manifest_path, seq_len=seq_len, batch_size=batch_size, seed=seed, prefetch=0)
  batches = [next(it) for _ in range(n)]
  if hasattr(it, "close"):
    it.close()
  return batches, Tokenizer.load(prepared.tokenizer_path).vocab_size


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  widths, records = result["widths"], result["records"]
  kinds = list(records[PARAMETRIZATIONS[0]])
  fig, axes = plt.subplots(len(PARAMETRIZATIONS), len(kinds), figsize=(3.2 * len(kinds), 2.8 * 2),
                           squeeze=False, sharex=True)
  cmap = plt.get_cmap("viridis")
  for r, par in enumerate(PARAMETRIZATIONS):
    for c, kind in enumerate(kinds):
      ax = axes[r][c]
      per_t = records[par][kind]
      for t, values in enumerate(per_t):
        ax.plot(widths, values, marker="o", ms=3, color=cmap(t / max(1, len(per_t) - 1)),
                label="init" if t == 0 else f"step {t}")
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      title = f"{'μP' if par == 'mup' else 'SP'}: {kind}"
      if kind == "logits":
        title += f" (slope {result['logit_slope'][par]:+.2f})"
      ax.set_title(title, fontsize=9)
      if r == len(PARAMETRIZATIONS) - 1:
        ax.set_xlabel("width (d_model)")
      if c == 0:
        ax.set_ylabel("mean |x|")
  axes[0][-1].legend(fontsize=7)
  fig.suptitle(f"coordinate check: Adam lr={result['lr']:g}, {result['batch_size']}×{result['seq_len']} "
               f"tokens/step, μP base width {min(widths)}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(widths, *, steps: int = 4, lr: float = 3e-3, out: str | pathlib.Path = "runs/coordcheck",
        batch_size: int = 8, seq_len: int = 128, n_layers: int = 2, sources: str = "", vocab_size: int = 0,
        cache_dir: str = "", seed: int = 0) -> dict:
  """Runs the check for SP and μP, writes coordcheck.json/.png under `out`, returns the JSON dict."""
  widths = sorted(int(w) for w in widths)
  if len(set(widths)) < 2:
    raise ConfigError(f"--widths needs at least two different widths, got {widths}")
  bad = [w for w in widths if w <= 0 or w % (2 * N_HEADS)]
  if bad:
    raise ConfigError(f"--widths {bad}: each must be a positive multiple of {2 * N_HEADS} "
                      f"({N_HEADS} heads, even head_dim for rope)")
  if steps < 1 or lr <= 0 or batch_size < 1 or seq_len < 2 or n_layers < 1:
    raise ConfigError(f"need --steps >= 1, --lr > 0, --batch_size >= 1, --seq_len >= 2, --n_layers >= 1 "
                      f"(got {steps}, {lr}, {batch_size}, {seq_len}, {n_layers})")
  t0 = time.time()
  batches, vocab = real_text_batches(steps + 1, batch_size=batch_size, seq_len=seq_len, sources=sources,
                                     vocab_size=vocab_size, cache_dir=cache_dir, seed=seed)
  records = {p: coord_data(widths, p, batches, lr=lr, vocab_size=vocab, n_layers=n_layers, seed=seed)
             for p in PARAMETRIZATIONS}
  result = dict(widths=widths, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, n_layers=n_layers,
                n_heads=N_HEADS, vocab_size=vocab, mup_base_width=widths[0], sources=sources or "stdlib",
                records=records,
                logit_slope={p: slope(widths, records[p]["logits"][-1]) for p in PARAMETRIZATIONS},
                wall_s=round(time.time() - t0, 1), device=jax.devices()[0].device_kind)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "coordcheck.json").write_text(json.dumps(result, indent=2))
  plot(result, out / "coordcheck.png")
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.coordcheck", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--widths", default="64,128,256,512", help="comma-separated d_model values")
  parser.add_argument("--steps", type=int, default=4, help="Adam steps per width")
  parser.add_argument("--lr", type=float, default=3e-3, help="the one learning rate every width uses")
  parser.add_argument("--out", default="runs/coordcheck", help="directory for coordcheck.json/.png")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--n_layers", type=int, default=2)
  parser.add_argument("--sources", default="", help='data.sources: "" = embedded stdlib corpus')
  parser.add_argument("--vocab_size", type=int, default=0, help="tokenizer vocab (0: the default preset's)")
  parser.add_argument("--cache_dir", default="", help="data cache (default $JAXLM_CACHE or ~/.cache/jaxlm)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  def go():
    try:
      widths = [int(w) for w in args.widths.split(",") if w.strip()]
    except ValueError:
      raise ConfigError(f"--widths must be comma-separated integers, got {args.widths!r}") from None
    result = run(widths, steps=args.steps, lr=args.lr, out=args.out, batch_size=args.batch_size,
                 seq_len=args.seq_len, n_layers=args.n_layers, sources=args.sources,
                 vocab_size=args.vocab_size, cache_dir=args.cache_dir, seed=args.seed)
    for p in PARAMETRIZATIONS:
      s = result["logit_slope"][p]
      verdict = "width-stable" if abs(s) < STABLE_SLOPE else ("grows" if s > 0 else "shrinks") + " with width"
      print(f"{p}: slope of log mean|logits| vs log width after step {result['steps']}: {s:+.2f} ({verdict})")
    print(f"wrote {args.out}/coordcheck.json, coordcheck.png ({result['wall_s']:.0f}s)", file=sys.stderr)
    return 0

  return main_guard(go)


if __name__ == "__main__":
  sys.exit(main())
