"""Will a config fit? Per-device memory and FLOPs of a training setup, before renting the machines.

    python -m train.plan --config=configs/lm.py:7b --devices=64 --device_kind=v5p
    python -m train.plan --config=configs/lm.py:1b --config.mesh.fsdp=8 --devices=8 --device_kind=H100
    python -m train.plan --config=configs/lm.py:1b --topology=v5e:4x4        # TPU AOT compile (libtpu)
    python -m train.plan --config=configs/lm.py:tiny,smoke                   # this machine's devices

Prints one JSON object per figure group on stdout ({"plan": "memory" | "compiled" | "flops" |
"verdict", ...}) and a table for people on stderr. Figures are bytes per device.

- memory (exact for the arrays): the training state's abstract shapes (`jax.eval_shape` through
  `train.state.make_setup`) under the sharding rules on a mesh of `--devices` (an `AbstractMesh`: no
  device needed), each array's shard shape × itemsize: params, optimizer state, grads (one buffer the
  size of the params; two with train.grad_accum > 1, the accumulator), the batch.
- activations (estimate): what the backward pass keeps, with b = micro-batch rows per device
  (batch / grad_accum / batch shards), s = seq_len, d = d_model, H = heads, hq = H·head_dim,
  hkv = kv_heads·head_dim, f = d_ff (× experts_per_token + shared for MoE), m = 3 gated MLP (2 plain),
  t = tensor shards, c = compute dtype bytes, V = vocab:
    E = b·s·(4d + (3hq + 3hkv + m·f)/t)·c   a layer's tensors: norm inputs and outputs, q k v before
                                            and after rope, attention output, MLP gate/up/product
    S = 2·b·(H/t)·s²·4                      attention="xla": fp32 logits and probabilities (a fused
                                            kernel keeps b·(H/t)·s·4, the log-sum-exp, instead)
    head = 2·b·s·(V/t)·4 + b·s·d·c          fp32 logits and their gradient, the embedding output
    remat none       L·(E + S) + head
    remat full       L·b·s·d·c (block inputs) + (E + S) (one block recomputed at a time) + head
    remat save_dots  L·b·s·(3d + (hq + 2hkv + (m-1)·f)/t)·c (weight-matmul outputs) + (E + S) + head
    remat offload    as full on the device; save_dots' matmul outputs in host memory
  Arrays in pinned host memory (optim.offload's moments, remat=offload's saved matmuls) are reported
  apart (`*_host_bytes`) and left out of the device total.
  It ignores XLA's temporaries and fusion; the compiled figure below is the real one.
- compiled: `jax.jit(step).lower(abstract state, abstract batch).compile().memory_analysis()` of the
  real train step (same shardings, donation, optimizer): on this machine's devices when there are
  `--devices` of them, else on `--devices` fake CPU devices (XLA's CPU buffer assignment: a cross-check,
  not the accelerator's figure), or, with `--topology=v5e:4x4` (any `jax.experimental.topologies` TPU
  name), compiled ahead of time for that TPU slice on this CPU-only machine through libtpu
  (`pip install -e ".[tpu]"`; measured: 1b on v5e:4x4 compiles in ~85 s of CPU). Ahead-of-time
  compilation for GPUs without one was not attempted (it needs the CUDA PJRT plugin, not installed on
  the CPU machines): run the planner on a GPU host, or read the estimate. peak = arguments + outputs
  - aliased (donated) + temporaries.
- flops: `train/flops.py` (PaLM model FLOPs per token, Chinchilla's count beside it) × tokens per step,
  and the ideal step time at 100% MFU where the device's peak is known.
- verdict: one line against the device memory (`--device_memory_gb`, default from `DEVICE_MEMORY_GB`
  by device kind): the compiled peak when compiled for that device kind, else the estimate's total.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding

from model.params import count_params
from train import flops as flops_lib
from train import pipeline
from train import sharding
from train.config import ConfigError, main_guard, model_config, parse_args, resolve

GiB = 1 << 30
# HBM per device in GiB (vendor figures). Keys match `jax.Device.device_kind` by substring, longest
# first, like flops.PEAK_FLOPS; `ALIASES` lets --device_kind say "v5e" or "H100".
DEVICE_MEMORY_GB = {
    "NVIDIA H100": 80, "NVIDIA H200": 141, "NVIDIA A100": 80, "NVIDIA L4": 24,
    "TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5p": 95, "TPU v5": 95,  # v5p reports "TPU v5"
    "TPU v6 lite": 32, "TPU v6e": 32,
}
ALIASES = {"h100": "NVIDIA H100", "h200": "NVIDIA H200", "a100": "NVIDIA A100", "l4": "NVIDIA L4",
           "v4": "TPU v4", "v5e": "TPU v5 lite", "v5litepod": "TPU v5 lite", "v5p": "TPU v5p",
           "v6e": "TPU v6 lite"}
BATCH_DTYPES = dict(inputs=jnp.int32, targets=jnp.int32, segment_ids=jnp.int32, positions=jnp.int32,
                    loss_mask=jnp.float32)


def device_kind_name(kind: str) -> str:
  return ALIASES.get(kind.lower(), kind)


def _by_kind(table: dict, kind: str):
  for name, value in sorted(table.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name) or name in kind:
      return value
  return None


def device_memory_gb(kind: str) -> float | None:
  return _by_kind(DEVICE_MEMORY_GB, device_kind_name(kind))


def _bytes(tree, host: bool = False) -> int:
  """Per-device bytes of a tree of ShapeDtypeStructs carrying NamedShardings: those in device memory,
  or with `host` those in pinned host memory (`optim.offload`)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if (x.sharding.memory_kind == "pinned_host") == host)


