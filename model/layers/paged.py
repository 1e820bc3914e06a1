"""Paged KV cache: write new keys/values into fixed-size pages, read a row's pages back.

Used by `Attention` when its cache is paged (`Transformer.init_paged_cache`, driven by `serve/engine.py`):

    cache = dict(k_pages=[K, P, S, H], v_pages=[K, P, S, H], block_tables=[B, M] int32)

K kv heads, P pages of S tokens, head_dim H, and per batch row a table of M page ids: position p of row b
lives in page `block_tables[b, p // S]` at slot `p % S`. This is the layout of JAX's Pallas TPU
paged-attention kernel (`jax.experimental.pallas.ops.tpu.paged_attention`: k_pages
[num_kv_heads, total_num_pages, page_size, head_dim], page_indices [batch, pages_per_sequence]), so the
kernel of issue 3 can read these pages as they are. With `scan_layers` the pages carry a leading layers axis.

Page 0 is the null page: never handed to a sequence, the target of every padding token (position < 0)
and of every unused block-table entry. Its contents are garbage that the position mask always hides:
a table entry past a row's last block covers positions beyond every query of that row.

With scan_layers the transformer hands each layer the whole stacked cache plus its `layer` index (the
pages ride in the scan carry), and reads and writes index that layer inside one gather/scatter: as scan
inputs and outputs the pages would be sliced and restacked, copying the whole cache at every step
(write + read of one token for 8 rows, 4 layers, 4k pages of 16 tokens, fp32 (268 MB), 2-core CPU:
940 ms as scan inputs/outputs, 2 ms in the carry).

Reading: a fused paged-attention kernel registered with `register_paged_attention` under the name of
the model's `attention` kernel is used when present; otherwise `attend`, the XLA fallback, scores the
queries against the pages a chunk at a time with an online softmax (Milakov & Gimelshein 2018), over
only the chunks each row can see. The first fallback gathered every row's pages into a dense
[B, M*S, K, H] view for the dense kernel: 32 rows × 384-token tables, 4 layers, fp32 was a 100 MB copy
per decode step, and the step of runs/tiny took 44 ms against 14 ms chunked (the gathered slab of a
chunk stays in cache; 2-core CPU under load). `pallas` (and `auto`, on GPU/TPU) register below the Pallas
decode kernels of `model/kernels/` (`paged_gpu.py`, `paged_tpu.py`; imported lazily when first called).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

NULL_PAGE = 0

# fn(q [B, T, N, H], k_pages, v_pages, block_tables [B, M], positions [B, T], *, layer, sliding_window)
#   -> [B, T, N, H]; layer: None, or the index into the pages' leading layers axis.
PagedAttentionFn = Callable[..., jax.Array]
PAGED_ATTENTION: dict[str, PagedAttentionFn] = {}


def register_paged_attention(name: str):
  """Registers a fused paged-attention kernel under the name of its dense kernel (`model.attention`)."""
  def deco(fn: PagedAttentionFn) -> PagedAttentionFn:
    PAGED_ATTENTION[name] = fn
    return fn
  return deco


@register_paged_attention("pallas")
def _pallas(q, k_pages, v_pages, block_tables, positions, *, layer=None, sliding_window: int = 0):
  # Imported lazily: model.kernels pulls in the backend's Pallas lowering, needed only when picked.
  from model.kernels import paged_attention
  return paged_attention(q, k_pages, v_pages, block_tables, positions, layer=layer,
                         sliding_window=sliding_window)


@register_paged_attention("auto")
def _auto(q, k_pages, v_pages, block_tables, positions, *, layer=None, sliding_window: int = 0):
  # As attention=auto: the Pallas kernel on GPU/TPU where it takes the shapes, else `attend` (CPU).
  from model.kernels import paged_attention_auto
  return paged_attention_auto(q, k_pages, v_pages, block_tables, positions, layer=layer,
                              sliding_window=sliding_window)


def write(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
          block_tables: jax.Array, layer=None) -> tuple[jax.Array, jax.Array]:
  """Scatters k/v [B, T, K, H] to (block_tables[b, pos // S], pos % S); positions < 0 go to the null page.
  `layer`: index into a leading layers axis of the pages (None: the pages are one layer's)."""
  page_size, max_blocks = k_pages.shape[-2], block_tables.shape[1]
  block = positions // page_size
  valid = (positions >= 0) & (block < max_blocks)
  rows = jnp.arange(positions.shape[0])[:, None]
  page = jnp.where(valid, block_tables[rows, jnp.where(valid, block, 0)], NULL_PAGE)
  slot = positions % page_size
  if layer is None:  # [K, P, S, H].at[:, page [B, T], slot [B, T]] indexes as [K, B, T, H].
    k_pages = k_pages.at[:, page, slot].set(jnp.moveaxis(k, 2, 0).astype(k_pages.dtype))
    v_pages = v_pages.at[:, page, slot].set(jnp.moveaxis(v, 2, 0).astype(v_pages.dtype))
  else:  # [L, K, P, S, H].at[layer, :, page, slot]: index arrays split by a slice go first: [B, T, K, H].
    k_pages = k_pages.at[layer, :, page, slot].set(k.astype(k_pages.dtype))
    v_pages = v_pages.at[layer, :, page, slot].set(v.astype(v_pages.dtype))
  return k_pages, v_pages


def _chunk_pages(pages, tables, layer):
  """Pages [(L,) K, P, S, H] of block-table columns `tables` [B, c] → [K, B, c*S, H] (no transpose)."""
  kv_heads, _, page_size, head_dim = pages.shape[-4:]
  if layer is None:
    out = pages[:, tables]
  else:  # all-advanced indices, adjacent: the result keeps the [K, B, c] order.
    out = pages[layer, jnp.arange(kv_heads)[:, None, None], tables[None]]
  return out.reshape(kv_heads, tables.shape[0], tables.shape[1] * page_size, head_dim)


def attend(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                 positions: jax.Array, *, layer=None, sliding_window: int = 0, alibi_slopes=None,
                 chunk_tokens: int = 64, tile_queries: int = 32) -> jax.Array:
  """Causal attention of q [B, T, N, H] at `positions` [B, T] over each row's pages → [B, T, N, H].

  Scores in fp32, scaled by 1/sqrt(H) after the dot and softmax in fp32, as `jax.nn.dot_product_attention`
  does; GQA without repeating K/V (N = K·G). Key position p of row b is valid when p ≤ the query's
  position (and inside `sliding_window`); padding queries (position -1) see nothing and return zeros.
  `alibi_slopes` [N]: adds -slope·|q_pos - k_pos|.

  Work list (split-K, as flash-decoding and vLLM's paged attention v2): the (row, chunk of
  `chunk_tokens` keys) pairs that hold a key some query of the row can see, row-major, processed
  `tile_queries // T` pairs per loop iteration; each pair's partial softmax (max, sum, weighted values)
  is merged into its row's by scatter-max/add. So a row costs its own length, not the batch's longest
  (32 decode rows of 32–384 tokens: 8.5 ms against 12.3 ms looping over the longest row's chunks), and
  a sliding window skips the chunks before it.
  """
  batch, t, n_heads, head_dim = q.shape
  kv_heads, page_size = k_pages.shape[-4], k_pages.shape[-2]
  groups = n_heads // kv_heads
  per_chunk = max(1, min(chunk_tokens // page_size, block_tables.shape[1]))
  n_chunks = -(-block_tables.shape[1] // per_chunk)
  tables = jnp.pad(block_tables, ((0, 0), (0, n_chunks * per_chunk - block_tables.shape[1])))
  width = per_chunk * page_size
  tile = max(1, tile_queries // t)
  last = positions.max(axis=1)  # [B]; -1: a padding row.
  first = jnp.zeros_like(last)
  if sliding_window:  # chunks wholly before every query's window are skipped.
    first = jnp.clip(positions.min(axis=1) - sliding_window + 1, 0) // width
  live = jnp.where(last >= 0, jnp.clip(last // width + 1, 0, n_chunks) - first, 0)  # chunks per row.
  ends = jnp.cumsum(live)
  total = ends[-1]  # live pairs; slot j of the work list is row row_of[j], chunk chunk_of[j].
  slot = jnp.arange(batch * n_chunks + tile)
  row_of = jnp.clip(jnp.searchsorted(ends, slot, side="right"), 0, batch - 1)
  chunk_of = first[row_of] + slot - (ends - live)[row_of]
  qg = jnp.einsum("btkgh->kbgth", q.reshape(batch, t, kv_heads, groups, head_dim)).astype(k_pages.dtype)
  scale = jnp.float32(head_dim ** -0.5)
  neg = jnp.float32(-1e30)  # finite: an all-masked pair must not make exp(-inf - -inf) = NaN.
  slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32).reshape(kv_heads, 1, groups, 1, 1)

  def body(i, carry):
    m, l, acc = carry  # [K, B+1, G, T(, H)]: row B takes the writes of the tile's unused slots.
    idx = i * tile + jnp.arange(tile)
    valid = idx < total
    r, c = row_of[idx], chunk_of[idx]
    cols = tables[r[:, None], c[:, None] * per_chunk + jnp.arange(per_chunk)]  # [tile, per_chunk]
    k, v = _chunk_pages(k_pages, cols, layer), _chunk_pages(v_pages, cols, layer)  # [K, tile, W, H]
    s = jnp.einsum("kpgth,kpwh->kpgtw", qg[:, r], k, preferred_element_type=jnp.float32) * scale
    kv_pos = c[:, None] * width + jnp.arange(width)  # [tile, W]
    qp = positions[r]  # [tile, T]
    mask = (kv_pos[:, None, :] <= qp[:, :, None]) & valid[:, None, None]
    if sliding_window:
      mask &= kv_pos[:, None, :] > qp[:, :, None] - sliding_window
    if slopes is not None:
      s = s - slopes * jnp.abs(qp[:, :, None] - kv_pos[:, None, :]).astype(jnp.float32)[None, :, None]
    mask = mask[None, :, None]
    s = jnp.where(mask, s, neg)
    m_p = s.max(-1)  # [K, tile, G, T]
    p = jnp.where(mask, jnp.exp(s - m_p[..., None]), 0.0)
    pv = jnp.einsum("kpgtw,kpwh->kpgth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    dst = jnp.where(valid, r, batch)
    m_new = m.at[:, dst].max(m_p)
    w = jnp.exp(m_p - m_new[:, dst])
    rescale = jnp.exp(m - m_new)
    l = (l * rescale).at[:, dst].add(p.sum(-1) * w)
    acc = (acc * rescale[..., None]).at[:, dst].add(pv * w[..., None])
    return m_new, l, acc

  shape = (kv_heads, batch + 1, groups, t)
  init = (jnp.full(shape, neg), jnp.zeros(shape, jnp.float32), jnp.zeros(shape + (head_dim,), jnp.float32))
  _, l, acc = jax.lax.fori_loop(0, -(-total // tile), body, init)
  out = acc[:, :batch] / jnp.where(l[:, :batch] > 0, l[:, :batch], 1.0)[..., None]
  return jnp.einsum("kbgth->btkgh", out).reshape(batch, t, n_heads, head_dim).astype(q.dtype)
