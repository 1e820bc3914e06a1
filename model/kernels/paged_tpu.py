"""Paged decode attention for TPUs in Pallas (Mosaic TPU): one query token per row against its pages.

    from model.kernels.paged_tpu import paged_attention
    out = paged_attention(q, k_pages, v_pages, block_tables, lengths)  # q [B, N, H] → [B, N, H]

Same arguments as `paged_gpu.paged_attention` (the layout of `model/layers/paged.py`: pages
[(L,) K, P, S, H], block tables [B, M], lengths [B], optional `layer`, `sliding_window`, int8 pages with
per-token or per-page scales).

Grid (B, K, M): one program per (row, kv head) holds the [G, H] queries of the kv head's group (GQA: each
page is read once for all G heads) and an fp32 online softmax in VMEM scratch (m, l, acc); the last grid
axis walks the row's pages, sequential ("arbitrary"). The block tables, the per-row page ranges and the
layer offset are scalar-prefetch operands (SMEM), and the K/V BlockSpec index maps read them, so Pallas'
pipeline DMAs exactly the row's next page (one [S, H] block of the flattened [L·K·P, S, H] pool) while the
current one is scored: the page pool stays in HBM, never gathered or copied (as JAX's
`ops/tpu/paged_attention`, which copies pages by hand; here the BlockSpec pipeline does it). Step j visits
page lo + j of the row (lo: the first page its sliding window reaches) and does nothing past the row's
last page; the index map holds the page index there, so the skipped steps name the block already in VMEM
and issue no DMA: a row costs its own length, not the batch's longest.

A page is one block, so S and H are taken whole (Mosaic's (8, 128) tiling is satisfied by full dims);
per-token scales ride as [.., 1, S] lane-major rows that multiply the [G, S] logits (K) and
probabilities (V) directly. Run on CPU inside `pltpu.force_tpu_interpret_mode()` (tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from model.kernels.paged_common import MASK, prepare

_LANES = 128  # m and l scratch are lane-broadcast [G, 128], as flash_tpu's.
_NT = (((1,), (1,)), ((), ()))  # A·Bᵀ without a transpose.


def _page(b, j, tables_ref, lo_ref, hi_ref, n_tables: int):
  """Table column visited at step j: lo + j, held at the last live page past the row's end."""
  col = lo_ref[b] + jnp.minimum(j, jnp.maximum(hi_ref[b] - lo_ref[b], 0))
  return tables_ref[b * n_tables + col]


def _kernel(tables_ref, pos_ref, lo_ref, hi_ref, base_ref, q_ref, k_ref, v_ref, *rest, scale: float,
            window: int, quantized: bool):
  if quantized:
    ks_ref, vs_ref, o_ref, m_sc, l_sc, acc_sc = rest
  else:
    o_ref, m_sc, l_sc, acc_sc = rest
  del tables_ref, base_ref
  b, j = pl.program_id(0), pl.program_id(2)
  pos, lo, hi = pos_ref[b], lo_ref[b], hi_ref[b]
  page_size = k_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(lo + j <= hi)
  def _step():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    if quantized:
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale  # [G, S]
    if quantized:
      s = s * ks_ref[...]  # [1, S]
    kv_pos = (lo + j) * page_size + jax.lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
    visible = kv_pos <= pos
    if window:
      visible &= kv_pos > pos - window
    s = jnp.where(visible, s, MASK)
    m_prev, l_prev = m_sc[:, :1], l_sc[:, :1]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_next), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_sc[...] = jnp.broadcast_to(alpha * l_prev + jnp.sum(p, axis=1, keepdims=True), l_sc.shape)
    m_sc[...] = jnp.broadcast_to(m_next, m_sc.shape)
    if quantized:
      p = p * vs_ref[...]
    acc_sc[...] = acc_sc[...] * alpha + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    l = l_sc[:, :1]
    seen = l > 0.0  # a padding row (hi < lo) visited nothing: output 0.
    o_ref[...] = jnp.where(seen, acc_sc[...] / jnp.where(seen, l, 1.0), 0.0).astype(o_ref.dtype)


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, layer=None, sliding_window: int = 0,
                    k_scales=None, v_scales=None, scale: float | None = None, interpret: bool = False):
  """Decode attention of q [B, N, H] over each row's pages → [B, N, H] in q.dtype (see module doc)."""
  p = prepare(q, k_pages, v_pages, block_tables, lengths, layer=layer, sliding_window=sliding_window,
              k_scales=k_scales, v_scales=v_scales, scale=scale, pages_per_block=1)
  B, K, G, H = p.q.shape
  S = p.k.shape[1]
  M = p.tables.shape[1]
  sq = pl.squeezed

  def page_map(b, h, j, tables_ref, pos_ref, lo_ref, hi_ref, base_ref):
    return (base_ref[0] + h) * p.pool + _page(b, j, tables_ref, lo_ref, hi_ref, M), 0, 0

  q_map = lambda b, h, j, *refs: (b, h, 0, 0)
  in_specs = [pl.BlockSpec((sq, sq, G, H), q_map), pl.BlockSpec((sq, S, H), page_map),
              pl.BlockSpec((sq, S, H), page_map)]
  args = [p.q, p.k, p.v]
  if p.quantized:
    in_specs += [pl.BlockSpec((sq, 1, S), page_map)] * 2
    args += [p.k_scales[:, None], p.v_scales[:, None]]  # [L·K·P, 1, S]: lane-major rows.
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5, grid=(B, K, M), in_specs=in_specs,
      out_specs=pl.BlockSpec((sq, sq, G, H), q_map),
      scratch_shapes=[pltpu.VMEM((G, _LANES), jnp.float32), pltpu.VMEM((G, _LANES), jnp.float32),
                      pltpu.VMEM((G, H), jnp.float32)])
  kv_bytes = 2 * B * K * M * S * H * p.k.dtype.itemsize
  cost = pl.CostEstimate(flops=4 * B * K * G * M * S * H, transcendentals=B * K * G * M * S,
                         bytes_accessed=kv_bytes + 2 * p.q.nbytes)
  out = pl.pallas_call(
      functools.partial(_kernel, scale=p.scale, window=sliding_window, quantized=p.quantized),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct(p.q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost, interpret=pltpu.InterpretParams() if interpret else False, name="paged_decode_tpu",
  )(p.tables.reshape(-1), p.pos, p.lo_page, p.hi_page, p.base.reshape(1), *args)
  return out.reshape(q.shape)
