"""Flash attention for GPUs in Pallas (Triton backend), forward and backward, never materializing T×S.

    from model.kernels.flash_gpu import flash_attention
    out = flash_attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)

q [B, T, N, H], k/v [B, S, K, H] with N % K == 0: a query head n reads kv head n // (N / K) through the
BlockSpec index map, so GQA/MQA never repeats K/V in memory. A key is visible to a query when
`kv_pos <= q_pos` (causal), `kv_pos > q_pos - sliding_window` (window w: the query and the w-1 keys before
it) and the segment ids are equal — the rule of `model/layers/attention.py:make_mask`, so packed documents,
chunked prefill (q_len ≠ kv_len, the last query at the last key) and padding share one code path. A token
with a negative position or segment id is padding: it sees and is seen by nothing, its output row is 0.

Forward (FlashAttention-2, Dao 2023, Alg. 1): one program per (batch, head, query block) streams the key
blocks with an online softmax in fp32 and saves the log-sum-exp. Backward (FA-2 Alg. 2): P is recomputed
per block from the saved log-sum-exp; one kernel per (batch, head, query block) accumulates dQ, another per
(batch, kv head, key block) accumulates dK and dV over the group's query heads (GQA reduction in-kernel).

Block skipping: positions are data, so which key blocks a query block can see is computed outside the
kernel from per-block min/max of positions and segment ids (an O(T/bq · S/bk) XLA op) as a [lo, hi)
range of key blocks per query block (and of query blocks per key block for dK/dV); a causal row of
packed documents then visits ~half the blocks, like FA-2's static causal bound.

Lengths are padded inside to block multiples (padding gets position -1) and head_dim to a power of two
(Triton tiles are powers of two); `interpret=True` runs the same kernels on CPU (tests).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from model.kernels.blocks import BIG, MASK, block_visibility, first_last, pad

LOG2E = math.log2(math.e)  # softmax in base 2: exp(x) = exp2(x·log2 e), exp2 is one SFU instruction.


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static (hashable) kernel settings, the custom_vjp's non-differentiable argument."""
  causal: bool
  window: int
  scale: float
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  num_warps: int
  num_stages: int
  interpret: bool


def _visible(qp, qs, kp, ks, c: _Cfg):
  """[bq, bk] mask of the kernel's rule; padding was folded into the segment ids by `_segments`."""
  m = qs[:, None] == ks[None, :]
  if c.causal:
    m &= kp[None, :] <= qp[:, None]
  if c.window:
    m &= kp[None, :] > qp[:, None] - c.window
  return m


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------- forward

