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
the model's `attention` kernel is used when present; otherwise (the XLA fallback) the row's pages are
gathered into a dense [B, M*S, K, H] view and handed to the dense kernel with a position mask.
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


def gather(k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array, layer=None):
  """Dense view of each row's pages: k, v [B, M*S, K, H] and their positions [B, M*S] (= arange)."""
  kv_heads, _, page_size, head_dim = k_pages.shape[-4:]
  batch, max_blocks = block_tables.shape

  def view(pages):  # → [B, M, K, S, H] → [B, M*S, K, H]
    pages = jnp.moveaxis(pages[:, block_tables], 0, 2) if layer is None else pages[layer, :, block_tables]
    return jnp.swapaxes(pages, 2, 3).reshape(batch, max_blocks * page_size, kv_heads, head_dim)

  kv_positions = jnp.broadcast_to(jnp.arange(max_blocks * page_size), (batch, max_blocks * page_size))
  return view(k_pages), view(v_pages), kv_positions
