"""Argument checks and layout shared by the paged decode kernels (`paged_gpu.py`, `paged_tpu.py`).

`prepare` turns the public arguments (q [B, N, H], pages [(L,) K, P, S, H], block tables [B, M], lengths
[B], optional int8 scales) into what both kernels index: q grouped per kv head [B, K, G, H], the page
pool flattened to [L·K·P, S, H] (a free reshape: page i of kv head h of layer l is row (l·K + h)·P + i),
and per row the query position and the range of pages (and blocks of pages) its query can see. O(B)
XLA work; the pool is never copied.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model.kernels.blocks import MASK  # noqa: F401  (the paged kernels import it from here)


@dataclasses.dataclass
class Prepared:
  q: jax.Array  # [B, K, G, H], pages' dtype (q's for int8 pages).
  k: jax.Array  # [L·K·P, S, H]
  v: jax.Array
  k_scales: jax.Array | None  # [L·K·P, S] fp32, or None.
  v_scales: jax.Array | None
  tables: jax.Array  # [B, M'] int32, M' a multiple of pages_per_block (padded with the null page 0,
  #   whose keys sit past every query: masked).
  pos: jax.Array  # [B] query position (lengths - 1; -1: padding row).
  lo_page: jax.Array  # [B] first page the window can see (0 without a window).
  hi_page: jax.Array  # [B] last page holding a key (inclusive; -1 for a padding row).
  lo_block: jax.Array  # [B] the same in blocks of pages_per_block pages, [lo, hi) (0, 0: padding).
  hi_block: jax.Array
  base: jax.Array  # int32 scalar: layer · K (0 without a layers axis).
  pool: int  # P: pages per (layer, kv head).
  scale: float
  pages_per_block: int

  @property
  def quantized(self) -> bool:
    return self.k_scales is not None


def _scales(scales, pages, name):
  """[(L,) K, P, S] or [(L,) K, P] → flattened [L·K·P, S] fp32."""
  lead = pages.shape[:-2]  # (L,) K, P
  if scales is None:
    raise ValueError(f"paged attention: int8 pages need {name} (per token {lead + pages.shape[-2:-1]} "
                     f"or per page {lead})")
  if scales.shape == lead:
    scales = jnp.broadcast_to(scales[..., None], pages.shape[:-1])
  if scales.shape != pages.shape[:-1]:
    raise ValueError(f"paged attention: {name} must be {pages.shape[:-1]} (per token) or {lead} (per page), "
                     f"got {scales.shape}")
  return scales.astype(jnp.float32).reshape(-1, pages.shape[-2])


def prepare(q, k_pages, v_pages, block_tables, lengths, *, layer, sliding_window, k_scales, v_scales, scale,
            pages_per_block) -> Prepared:
  B, N, H = q.shape
  if k_pages.shape != v_pages.shape or k_pages.ndim not in (4, 5):
    raise ValueError(f"paged attention: k/v pages must both be [(L,) K, P, S, H], got {k_pages.shape} and "
                     f"{v_pages.shape}")
  if (k_pages.ndim == 5) != (layer is not None):
    raise ValueError(f"paged attention: pages of rank {k_pages.ndim} need layer "
                     f"{'an index' if k_pages.ndim == 5 else 'None'}, got {layer!r}")
  K, P, S, Hk = k_pages.shape[-4:]
  if Hk != H or N % K:
    raise ValueError(f"paged attention: q [B, N, H] = {q.shape} needs N a multiple of the {K} kv heads and "
                     f"H = {Hk}")
  if block_tables.shape[0] != B or lengths.shape != (B,):
    raise ValueError(f"paged attention: block_tables [B, M] and lengths [B] for B = {B}, got "
                     f"{block_tables.shape} and {lengths.shape}")
  quantized = k_pages.dtype == jnp.int8
  if quantized:
    k_scales, v_scales = _scales(k_scales, k_pages, "k_scales"), _scales(v_scales, v_pages, "v_scales")
    qg = q
  else:
    if k_scales is not None or v_scales is not None:
      raise ValueError(f"paged attention: scales go with int8 pages, these are {k_pages.dtype}")
    qg = q.astype(k_pages.dtype)  # as paged.attend: the dot in the cache's dtype, fp32 accumulation.
  qg = qg.reshape(B, K, N // K, H)
  M = block_tables.shape[1]
  ppb = pages_per_block
  tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, -M % ppb)))
  pos = lengths.astype(jnp.int32) - 1
  real = pos >= 0
  hi_page = jnp.where(real, jnp.minimum(pos // S, M - 1), -1)
  lo_page = jnp.zeros_like(pos)
  if sliding_window:
    lo_page = jnp.where(real, jnp.maximum(pos - sliding_window + 1, 0) // S, 0)
  lo_block = jnp.where(real, lo_page // ppb, 0)
  hi_block = jnp.where(real, hi_page // ppb + 1, 0)
  base = jnp.asarray(0 if layer is None else layer, jnp.int32) * K
  flat = lambda x: x.reshape(-1, S, H)
  return Prepared(q=qg, k=flat(k_pages), v=flat(v_pages), k_scales=k_scales, v_scales=v_scales,
                  tables=tables, pos=pos, lo_page=lo_page, hi_page=hi_page, lo_block=lo_block,
                  hi_block=hi_block, base=base, pool=P, scale=float(H ** -0.5 if scale is None else scale),
                  pages_per_block=ppb)