def _shards(spec_entry, mesh_shape: dict) -> int:
  if spec_entry is None:
    return 1
  names = (spec_entry,) if isinstance(spec_entry, str) else spec_entry
  return math.prod(mesh_shape[n] for n in names)


def activation_estimate(cfg, model_cfg, mesh_shape: dict, rules) -> tuple[int, int, str]:
  """(device bytes, host bytes, the formula with its numbers) — see the module docstring."""
  mc = model_cfg
  micro = cfg.train.batch_size // cfg.train.grad_accum
  spec = sharding.logical_to_spec(("batch", "length"), (micro, cfg.data.seq_len),
                                  types.SimpleNamespace(shape=mesh_shape), rules)
  b = micro / _shards(spec[0], mesh_shape)
  s = cfg.data.seq_len / _shards(spec[1], mesh_shape)
  tp = mesh_shape.get("tensor", 1)
  t = lambda n: tp if n % tp == 0 else 1  # a dim the rules can't split stays whole.
  d, H, hd, L, V = mc.d_model, mc.n_heads, mc.hd, mc.n_layers, mc.vocab_size
  hq, hkv = H * hd, mc.n_kv_heads * hd
  f = mc.ff if not mc.n_experts else mc.moe_ff * (mc.experts_per_token + mc.n_shared_experts)
  m = 3 if mc.gated else 2
  c = np.dtype(mc.compute_dtype).itemsize
  E = b * s * (4 * d + (3 * hq + 3 * hkv) / t(H) + m * f / t(f)) * c
  S = 2 * b * (H / t(H)) * s * s * 4 if mc.attention == "xla" else b * (H / t(H)) * s * 4
  head = 2 * b * s * (V / t(V)) * 4 + b * s * d * c
  kept = b * s * (3 * d + (hq + 2 * hkv) / t(H) + (m - 1) * f / t(f)) * c  # save_dots' matmul outputs
  host = 0
  if mc.remat == "full":
    total, form = L * b * s * d * c + E + S + head, "L·b·s·d·c + (E + S) + head"
  elif mc.remat == "save_dots":
    total, form = L * kept + E + S + head, "L·b·s·(3d + (hq + 2hkv + (m-1)·f)/t)·c + (E + S) + head"
  elif mc.remat == "offload":  # save_dots' matmul outputs wait in pinned host memory.
    total, host = L * b * s * d * c + E + S + head, L * kept
    form = "L·b·s·d·c + (E + S) + head; host: L·b·s·(3d + (hq + 2hkv + (m-1)·f)/t)·c"
  else:
    total, form = L * (E + S) + head, "L·(E + S) + head"
  nums = (f"remat={mc.remat}: {form}; b={b:g} s={s:g} d={d} H={H} hq={hq} hkv={hkv} f={f} m={m} t={tp} "
          f"c={c} V={V} L={L}; E={_size(E)}, S={_size(S)}, head={_size(head)}")
  return int(total), int(host), nums