def _fwd_kernel(lo_ref, hi_ref, qp_ref, qs_ref, kp_ref, ks_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                c: _Cfg):
  bq, bk = q_ref.shape[0], c.block_k
  q = q_ref[...]
  qp, qs = qp_ref[...], qs_ref[...]

  def body(j, carry):
    acc, m, l = carry
    sl = pl.ds(j * bk, bk)
    k, v = k_ref[sl, :], v_ref[sl, :]
    s = _dot(q, k.T) * (c.scale * LOG2E)
    s = jnp.where(_visible(qp, qs, kp_ref[sl], ks_ref[sl], c), s, MASK)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)  # rescales what was summed under the old max (FA-2 §3.1.1).
    p = jnp.exp2(s - m_new[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  init = (jnp.zeros(q_ref.shape, jnp.float32), jnp.full((bq,), MASK, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(lo_ref[0], hi_ref[0], body, init)
  # A row that saw no key keeps m = MASK (a real logit is > MASK/2): output 0, and lse = +big so the
  # backward's exp2(s - lse) is 0 there too.
  empty = m < 0.5 * MASK
  l = jnp.where(empty, 1.0, l)
  o_ref[...] = jnp.where(empty[:, None], 0.0, acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -MASK, m + jnp.log2(l))


def _fwd_call(q, k, v, qp, qs, kp, ks, lo, hi, c: _Cfg):
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G, bq = N // K, c.block_q
  row = lambda b, n, i: (b, i)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, c=c),
      grid=(B, N, T // bq),
      in_specs=[
          pl.BlockSpec((None, None, 1), lambda b, n, i: (b, i, 0)),  # lo
          pl.BlockSpec((None, None, 1), lambda b, n, i: (b, i, 0)),  # hi
          pl.BlockSpec((None, bq), row),  # q positions
          pl.BlockSpec((None, bq), row),  # q segments
          pl.BlockSpec((None, S), lambda b, n, i: (b, 0)),  # kv positions
          pl.BlockSpec((None, S), lambda b, n, i: (b, 0)),  # kv segments
          pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
          pl.BlockSpec((None, S, None, H), lambda b, n, i: (b, 0, n // G, 0)),  # GQA: shared kv head.
          pl.BlockSpec((None, S, None, H), lambda b, n, i: (b, 0, n // G, 0)),
      ],
      out_specs=[pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
                 pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages),
      interpret=c.interpret, name="flash_fwd",
  )(lo[..., None], hi[..., None], qp, qs, kp, ks, q, k, v)


# --------------------------------------------------------------------------------------------- backward

def _dq_kernel(lo_ref, hi_ref, qp_ref, qs_ref, kp_ref, ks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, c: _Cfg):
  bk = c.block_k_bwd
  q, do = q_ref[...], do_ref[...]
  qp, qs, lse, delta = qp_ref[...], qs_ref[...], lse_ref[...], delta_ref[...]

  def body(j, dq):
    sl = pl.ds(j * bk, bk)
    k, v = k_ref[sl, :], v_ref[sl, :]
    s = _dot(q, k.T) * (c.scale * LOG2E)
    s = jnp.where(_visible(qp, qs, kp_ref[sl], ks_ref[sl], c), s, MASK)
    p = jnp.exp2(s - lse[:, None])  # P recomputed from the saved log-sum-exp (FA-2 Alg. 2).
    ds = p * (_dot(do, v.T) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(lo_ref[0], hi_ref[0], body, jnp.zeros(q_ref.shape, jnp.float32))
  dq_ref[...] = (dq * c.scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, qp_ref, qs_ref, kp_ref, ks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, c: _Cfg):
  bq, G = c.block_q_bwd, q_ref.shape[1]
  k, v = k_ref[...], v_ref[...]
  kp, ks = kp_ref[...], ks_ref[...]

  def body(i, carry, g):
    dk, dv = carry
    sl = pl.ds(i * bq, bq)
    q, do = q_ref[sl, g, :], do_ref[sl, g, :]
    lse, delta = lse_ref[g, sl], delta_ref[g, sl]
    s = _dot(q, k.T) * (c.scale * LOG2E)
    s = jnp.where(_visible(qp_ref[sl], qs_ref[sl], kp, ks, c), s, MASK)
    p = jnp.exp2(s - lse[:, None])
    dv = dv + _dot(p.astype(do.dtype).T, do)
    ds = p * (_dot(do, v.T) - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype).T, q)
    return dk, dv

  def head(g, carry):  # the G query heads that share this kv head add into one dK, dV (no repeat).
    return lax.fori_loop(lo_ref[0], hi_ref[0], functools.partial(body, g=g), carry)

  zeros = jnp.zeros(k_ref.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, G, head, (zeros, zeros))
  dk_ref[...] = (dk * c.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_calls(q, k, v, qp, qs, kp, ks, o, lse, do, c: _Cfg):
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G, bq, bk = N // K, c.block_q_bwd, c.block_k_bwd
  # delta_i = rowsum(dO ∘ O) = rowsum(P ∘ dP) (FA-2 eq. 4): an elementwise O(T·N·H) op, left to XLA.
  delta = jnp.einsum("btnh,btnh->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
  params = pltriton.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages)
  lo, hi, qlo, qhi = _block_ranges(qp, qs, kp, ks, bq, bk, c)
  row = lambda b, n, i: (b, i)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, c=c),
      grid=(B, N, T // bq),
      in_specs=[
          pl.BlockSpec((None, None, 1), lambda b, n, i: (b, i, 0)),
          pl.BlockSpec((None, None, 1), lambda b, n, i: (b, i, 0)),
          pl.BlockSpec((None, bq), row),
          pl.BlockSpec((None, bq), row),
          pl.BlockSpec((None, S), lambda b, n, i: (b, 0)),
          pl.BlockSpec((None, S), lambda b, n, i: (b, 0)),
          pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
          pl.BlockSpec((None, S, None, H), lambda b, n, i: (b, 0, n // G, 0)),
          pl.BlockSpec((None, S, None, H), lambda b, n, i: (b, 0, n // G, 0)),
          pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),  # dO
          pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),  # lse
          pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),  # delta
      ],
      out_specs=pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=c.interpret, name="flash_bwd_dq",
  )(lo[..., None], hi[..., None], qp, qs, kp, ks, q, k, v, do, lse, delta)

  # dK/dV: query heads grouped by kv head, [B, T, K, G, H] and [B, K, G, T] (free reshapes).
  qg, dog = q.reshape(B, T, K, G, H), do.reshape(B, T, K, G, H)
  lseg, deltag = lse.reshape(B, K, G, T), delta.reshape(B, K, G, T)
  col = lambda b, h, j: (b, j)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, c=c),
      grid=(B, K, S // bk),
      in_specs=[
          pl.BlockSpec((None, None, 1), lambda b, h, j: (b, j, 0)),
          pl.BlockSpec((None, None, 1), lambda b, h, j: (b, j, 0)),
          pl.BlockSpec((None, T), lambda b, h, j: (b, 0)),
          pl.BlockSpec((None, T), lambda b, h, j: (b, 0)),
          pl.BlockSpec((None, bk), col),
          pl.BlockSpec((None, bk), col),
          pl.BlockSpec((None, T, None, G, H), lambda b, h, j: (b, 0, h, 0, 0)),
          pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0)),
          pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0)),
          pl.BlockSpec((None, T, None, G, H), lambda b, h, j: (b, 0, h, 0, 0)),
          pl.BlockSpec((None, None, G, T), lambda b, h, j: (b, h, 0, 0)),
          pl.BlockSpec((None, None, G, T), lambda b, h, j: (b, h, 0, 0)),
      ],
      out_specs=[pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0)),
                 pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0))],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=c.interpret, name="flash_bwd_dkv",
  )(qlo[..., None], qhi[..., None], qp, qs, kp, ks, qg, k, v, dog, lseg, deltag)
  return dq, dk, dv


