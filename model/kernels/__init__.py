"""Pallas attention kernels (flash attention and paged decode attention for TPU and GPU); dispatchers here.

    from model.kernels import flash_attention
    out = flash_attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)

Both kernels share one signature (q [B, T, N, H], k/v [B, S, K, H], masking by positions and segment ids,
see `flash_gpu.py`). `flash_attention` picks by `jax.default_backend()`: gpu → `flash_gpu` (Triton),
tpu → `flash_tpu` (Mosaic), cpu → `flash_gpu` in interpret mode, so CPU tests and CPU training with
`model.attention=pallas` run the same kernel code. Modules are imported lazily: each pulls in its own
Pallas backend, and a missing one is a clear error only when it is asked for.

`paged_attention` is the serving engine's paged-cache read (`model/layers/paged.py` registers it lazily
for `model.attention=pallas`, and for `auto` on GPU/TPU): decode steps (one query per row) run
`paged_gpu` (Triton; interpret mode on CPU) or `paged_tpu` (Mosaic); prefill chunks (T > 1) go to the
XLA `paged.attend`, the kernels being decode-only.
"""
from __future__ import annotations

import importlib

import jax

_MODULES = {"gpu": "model.kernels.flash_gpu", "cuda": "model.kernels.flash_gpu", "rocm": "model.kernels.flash_gpu",
            "tpu": "model.kernels.flash_tpu", "cpu": "model.kernels.flash_gpu"}


_PAGED_MODULES = {**{b: "model.kernels.paged_gpu" for b in ("gpu", "cuda", "rocm", "cpu")},
                  "tpu": "model.kernels.paged_tpu"}


def _load(modules: dict, backend: str, what: str):
  if backend not in modules:
    raise ValueError(f"model.attention=pallas: no {what} kernel for backend {backend!r}; "
                     f"known: {sorted(set(modules))}; use model.attention=xla")
  try:
    return importlib.import_module(modules[backend])
  except ImportError as e:
    raise ValueError(f"model.attention=pallas on {backend}: cannot import {modules[backend]} ({e})") from e


def paged_kernel_for(backend: str | None = None):
  """(paged decode attention function, interpret flag) for a JAX backend name (default: the current one)."""
  backend = backend or jax.default_backend()
  return _load(_PAGED_MODULES, backend, "paged attention").paged_attention, backend == "cpu"


def paged_attention(q, k_pages, v_pages, block_tables, positions, *, layer=None, sliding_window: int = 0):
  """`paged.PagedAttentionFn`: q [B, T, N, H] at `positions` [B, T] over each row's pages → [B, T, N, H].

  T == 1 (decode): the backend's Pallas kernel, the row's length being its query position + 1 (padding
  rows, position -1, get zeros). T > 1 (prefill chunks, speculative verification): `paged.attend`."""
  from model.layers import paged  # lazy: model.layers imports this package lazily too.
  if q.shape[1] != 1:
    return paged.attend(q, k_pages, v_pages, block_tables, positions, layer=layer,
                        sliding_window=sliding_window)
  fn, interpret = paged_kernel_for()
  out = fn(q[:, 0], k_pages, v_pages, block_tables, positions[:, 0] + 1, layer=layer,
           sliding_window=sliding_window, interpret=interpret)
  return out[:, None]


def paged_attention_auto(q, k_pages, v_pages, block_tables, positions, *, layer=None, sliding_window: int = 0):
  """`model.attention=auto`'s paged read: `paged_attention` on GPU/TPU where the kernel takes the shapes
  (Triton: power-of-two page size and head_dim), else the XLA `paged.attend` (always on CPU)."""
  from model.layers import paged
  backend = jax.default_backend()
  pow2 = lambda n: n & (n - 1) == 0
  if backend == "tpu" or (backend == "gpu" and pow2(k_pages.shape[-2]) and pow2(k_pages.shape[-1])):
    return paged_attention(q, k_pages, v_pages, block_tables, positions, layer=layer,
                           sliding_window=sliding_window)
  return paged.attend(q, k_pages, v_pages, block_tables, positions, layer=layer, sliding_window=sliding_window)


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
