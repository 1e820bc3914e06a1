"""`model.layers.paged.attend` (the XLA paged attention) against dense attention over each row's keys."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.layers import paged
from model.layers.positions import alibi_slopes


def _dense_reference(q, k_pages, v_pages, tables, positions, layer, sliding_window, slopes):
  """Row by row: the row's keys in position order from its pages, then `jax.nn.dot_product_attention`."""
  kv_heads, _, page_size, head_dim = k_pages.shape[-4:]
  out = np.zeros(q.shape, np.float32)
  for b in range(q.shape[0]):
    n_keys = tables.shape[1] * page_size
    k = np.asarray(k_pages[layer])[:, tables[b]].reshape(kv_heads, n_keys, head_dim).transpose(1, 0, 2)
    v = np.asarray(v_pages[layer])[:, tables[b]].reshape(kv_heads, n_keys, head_dim).transpose(1, 0, 2)
    qp, kp = positions[b][:, None], np.arange(n_keys)[None, :]
    mask = kp <= qp
    if sliding_window:
      mask &= kp > qp - sliding_window
    bias = None
    if slopes is not None:
      bias = jnp.asarray(-slopes[:, None, None] * np.abs(qp - kp)[None], jnp.float32)[None]
    o = jax.nn.dot_product_attention(q[b:b + 1], k[None], v[None], bias=bias, mask=mask[None, None])
    out[b] = np.where((positions[b] >= 0)[:, None, None], np.asarray(o[0]), 0.0)
  return out


@pytest.mark.parametrize("t, sliding_window, alibi", [(1, 0, False), (1, 40, False), (5, 0, True),
                                                      (37, 0, False), (37, 50, True)])
def test_attend_matches_dense_attention(t, sliding_window, alibi):
  rng = np.random.default_rng(t + sliding_window)
  batch, page_size, max_blocks, kv_heads, n_heads, head_dim, layers = 6, 8, 12, 2, 6, 16, 2  # GQA 3:1.
  n_pages = batch * max_blocks + 1
  k_pages = jnp.asarray(rng.standard_normal((layers, kv_heads, n_pages, page_size, head_dim)), jnp.float32)
  v_pages = jnp.asarray(rng.standard_normal((layers, kv_heads, n_pages, page_size, head_dim)), jnp.float32)
  tables = 1 + rng.permutation(batch * max_blocks).reshape(batch, max_blocks)  # scattered pages.
  # Lengths that are and are not chunk/page multiples, one row at position 0, one padding row (-1).
  starts = np.array([0, 7, 31, 64, 90, -1])
  positions = np.where(starts[:, None] >= 0, starts[:, None] + np.arange(t), -1)
  positions[2, t // 2:] = -1  # a row whose last queries are padding (a short chunk in a wide call).
  q = jnp.asarray(rng.standard_normal((batch, t, n_heads, head_dim)), jnp.float32)
  slopes = alibi_slopes(n_heads) if alibi else None
  got = paged.attend(q, k_pages, v_pages, jnp.asarray(tables, jnp.int32), jnp.asarray(positions, jnp.int32),
                     layer=1, sliding_window=sliding_window, alibi_slopes=slopes, chunk_tokens=16,
                     tile_queries=8)
  want = _dense_reference(q, k_pages, v_pages, tables, positions, 1, sliding_window, slopes)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_attend_without_a_layers_axis_and_default_chunks():
  rng = np.random.default_rng(0)
  k_pages = jnp.asarray(rng.standard_normal((1, 2, 9, 16, 8)), jnp.float32)
  v_pages = jnp.asarray(rng.standard_normal((1, 2, 9, 16, 8)), jnp.float32)
  tables = np.array([[3, 1, 5, 7], [2, 4, 6, 8]])
  positions = np.array([[50], [9]])
  q = jnp.asarray(rng.standard_normal((2, 1, 2, 8)), jnp.float32)
  got = paged.attend(q, k_pages[0], v_pages[0], jnp.asarray(tables, jnp.int32), jnp.asarray(positions, jnp.int32))
  want = _dense_reference(q, k_pages, v_pages, tables, positions, 0, 0, None)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