# ------------------------------------------------------------------------------------ block skipping

def _block_ranges(qp, qs, kp, ks, bq, bk, c: _Cfg):
  """Key-block range [lo, hi) per query block and query-block range per key block: a block pair is
  visited unless the rule excludes it for every pair of tokens (conservative: the in-kernel mask is exact)."""
  vis = block_visibility(qp, qs, kp, ks, bq, bk, causal=c.causal, window=c.window)
  lo, last = first_last(vis)
  qlo, qlast = first_last(jnp.swapaxes(vis, 1, 2))
  return lo, last + 1, qlo, qlast + 1


# ------------------------------------------------------------------------------------------ custom vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, qp, qs, kp, ks, c: _Cfg):
  return _flash_fwd(q, k, v, qp, qs, kp, ks, c)[0]


def _flash_fwd(q, k, v, qp, qs, kp, ks, c: _Cfg):
  lo, hi, _, _ = _block_ranges(qp, qs, kp, ks, c.block_q, c.block_k, c)
  o, lse = _fwd_call(q, k, v, qp, qs, kp, ks, lo, hi, c)
  return o, (q, k, v, qp, qs, kp, ks, o, lse)


def _flash_bwd(c: _Cfg, res, do):
  q, k, v, qp, qs, kp, ks, o, lse = res
  dq, dk, dv = _bwd_calls(q, k, v, qp, qs, kp, ks, o, lse, do, c)
  return dq, dk, dv, None, None, None, None  # integer inputs: no cotangent.


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------ public API

