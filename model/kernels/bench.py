"""Attention benchmark: forward and forward+backward TFLOP/s of pallas, cudnn and xla side by side, then
the end-to-end train-step tokens/s of a preset with each attention. One JSON object per line.

    python -m model.kernels.bench                 # on a GPU: seq 1k-16k, head_dim 64/128, causal and not, bf16
    python -m model.kernels.bench --quick         # CPU smoke run: tiny shapes (pallas in interpret mode)
    python -m model.kernels.bench --seqs=4096 --head_dims=128 --causal=1 --e2e=   # one point, no train step

Shapes follow the FlashAttention-2 paper's benchmark (Dao 2023, §4.1): hidden size 2048 (heads = 2048 /
head_dim), batch × seq = 16k tokens. FLOPs as FlashAttention counts them: 4·B·N·T·S·H for the forward
(two matmuls), ×2.5 for forward+backward (five matmuls), halved when causal. Time is the median of
`--iters` calls after one warmup (compile excluded), each ended by `block_until_ready`.

Rows: {"bench": "attention", "setup", "device", "jax", "commit", "impl", "mode": "fwd"|"fwd_bwd", "seq",
"head_dim", "heads", "batch", "causal", "time_ms", "tflops"} ({"error"} where an implementation cannot run
the case, e.g. cudnn off GPU or XLA's T×S logits out of memory). The end-to-end rows are `train.bench`'s
(run as `python -m train.bench --config=<preset> --config.model.attention=<impl>` in a subprocess, so
`model/` imports nothing of `train/`) with "attention" added.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from model import kernels

IMPLS = ("pallas", "cudnn", "xla")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ lives here.


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True, cwd=_REPO).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def attention_fn(impl: str, causal: bool):
  """q, k, v [B, T, N, H] → out: the kernel under test, with positions 0..T-1 (no segments)."""
  if impl == "pallas":
    def fn(q, k, v):
      pos = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
      return kernels.flash_attention(q, k, v, q_positions=pos, kv_positions=pos, causal=causal)
    return fn
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"cudnn needs a GPU (backend {jax.default_backend()!r})")
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)


def attention_flops(b: int, n: int, t: int, s: int, h: int, *, causal: bool, backward: bool) -> float:
  f = 4.0 * b * n * t * s * h * (2.5 if backward else 1.0)
  return f / 2 if causal else f


def _time(fn, args, iters: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warmup.
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_case(impl: str, *, seq: int, head_dim: int, causal: bool, tokens: int, hidden: int, iters: int,
               dtype=jnp.bfloat16) -> list[dict]:
  b, n = max(1, tokens // seq), max(1, hidden // head_dim)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = (jax.random.normal(kk, (b, seq, n, head_dim), dtype) for kk in keys)
  base = dict(impl=impl, seq=seq, head_dim=head_dim, heads=n, batch=b, causal=causal,
              setup=f"{impl} b{b} n{n} t{seq} h{head_dim} {'causal' if causal else 'full'} {jnp.dtype(dtype).name}")
  rows = []
  try:
    fn = attention_fn(impl, causal)
    fwd = jax.jit(fn)

    def loss(q, k, v):
      return jnp.vdot(fn(q, k, v).astype(jnp.float32), do.astype(jnp.float32))  # cotangent = do.

    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for mode, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
      t = _time(f, (q, k, v), iters)
      fl = attention_flops(b, n, seq, seq, head_dim, causal=causal, backward=mode == "fwd_bwd")
      rows.append(dict(base, mode=mode, time_ms=round(t * 1e3, 4), tflops=round(fl / t / 1e12, 3)))
  except Exception as e:
    rows.append(dict(base, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
  return rows


def e2e(preset: str, impl: str, steps: int, warmup: int) -> dict:
  """train.bench's JSON row for `preset` with model.attention=impl (subprocess: layering, fresh memory)."""
  if impl == "cudnn" and jax.default_backend() != "gpu":
    return dict(bench="train_step", setup=preset, attention=impl, error="cudnn needs a GPU")
  cmd = [sys.executable, "-m", "train.bench", f"--config={preset}", f"--config.model.attention={impl}",
         f"--steps={steps}", f"--warmup={warmup}"]
  p = subprocess.run(cmd, capture_output=True, text=True, cwd=_REPO)
  rows = [line for line in p.stdout.splitlines() if line.startswith("{")]
  if p.returncode or not rows:
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(bench="train_step", setup=preset, attention=impl, error=f"exit {p.returncode}: {tail[:300]}")
  return dict(json.loads(rows[-1]), attention=impl)


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m model.kernels.bench", description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="CPU-sized smoke run (tiny shapes, 350m,smoke)")
  parser.add_argument("--impls", default=",".join(IMPLS))
  parser.add_argument("--seqs", default="1024,2048,4096,8192,16384")
  parser.add_argument("--head_dims", default="64,128")
  parser.add_argument("--causal", default="1,0", help="1 causal, 0 full; comma-separated")
  parser.add_argument("--tokens", type=int, default=16384, help="batch × seq (FA-2 paper: 16k)")
  parser.add_argument("--hidden", type=int, default=2048, help="heads × head_dim (FA-2 paper: 2048)")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--e2e", default="configs/lm.py:350m", help="preset for train-step tokens/s ('' = skip)")
  parser.add_argument("--e2e_steps", type=int, default=10)
  argv = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(argv)
  if args.quick:  # new defaults; flags given explicitly still win.
    parser.set_defaults(seqs="64,128", head_dims="64", tokens=128, hidden=128, iters=1,
                        e2e="configs/lm.py:350m,smoke", e2e_steps=1)
    args = parser.parse_args(argv)
  impls = [i for i in args.impls.split(",") if i]
  unknown = [i for i in impls if i not in IMPLS]
  if unknown:
    print(f"error: --impls: unknown {unknown}; known {list(IMPLS)}", file=sys.stderr)
    return 2

  common = dict(bench="attention", device=f"{jax.devices()[0].device_kind}", jax=jax.__version__,
                commit=_commit())
  for seq in _ints(args.seqs):
    for h in _ints(args.head_dims):
      for causal in (bool(c) for c in _ints(args.causal)):
        for impl in impls:
          for row in bench_case(impl, seq=seq, head_dim=h, causal=causal, tokens=args.tokens,
                                hidden=args.hidden, iters=args.iters):
            print(json.dumps(dict(common, **row)), flush=True)
  if args.e2e:
    for impl in impls:
      print(json.dumps(e2e(args.e2e, impl, args.e2e_steps, 0 if args.quick else 2)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