def state_memory(cfg, model_cfg, n_devices: int) -> dict:
  """Exact per-device bytes of params, grads, optimizer state and batch on an abstract mesh."""
  from train.state import make_setup
  shape = sharding.mesh_shape(cfg.mesh, n_devices)
  mesh = AbstractMesh(tuple(shape.values()), tuple(shape))
  setup = make_setup(cfg, model_cfg, mesh)
  st = setup.abstract_state
  params = _bytes(st["params"])
  batch_shape = (cfg.train.batch_size, cfg.data.seq_len)
  batch_sh = sharding.batch_sharding(batch_shape, mesh, setup.rules)
  batch = sum(math.prod(batch_sh.shard_shape(batch_shape)) * np.dtype(dt).itemsize
              for dt in BATCH_DTYPES.values())
  act, act_host, formula = activation_estimate(cfg, model_cfg, shape, setup.rules)
  out = dict(params_bytes=params, grads_bytes=params * (2 if cfg.train.grad_accum > 1 else 1),
             opt_state_bytes=_bytes(st["opt_state"]), other_state_bytes=_bytes(dict(step=st["step"], rng=st["rng"])),
             batch_bytes=batch, activations_bytes_est=act)
  out["total_bytes_est"] = sum(out.values())
  host = dict(opt_state_host_bytes=_bytes(st["opt_state"], host=True), activations_host_bytes_est=act_host)
  return dict(mesh=shape, **out, **host, activation_formula=formula)


def compiled_memory(cfg, model_cfg, devices) -> dict:
  """memory_analysis() of the real jitted train step compiled for `devices` (nothing allocated)."""
  from train.state import make_setup
  from train.step import make_train_step
  mesh = sharding.make_mesh(cfg.mesh, devices)
  setup = make_setup(cfg, model_cfg, mesh)
  batch_shape = (cfg.train.batch_size, cfg.data.seq_len)
  batch_sh = sharding.batch_sharding(batch_shape, mesh, setup.rules)
  batch = {k: jax.ShapeDtypeStruct(batch_shape, dt, sharding=batch_sh) for k, dt in BATCH_DTYPES.items()}
  step = make_train_step(setup, cfg, batch_shape)
  m = step.lower(setup.abstract_state, batch).compile().memory_analysis()
  out = dict(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
             alias_bytes=int(m.alias_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes),
             generated_code_bytes=int(m.generated_code_size_in_bytes))
  out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  return out


def tpu_topology_devices(name: str) -> list:
  """Devices of a TPU slice named like "v5e:4x4" for ahead-of-time compilation (needs libtpu)."""
  import os

  from jax.experimental import topologies
  try:
    import libtpu  # noqa: F401  (only to give a clear message when it's missing)
  except ImportError:
    raise ConfigError(f"--topology={name} compiles for TPU ahead of time, which needs libtpu: "
                      f"pip install -e \".[tpu]\"") from None
  if os.environ.get("TPU_SKIP_MDS_QUERY"):  # set by JAX at import when this machine has no TPU chips:
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # else libtpu logs an INVALID_ARGUMENT.
  # libtpu's one-process-per-host lockfile guards the chips; an AOT compile only uses the compiler, and
  # without this it fails whenever another JAX process on the machine has loaded libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
  except Exception as e:  # libtpu's message for an unknown name is a long status dump.
    raise ConfigError(f"--topology={name}: not a TPU topology libtpu knows ({str(e).splitlines()[0]})") from None


