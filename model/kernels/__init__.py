"""Pallas attention kernels (flash attention for TPU and GPU); the dispatcher lives here.

    from model.kernels import flash_attention
    out = flash_attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)

Both kernels share one signature (q [B, T, N, H], k/v [B, S, K, H], masking by positions and segment ids,
see `flash_gpu.py`). `flash_attention` picks by `jax.default_backend()`: gpu → `flash_gpu` (Triton),
tpu → `flash_tpu` (Mosaic), cpu → `flash_gpu` in interpret mode, so CPU tests and CPU training with
`model.attention=pallas` run the same kernel code. Modules are imported lazily: each pulls in its own
Pallas backend, and a missing one is a clear error only when it is asked for.
"""
from __future__ import annotations

import importlib

import jax

_MODULES = {"gpu": "model.kernels.flash_gpu", "cuda": "model.kernels.flash_gpu", "rocm": "model.kernels.flash_gpu",
            "tpu": "model.kernels.flash_tpu", "cpu": "model.kernels.flash_gpu"}


def kernel_for(backend: str | None = None):
  """(flash_attention function, interpret flag) for a JAX backend name (default: the current one)."""
  backend = backend or jax.default_backend()
  if backend not in _MODULES:
    raise ValueError(f"model.attention=pallas: no flash attention kernel for backend {backend!r}; "
                     f"known: {sorted(set(_MODULES))}; use model.attention=xla")
  name = _MODULES[backend]
  try:
    module = importlib.import_module(name)
  except ImportError as e:
    raise ValueError(f"model.attention=pallas on {backend}: cannot import {name} ({e})") from e
  return module.flash_attention, backend == "cpu"


def flash_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                    sliding_window: int = 0, causal: bool = True, scale: float | None = None, **blocks):
  """The backend's flash attention (signature of `flash_gpu.flash_attention`; `blocks`: its tile sizes)."""
  fn, interpret = kernel_for()
  return fn(q, k, v, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids, sliding_window=sliding_window, causal=causal, scale=scale,
            interpret=interpret, **blocks)