def _segments(pos, seg):
  """Segment ids with padding folded in: a padding query gets -1 - 2^30, a padding key -2 - 2^30, so no
  padding token matches anything (not even other padding) and the kernel tests one equality."""
  seg = jnp.zeros_like(pos) if seg is None else seg.astype(jnp.int32)
  return seg, (pos < 0) | (seg < 0)


def _pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


@functools.partial(jax.jit, static_argnames=(
    "sliding_window", "causal", "scale", "block_q", "block_k", "block_q_bwd", "block_k_bwd", "num_warps",
    "num_stages", "interpret"))
def flash_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                    sliding_window: int = 0, causal: bool = True, scale: float | None = None,
                    block_q: int = 128, block_k: int = 64, block_q_bwd: int = 64, block_k_bwd: int = 64,
                    num_warps: int | None = None, num_stages: int = 2, interpret: bool = False):
  """Attention over q [B, T, N, H], k/v [B, S, K, H] → [B, T, N, H] in q.dtype (fp32 accumulation).

  Blocks: forward tiles are block_q × block_k, backward block_q_bwd × block_k_bwd (powers of two ≥ 16;
  clipped to the padded lengths, halved for head_dim 256 to fit shared memory). Defaults are the
  FA-2 Triton tutorial's H100 tiles (128×64 forward, 64×64 backward); `num_warps` defaults to 4 for
  head_dim ≤ 64, else 8.
  """
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  if k.shape != (B, S, K, H) or v.shape != k.shape:
    raise ValueError(f"flash_attention: k/v must be [B, S, K, H] matching q {q.shape}, got {k.shape}, {v.shape}")
  if N % K:
    raise ValueError(f"flash_attention: query heads {N} must be a multiple of kv heads {K}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("flash_attention: give both q_segment_ids and kv_segment_ids, or neither")
  for b in (block_q, block_k, block_q_bwd, block_k_bwd):
    if b < 16 or b & (b - 1):
      raise ValueError(f"flash_attention: block sizes must be powers of two >= 16, got {b}")
  scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
  Hp = max(16, _pow2(H))  # Triton tiles are powers of two; zero columns change neither q·k nor P·V.
  shrink = 2 if Hp >= 256 else 1  # 256-wide tiles: halve the blocks to stay within ~228 KiB of SMEM.
  tq, tk = max(16, _pow2(T)), max(16, _pow2(S))  # short inputs: one block, not a mostly-padding one.
  bq, bqb = (max(16, min(b // shrink, tq)) for b in (block_q, block_q_bwd))
  bk, bkb = (max(16, min(b // shrink, tk)) for b in (block_k, block_k_bwd))
  Tp, Sp = -(-T // max(bq, bqb)) * max(bq, bqb), -(-S // max(bk, bkb)) * max(bk, bkb)
  c = _Cfg(causal=causal, window=int(sliding_window), scale=scale, block_q=bq, block_k=bk,
           block_q_bwd=bqb, block_k_bwd=bkb,
           num_warps=num_warps or (4 if Hp <= 64 else 8), num_stages=num_stages, interpret=interpret)

  qs, q_pad = _segments(q_positions, q_segment_ids)
  ks, k_pad = _segments(kv_positions, kv_segment_ids)
  qs = jnp.where(q_pad, -1 - BIG, qs)
  ks = jnp.where(k_pad, -2 - BIG, ks)
  qp, kp = q_positions.astype(jnp.int32), kv_positions.astype(jnp.int32)
  qp, kp = jnp.where(q_pad, -1, qp), jnp.where(k_pad, -1, kp)  # the block ranges skip position < 0.
  qp, qs = pad(qp, 1, Tp, -1), pad(qs, 1, Tp, -1 - BIG)
  kp, ks = pad(kp, 1, Sp, -1), pad(ks, 1, Sp, -2 - BIG)
  qx = pad(pad(q, 1, Tp), 3, Hp)
  kx, vx = (pad(pad(x, 1, Sp), 3, Hp) for x in (k, v))
  out = _flash(qx, kx, vx, qp, qs, kp, ks, c)
  return out[:, :T, :, :H]
