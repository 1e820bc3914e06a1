"""Paged decode attention for GPUs in Pallas (Triton backend): one query token per row against its pages.

    from model.kernels.paged_gpu import paged_attention
    out = paged_attention(q, k_pages, v_pages, block_tables, lengths)  # q [B, N, H] → [B, N, H]

Layout (`model/layers/paged.py`): k/v pages [(L,) K, P, S, H] (K kv heads, P pages of S tokens; with
scan_layers a leading layers axis and `layer` picks one), block_tables [B, M] int32: key position p of
row b lives in page `block_tables[b, p // S]`, slot `p % S`. `lengths` [B] int32: the row's keys are
positions 0 .. lengths-1 and its query sits at lengths-1 (0: a padding row, output 0). With
`sliding_window` w the query sees positions > lengths-1-w only. Optional int8 pages with fp32 scales
`k_scales`/`v_scales` of shape [(L,) K, P, S] (one per token) or [(L,) K, P] (one per page).

One program per (row, kv head) (as JAX's `ops/gpu/paged_attention.py`, without its k-splits): the G = N/K
query heads of the kv head form the [G, H] left operand (padded to 16 rows, Triton's smallest dot tile),
so each page is read once for the whole group (GQA without repeating K/V). The program walks its row's
block table `pages_per_block` pages at a time, from the first block its window can see to the block of
its last key (a row costs its own length, not the batch's longest), gathers those pages by pointer
(page ids index the pool directly: nothing is copied out of it), and keeps an fp32 online softmax
(Milakov & Gimelshein 2018). Logits are q·k in fp32 scaled by 1/sqrt(H) after the dot, as
`paged.attend` and `jax.nn.dot_product_attention` do. The pool is passed flattened to [L·K·P, S, H]
(a free reshape) and a program adds (layer·K + head)·P to the page ids, so the layers axis costs
nothing either.

Decode only (one query per row): prefill chunks go to `paged.attend` (`model/kernels/__init__.py`).
Triton tiles are powers of two: H and S·pages_per_block must be. `interpret=True` runs on CPU (tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from model.kernels.paged_common import MASK, prepare

_MIN_ROWS = 16  # tl.dot needs M >= 16.


def _kernel(meta_ref, tables_ref, q_ref, k_ref, v_ref, *rest, scale: float, pages_per_block: int,
            window: int, quantized: bool):
  if quantized:
    ks_ref, vs_ref, o_ref = rest
  else:
    (o_ref,) = rest
  h = pl.program_id(1)
  pos, lo, hi, base = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
  page_size, head_dim = k_ref.shape[1], k_ref.shape[2]
  pool = meta_ref[4]  # pages per (layer, kv head): the stride between heads of the flattened pool.
  first_page = (base + h) * pool
  bk = pages_per_block * page_size
  q = q_ref[...]  # [Gp, H]

  def body(j, carry):
    acc, m, l = carry
    pages = first_page + tables_ref[pl.ds(j * pages_per_block, pages_per_block)]
    k = k_ref[pages].reshape(bk, head_dim)
    v = v_ref[pages].reshape(bk, head_dim)
    if quantized:  # int8 → q's dtype for the dot; the per-token scale multiplies the logit's column.
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale  # [Gp, bk]
    if quantized:
      s = s * ks_ref[pages].reshape(1, bk)
    kv_pos = j * bk + jnp.arange(bk)
    visible = kv_pos <= pos
    if window:
      visible &= kv_pos > pos - window
    s = jnp.where(visible[None, :], s, MASK)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(visible[None, :], jnp.exp(s - m_new[:, None]), 0.0)
    l = alpha * l + p.sum(axis=1)
    if quantized:
      p = p * vs_ref[pages].reshape(1, bk)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return alpha[:, None] * acc + pv, m_new, l

  rows = q.shape[0]
  init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, _, l = lax.fori_loop(lo, hi, body, init)
  seen = l > 0.0  # a padding row (no block visited) outputs 0.
  o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, layer=None, sliding_window: int = 0,
                    k_scales=None, v_scales=None, scale: float | None = None, pages_per_block: int = 8,
                    num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  """Decode attention of q [B, N, H] over each row's pages → [B, N, H] in q.dtype (see module doc)."""
  # A power of two pages per block (Triton tiles), at most the table's width rounded up: a table shorter
  # than the block is padded with the null page, masked by position.
  M = block_tables.shape[1]
  ppb = min(1 << (max(pages_per_block, 1).bit_length() - 1), 1 << (M - 1).bit_length())
  p = prepare(q, k_pages, v_pages, block_tables, lengths, layer=layer, sliding_window=sliding_window,
              k_scales=k_scales, v_scales=v_scales, scale=scale, pages_per_block=ppb)
  B, K, G, H = p.q.shape
  S = p.k.shape[1]
  if H & (H - 1) or S & (S - 1):
    raise ValueError(f"paged_gpu: Triton tiles are powers of two: head_dim {H} and page_size {S} must be "
                     "(serve with a power-of-two block_size, or model.attention=xla)")
  rows = max(_MIN_ROWS, 1 << (G - 1).bit_length())
  qg = jnp.pad(p.q, ((0, 0), (0, 0), (0, rows - G), (0, 0)))
  meta = jnp.stack([p.pos, p.lo_block, p.hi_block, jnp.broadcast_to(p.base, p.pos.shape),
                    jnp.full_like(p.pos, p.pool)], axis=1)
  meta = jnp.pad(meta, ((0, 0), (0, 3)))  # [B, 8]: a power-of-two block.
  M = p.tables.shape[1]
  whole = lambda x: pl.BlockSpec(x.shape, lambda b, h: (0,) * x.ndim)
  in_specs = [pl.BlockSpec((None, 8), lambda b, h: (b, 0)), pl.BlockSpec((None, M), lambda b, h: (b, 0)),
              pl.BlockSpec((None, None, rows, H), lambda b, h: (b, h, 0, 0)), whole(p.k), whole(p.v)]
  args = [meta, p.tables, qg, p.k, p.v]
  if p.quantized:
    in_specs += [whole(p.k_scales), whole(p.v_scales)]
    args += [p.k_scales, p.v_scales]
  out = pl.pallas_call(
      functools.partial(_kernel, scale=p.scale, pages_per_block=p.pages_per_block, window=sliding_window,
                        quantized=p.quantized),
      grid=(B, K),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, rows, H), lambda b, h: (b, h, 0, 0)),
      out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="paged_decode_gpu",
  )(*args)
  return out[:, :, :G].reshape(q.shape)
