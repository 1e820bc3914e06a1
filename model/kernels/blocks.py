"""XLA-side helpers shared by the Pallas attention kernels (`flash_gpu.py`, `flash_tpu.py`, `paged_*.py`).

`MASK` is the finite "-inf" every kernel gives masked logits; `pad` pads an axis to a block multiple;
`block_visibility` + `first_last` say which (query block, key block) pairs can hold a visible pair, from
per-block min/max of positions and segment ids (O(T/bq · S/bk) XLA work outside the kernels), so a kernel
visits only the key blocks a query block may see: ~half of them under a causal mask, only the window's
under a sliding window, only its own document's in a packed row. The test is conservative (a kept pair
may still be all masked); the in-kernel mask is exact.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Finite "-inf" (as JAX's reference kernels use): masked logits get it, so no inf - inf = NaN appears in
# exp(m_prev - m_next); 0.7·max leaves room to subtract a real logit without overflowing.
MASK = -0.7 * float(np.finfo(np.float32).max)
BIG = 2**30  # min/max sentinel of an all-padding block; real positions and segment ids are far below.


def pad(x: jax.Array, axis: int, to: int, value=0) -> jax.Array:
  """`x` padded with `value` along `axis` to length `to` (unchanged when already that long)."""
  if x.shape[axis] == to:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, to - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _block_stats(pos, seg, block: int):
  """Per block of `block` tokens of [B, L] positions/segment ids: min/max position and segment id over
  its real tokens (position ≥ 0), and whether it has any."""
  batch, length = pos.shape
  pos, seg = pos.reshape(batch, length // block, block), seg.reshape(batch, length // block, block)
  real = pos >= 0
  lo = lambda x: jnp.min(jnp.where(real, x, BIG), axis=-1)  # noqa: E731
  hi = lambda x: jnp.max(jnp.where(real, x, -BIG), axis=-1)  # noqa: E731
  return lo(pos), hi(pos), lo(seg), hi(seg), jnp.any(real, axis=-1)


def block_visibility(qp, qs, kp, ks, block_q: int, block_k: int, *, causal: bool, window: int) -> jax.Array:
  """[B, T/bq, S/bk] bool: False where the block min/max prove every (query, key) pair of the two blocks
  masked (padding, other segments, a key after every query when causal, before every window).
  qp, qs [B, T] and kp, ks [B, S] int32, lengths multiples of their blocks; a negative position is padding."""
  qpl, qph, qsl, qsh, qany = (x[:, :, None] for x in _block_stats(qp, qs, block_q))
  kpl, kph, ksl, ksh, kany = (x[:, None, :] for x in _block_stats(kp, ks, block_k))
  vis = qany & kany & (ksl <= qsh) & (qsl <= ksh)  # segment ranges overlap.
  if causal:
    vis &= kpl <= qph  # some key at or before some query.
  if window:
    vis &= kph > qpl - window  # some key inside some query's window.
  return vis


def first_last(vis: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and last True along the last axis → two int32 arrays of the leading shape ((0, -1) where none)."""
  n = vis.shape[-1]
  some = jnp.any(vis, axis=-1)
  first = jnp.where(some, jnp.argmax(vis, axis=-1), 0)
  last = jnp.where(some, n - 1 - jnp.argmax(vis[..., ::-1], axis=-1), -1)
  return first.astype(jnp.int32), last.astype(jnp.int32)