def flops_figures(cfg, model_cfg, n_devices: int, kind: str) -> dict:
  tokens = cfg.train.batch_size * cfg.data.seq_len
  fpt = flops_lib.flops_per_token(model_cfg, cfg.data.seq_len)
  peak = flops_lib.peak_flops(types.SimpleNamespace(device_kind=device_kind_name(kind)))
  counts = count_params(model_cfg)
  stages = int(cfg.mesh.get("stage", 1))
  # GPipe idles (S−1) of every M+S−1 pipeline iterations: ideal time grows by 1 / (1 − bubble).
  bubble = pipeline.bubble_fraction(stages, cfg.train.microbatches) if stages > 1 else 0.0
  return dict(params=counts["total"], non_embedding_params=counts["non_embedding"], tokens_per_step=tokens,
              pipeline_stages=stages, pipeline_bubble=bubble,
              flops_per_token=fpt, flops_per_step=fpt * tokens,
              chinchilla_flops_per_token=flops_lib.chinchilla_flops_per_token(model_cfg, cfg.data.seq_len),
              peak_flops_per_device=peak,
              ideal_step_s=(fpt * tokens / (n_devices * peak) / (1.0 - bubble)) if peak else None)


def plan(cfg, *, devices: int | None = None, device_kind: str | None = None,
         device_memory: float | None = None, topology: str | None = None, compile_step: bool = True,
         vocab: int | None = None) -> list[dict]:
  """The figure groups (see module docstring) for `cfg` on `devices` devices of `device_kind`."""
  resolve(cfg, vocab or cfg.data.vocab_size)
  model_cfg = model_config(cfg)
  compile_devices, target = None, None
  if topology:
    compile_devices = tpu_topology_devices(topology)
    if devices and devices != len(compile_devices):
      raise ConfigError(f"--devices={devices} but topology {topology} has {len(compile_devices)} devices")
    target = f"{compile_devices[0].device_kind} x{len(compile_devices)} (topology {topology}, AOT)"
  else:
    local = jax.devices()
    n = devices or len(local)
    if len(local) >= n:
      compile_devices = local[:n]
    elif len(jax.devices("cpu")) >= n:
      compile_devices = jax.devices("cpu")[:n]
    if compile_devices:
      target = f"{compile_devices[0].device_kind} x{n}"
      if compile_devices[0].platform == "cpu":
        target += " (XLA:CPU; a cross-check, not an accelerator's figure)"
  n = len(compile_devices) if compile_devices else devices
  if not n or n < 1:
    raise ConfigError(f"--devices must be >= 1, got {devices}")
  kind = device_kind_name(device_kind or (compile_devices[0].device_kind if compile_devices else "cpu"))
  try:
    mem = state_memory(cfg, model_cfg, n)
  except ValueError as e:  # mesh doesn't fit the device count
    raise ConfigError(str(e)) from None
  setup = dict(config=cfg.run.name, devices=n, device_kind=kind,
               batch=f"{cfg.train.batch_size}x{cfg.data.seq_len}", grad_accum=cfg.train.grad_accum,
               remat=model_cfg.remat, compute_dtype=model_cfg.compute_dtype)
  groups = [dict(plan="memory", **setup, **mem)]

  compiled = None
  if compile_step and compile_devices:
    try:
      compiled = dict(plan="compiled", target=target, **compiled_memory(cfg, model_cfg, compile_devices))
    except Exception as e:  # noqa: BLE001 — a failed compile is a finding, not a crash of the planner.
      compiled = dict(plan="compiled", target=target, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    groups.append(compiled)
  elif compile_step:
    groups.append(dict(plan="compiled", target=None,
                       error=f"no {n} devices to compile for (pass --devices to fake CPU ones)"))
  groups.append(dict(plan="flops", **setup, **flops_figures(cfg, model_cfg, n, kind)))

  gb = device_memory if device_memory else device_memory_gb(kind)
  same_kind = compiled and "error" not in compiled and (topology or kind == compile_devices[0].device_kind)
  need, source = (compiled["peak_bytes"], "compiled") if same_kind else (mem["total_bytes_est"], "estimate")
  if gb:
    frac = need / (gb * GiB)
    fits = frac <= 1.0
    hint = "" if fits else "; try --config.train.remat=full, a larger mesh.fsdp, or grad_accum"
    text = (f"{'fits' if fits else 'does NOT fit'}: {_size(need)} of {gb:g} GiB per {kind} "
            f"({100 * frac:.0f}%, {source}){hint}")
  else:
    fits, text = None, (f"{_size(need)} per device ({source}); device memory of {kind!r} unknown: "
                        f"pass --device_memory_gb")
  groups.append(dict(plan="verdict", device_kind=kind, device_memory_gb=gb, need_bytes=need, source=source,
                     fits=fits, verdict=text))
  return groups


def _size(n: float) -> str:
  for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"


def table(groups: list[dict]) -> str:
  g = {x["plan"]: x for x in groups}
  mem, fl, v = g["memory"], g["flops"], g["verdict"]
  mesh = " ".join(f"{k}={s}" for k, s in mem["mesh"].items() if s > 1) or "1 device"
  rows = [f"plan {mem['config']}: {mem['devices']}x {mem['device_kind']}, mesh {mesh}, batch {mem['batch']}"
          f" (grad_accum {mem['grad_accum']}), remat {mem['remat']}, {mem['compute_dtype']}",
          "  per device"]
  for key, name in (("params_bytes", "params"), ("grads_bytes", "grads"), ("opt_state_bytes", "optimizer state"),
                    ("batch_bytes", "batch"), ("activations_bytes_est", "activations (est.)"),
                    ("total_bytes_est", "total (est.)")):
    rows.append(f"  {name:<22}{_size(mem[key]):>12}")
  host = mem["opt_state_host_bytes"] + mem["activations_host_bytes_est"]
  if host:
    rows.append(f"  {'host memory (offload)':<22}{_size(host):>12}")
  rows.append(f"  activations: {mem['activation_formula']}")
  c = g.get("compiled")
  if c and "error" not in c:
    rows.append(f"  compiled on {c['target']}: args {_size(c['argument_bytes'])} + out "
                f"{_size(c['output_bytes'])} - donated {_size(c['alias_bytes'])} + temp "
                f"{_size(c['temp_bytes'])} = peak {_size(c['peak_bytes'])}")
  elif c:
    rows.append(f"  compiled: not available ({c['error']})")
  ideal = f", ideal step {fl['ideal_step_s']:.3g} s at 100% MFU" if fl["ideal_step_s"] else ""
  rows.append(f"  FLOPs/token {fl['flops_per_token']:.4g} (PaLM), per step {fl['flops_per_step']:.4g}{ideal}")
  if fl["pipeline_stages"] > 1:
    rows.append(f"  pipeline: {fl['pipeline_stages']} stages, bubble {fl['pipeline_bubble']:.1%} of each step")
  rows.append(f"verdict: {v['verdict']}")
  return "\n".join(rows)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=int, default=None, help="device count (default: this machine's)")
  parser.add_argument("--device_kind", default=None, help='e.g. H100, H200, v5e, v5p, v6e, "TPU v4"')
  parser.add_argument("--device_memory_gb", type=float, default=None, help="HBM per device (GiB)")
  parser.add_argument("--topology", default=None, help="TPU slice to compile for ahead of time, e.g. v5e:4x4")
  parser.add_argument("--no_compile", action="store_true", help="skip compiling the step")
  parser.add_argument("--vocab", type=int, default=None, help="tokenizer vocab when model.vocab_size=0 "
                      "(default data.vocab_size)")

  def go():
    cfg, rest = parse_args(argv)
    args, unknown = parser.parse_known_args(rest)
    if unknown:
      raise ConfigError(f"unknown arguments {unknown}")
    if args.devices is not None and args.devices < 1:
      raise ConfigError(f"--devices must be >= 1, got {args.devices}")
    if args.devices and not args.topology:
      # Before any backend starts: enough CPU devices to compile the step for a mesh this machine lacks.
      jax.config.update("jax_num_cpu_devices", max(args.devices, 1))
    groups = plan(cfg, devices=args.devices, device_kind=args.device_kind, device_memory=args.device_memory_gb,
                  topology=args.topology, compile_step=not args.no_compile, vocab=args.vocab)
    for g in groups:
      print(json.dumps(g), flush=True)
    print(table(groups), file=sys.stderr)
    return 0

  return main_guard(go)


if __name__ == "__main__":
  sys.exit(main())
