"""Flash attention for TPUs in Pallas (Mosaic TPU), forward and backward, never materializing T×S.

    from model.kernels.flash_tpu import flash_attention
    out = flash_attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)

q [B, T, N, H], k/v [B, S, K, H] with N % K == 0; positions int32 [B, T] / [B, S]; out [B, T, N, H] in
q.dtype. A key is visible to a query when `kv_pos <= q_pos` (causal), `kv_pos > q_pos - sliding_window`
(window w: the query and the w-1 keys before it) and the segment ids are equal: the rule of
`model/layers/attention.py:make_mask`, so packed documents, chunked prefill (q_len ≠ kv_len, the last query
at the last key) and padding share one code path. A token with a negative position or segment id is
padding: it sees and is seen by nothing, its output row and its gradients are 0.

Layout. Mosaic tiles the last two dims of every block by (8, 128) (or takes them whole), so the kernels
work head-major: q [B, N, T, H], k/v [B, K, S, H] (one XLA transpose each way), blocks (bq, H) and (bk, H)
with H whole (64/128/256 all fit). Per-token vectors (positions, segment ids, log-sum-exp, dO·O) are
stored lane-major [B, (N,) 1, T] with (1, b) blocks (b a multiple of 128, or the whole padded length) and
turned into a column inside the kernel where a row-wise operand is needed, as JAX's splash attention
does: 4 bytes per token, where the (T, 128) lane-broadcast layout of `ops/tpu/flash_attention.py` costs
512. Lengths are padded inside to block multiples with position -1.

GQA/MQA: query head n reads kv head n // (N / K) through the BlockSpec index map, so K/V are never
repeated in memory; the dK/dV kernel runs one program per (batch, kv head, key block) and walks the
G = N / K query heads of the group inside its sequential grid axis, summing their contributions in VMEM.

Forward (FlashAttention-2, Dao 2023, Alg. 1): grid (B, N, query blocks, key blocks), the key axis
sequential ("arbitrary"); an online softmax in fp32 scratch (m, l, acc); the output and the log-sum-exp
are written at the last key step. Backward (FA-2 Alg. 2), from the saved log-sum-exp (P is recomputed,
never stored): a dQ kernel on the forward's grid, and a dK/dV kernel on grid (B, K, key blocks,
G · query blocks) that works in the transposed orientation (Sᵀ = K·Qᵀ, [bk, bq]), so the log-sum-exp and
dO·O enter as rows and no in-kernel transpose is needed.

Block skipping. Positions are data, so which blocks can be visible is computed outside the kernels: per
block min/max of positions and segment ids (O(T) XLA reductions), a [nq, nk] block-visibility table per
batch row (O(T·S / (bq·bk)) booleans: 64×64 at 8k with 128-blocks, never T×S), reduced to the first and
last visible key block of every query block (and the first and last query block of every key block for
dK/dV). Those ranges travel as scalar-prefetch operands (SMEM); a grid step j visits key block lo + j
and does nothing once lo + j > hi. The index map clamps the block index to hi there, so a skipped step
re-names the block already in VMEM and Pallas issues no DMA. Under a causal mask a query block then
visits the blocks up to its diagonal (about half the work at T = S), under a window w only the
~w / bk + 1 blocks of the window, and with packed documents only its own document's blocks (when block
edges fall inside a range, the in-block mask does the rest).

Run on CPU with `interpret=True` or inside `jax.experimental.pallas.tpu.force_tpu_interpret_mode()`
(tests/test_kernels_tpu.py, which also lowers and AOT-compiles the kernels for a TPU through libtpu).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from model.kernels.blocks import BIG, MASK, block_visibility, first_last, pad

_LANES = 128  # TPU vreg lanes: a (1, b) block of a lane-major vector needs b % 128 == 0 or b whole.
_NT = (((1,), (1,)), ((), ()))  # dot_general contracting both operands' last dim: A·Bᵀ.


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static (hashable) settings: the custom_vjp's non-differentiable argument."""
  causal: bool
  window: int
  scale: float
  block_q: int
  block_k: int
  groups: int  # G = N / K query heads per kv head.
  interpret: bool


def _visible(qp, qs, kp, ks, c: _Cfg):
  """The kernel's mask, broadcast from a query operand and a key operand (rows/columns either way);
  padding was folded into the segment ids by `_fold_padding`."""
  m = qs == ks
  if c.causal:
    m &= kp <= qp
  if c.window:
    m &= kp > qp - c.window
  return m


def _col(ref):
  """A (1, b) lane-major block → a (b, 1) column (Mosaic relayout, as splash attention's dQ kernel)."""
  return jnp.expand_dims(ref[0], -1)


def _interpret(c: _Cfg):
  return pltpu.InterpretParams() if c.interpret else False


# Grid indices are non-negative, so lax.div / lax.rem (C semantics) are floor division and modulo; jnp's
# `//` and `%` add a sign correction whose Mosaic lowering needs the TPU generation (absent on CPU).


def _clamped(lo, hi, j):
  """Block index visited at grid step j of the range [lo, hi]: lo + j, held at hi past the end (same
  block index as the step before: Pallas skips the copy)."""
  return lo + jnp.minimum(j, jnp.maximum(hi - lo, 0))


# ---------------------------------------------------------------------------------------------- forward

def _fwd_kernel(lo_ref, hi_ref, qp_ref, qs_ref, kp_ref, ks_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, c: _Cfg, nq: int):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  lo, hi = lo_ref[b * nq + i], hi_ref[b * nq + i]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(lo + j <= hi)
  def _step():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * c.scale  # [bq, bk]
    mask = _visible(_col(qp_ref), _col(qs_ref), kp_ref[...], ks_ref[...], c)
    s = jnp.where(mask, s, MASK)
    m_prev, l_prev = m_sc[:, :1], l_sc[:, :1]  # [bq, 1] (scratch is lane-broadcast [bq, 128])
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # where(): a row with no visible key in this block must add 0, not exp(MASK - MASK) = 1.
    p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_sc[...] = jnp.broadcast_to(alpha * l_prev + jnp.sum(p, axis=1, keepdims=True), l_sc.shape)
    m_sc[...] = jnp.broadcast_to(m_next, m_sc.shape)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc_sc[...] = acc_sc[...] * alpha + pv

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l, m = l_sc[...], m_sc[...]  # [bq, 128]
    seen = l > 0.0  # a row that saw no key (padding) gets output 0 and lse +BIG, so P = exp(s - lse) = 0.
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    o_ref[...] = (acc_sc[...] * inv[:, :1]).astype(o_ref.dtype)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), float(BIG))
    lse_ref[...] = lse.T[:1, :]  # [128, bq] → the lane-major row [1, bq].


def _query_grid_maps(nq: int, groups: int):
  """Index maps of the grid (batch b, query head n, query block i, step j) that the forward and dQ
  kernels share: q, k/v (kv head n // G; key block lo + j of query block i's scalar-prefetched range,
  clamped so steps past it repeat the last block and issue no copy), the lane-major position/segment
  vectors of the query and key blocks, and per-row [B, N, 1, T] vectors (lse, D)."""
  def kv_block(b, i, j, lo_ref, hi_ref):
    return _clamped(lo_ref[b * nq + i], hi_ref[b * nq + i], j)

  q_map = lambda b, n, i, j, lo_ref, hi_ref: (b, n, i, 0)  # noqa: E731
  def kv_map(b, n, i, j, lo_ref, hi_ref):
    return b, jax.lax.div(n, groups), kv_block(b, i, j, lo_ref, hi_ref), 0

  qvec_map = lambda b, n, i, j, lo_ref, hi_ref: (b, 0, i)  # noqa: E731
  kvec_map = lambda b, n, i, j, lo_ref, hi_ref: (b, 0, kv_block(b, i, j, lo_ref, hi_ref))  # noqa: E731
  row_map = lambda b, n, i, j, lo_ref, hi_ref: (b, n, 0, i)  # noqa: E731
  return q_map, kv_map, qvec_map, kvec_map, row_map


def _fwd_call(q, k, v, qp, qs, kp, ks, lo, hi, c: _Cfg):
  B, N, Tp, H = q.shape
  bq, bk, G = c.block_q, c.block_k, c.groups
  nq, nk = Tp // bq, k.shape[2] // bk

  q_map, kv_map, qvec_map, kvec_map, lse_map = _query_grid_maps(nq, G)
  sq = pl.squeezed
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(B, N, nq, nk),
      in_specs=[pl.BlockSpec((sq, 1, bq), qvec_map), pl.BlockSpec((sq, 1, bq), qvec_map),
                pl.BlockSpec((sq, 1, bk), kvec_map), pl.BlockSpec((sq, 1, bk), kvec_map),
                pl.BlockSpec((sq, sq, bq, H), q_map), pl.BlockSpec((sq, sq, bk, H), kv_map),
                pl.BlockSpec((sq, sq, bk, H), kv_map)],
      out_specs=[pl.BlockSpec((sq, sq, bq, H), q_map), pl.BlockSpec((sq, sq, 1, bq), lse_map)],
      scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32), pltpu.VMEM((bq, _LANES), jnp.float32),
                      pltpu.VMEM((bq, H), jnp.float32)])
  S = k.shape[2]
  cost = pl.CostEstimate(flops=4 * B * N * Tp * S * H, transcendentals=B * N * Tp * S,
                         bytes_accessed=q.nbytes * 2 + (k.nbytes + v.nbytes) * nq * G)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, c=c, nq=nq), grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, 1, Tp), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel",
                                                                "arbitrary")),
      cost_estimate=cost, interpret=_interpret(c), name="flash_tpu_fwd",
  )(lo, hi, qp, qs, kp, ks, q, k, v)


# --------------------------------------------------------------------------------------------- backward

def _dq_kernel(lo_ref, hi_ref, qp_ref, qs_ref, kp_ref, ks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               di_ref, dq_ref, dq_sc, *, c: _Cfg, nq: int):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  lo, hi = lo_ref[b * nq + i], hi_ref[b * nq + i]

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(lo + j <= hi)
  def _step():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * c.scale  # [bq, bk]
    mask = _visible(_col(qp_ref), _col(qs_ref), kp_ref[...], ks_ref[...], c)
    p = jnp.where(mask, jnp.exp(s - _col(lse_ref)), 0.0)
    dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)  # dO·Vᵀ [bq, bk]
    ds = p * (dp - _col(di_ref))  # softmax backward: dS = P ∘ (dP − rowsum(dO ∘ O))
    dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * c.scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, qp_ref, qs_ref, kp_ref, ks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                di_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, c: _Cfg, nk: int, nq: int):
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  lo, hi = lo_ref[b * nk + i], hi_ref[b * nk + i]

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(lo + jax.lax.rem(t, nq) <= hi)  # step t = (query head g of the group, query block lo + t % nq)
  def _step():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    st = jax.lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * c.scale  # Sᵀ [bk, bq]
    mask = _visible(qp_ref[...], qs_ref[...], _col(kp_ref), _col(ks_ref), c)
    pt = jnp.where(mask, jnp.exp(st - lse_ref[...]), 0.0)  # Pᵀ; lse is a [1, bq] row here
    dv_sc[...] += jnp.dot(pt.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dpt = jax.lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)  # (dO·Vᵀ)ᵀ [bk, bq]
    dst = pt * (dpt - di_ref[...])
    dk_sc[...] += jnp.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * c.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _bwd_calls(q, k, v, qp, qs, kp, ks, lse, di, do, ranges, c: _Cfg):
  B, N, Tp, H = q.shape
  K, Sp = k.shape[1], k.shape[2]
  bq, bk, G = c.block_q, c.block_k, c.groups
  nq, nk = Tp // bq, Sp // bk
  (qlo, qhi), (klo, khi) = ranges
  sq = pl.squeezed
  params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

  # dQ: the forward's grid and key-block ranges.
  q_map, kv_map, qvec_map, kvec_map, row_map = _query_grid_maps(nq, G)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, c=c, nq=nq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(B, N, nq, nk),
          in_specs=[pl.BlockSpec((sq, 1, bq), qvec_map), pl.BlockSpec((sq, 1, bq), qvec_map),
                    pl.BlockSpec((sq, 1, bk), kvec_map), pl.BlockSpec((sq, 1, bk), kvec_map),
                    pl.BlockSpec((sq, sq, bq, H), q_map), pl.BlockSpec((sq, sq, bk, H), kv_map),
                    pl.BlockSpec((sq, sq, bk, H), kv_map), pl.BlockSpec((sq, sq, bq, H), q_map),
                    pl.BlockSpec((sq, sq, 1, bq), row_map), pl.BlockSpec((sq, sq, 1, bq), row_map)],
          out_specs=pl.BlockSpec((sq, sq, bq, H), q_map),
          scratch_shapes=[pltpu.VMEM((bq, H), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), compiler_params=params,
      interpret=_interpret(c), name="flash_tpu_bwd_dq",
  )(qlo, qhi, qp, qs, kp, ks, q, k, v, do, lse, di)

  # dK/dV: one program per (batch, kv head, key block); step t walks (head g = t // nq of the group,
  # query block t % nq of this key block's range).
  def q_block(b, i, t, lo_ref, hi_ref):
    return _clamped(lo_ref[b * nk + i], hi_ref[b * nk + i], jax.lax.rem(t, nq))

  qh_map = lambda b, h, i, t, lo_ref, hi_ref: (b, h * G + jax.lax.div(t, nq), q_block(b, i, t, lo_ref, hi_ref), 0)
  k_map = lambda b, h, i, t, lo_ref, hi_ref: (b, h, i, 0)
  qv_map = lambda b, h, i, t, lo_ref, hi_ref: (b, 0, q_block(b, i, t, lo_ref, hi_ref))
  kv_vec_map = lambda b, h, i, t, lo_ref, hi_ref: (b, 0, i)
  rowh_map = lambda b, h, i, t, lo_ref, hi_ref: (b, h * G + jax.lax.div(t, nq), 0, q_block(b, i, t, lo_ref, hi_ref))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, c=c, nk=nk, nq=nq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(B, K, nk, G * nq),
          in_specs=[pl.BlockSpec((sq, 1, bq), qv_map), pl.BlockSpec((sq, 1, bq), qv_map),
                    pl.BlockSpec((sq, 1, bk), kv_vec_map), pl.BlockSpec((sq, 1, bk), kv_vec_map),
                    pl.BlockSpec((sq, sq, bq, H), qh_map), pl.BlockSpec((sq, sq, bk, H), k_map),
                    pl.BlockSpec((sq, sq, bk, H), k_map), pl.BlockSpec((sq, sq, bq, H), qh_map),
                    pl.BlockSpec((sq, sq, 1, bq), rowh_map), pl.BlockSpec((sq, sq, 1, bq), rowh_map)],
          out_specs=[pl.BlockSpec((sq, sq, bk, H), k_map), pl.BlockSpec((sq, sq, bk, H), k_map)],
          scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=_interpret(c), name="flash_tpu_bwd_dkv",
  )(klo, khi, qp, qs, kp, ks, q, k, v, do, lse, di)
  return dq, dk, dv


# ------------------------------------------------------------------------------------ block skipping

def _block_ranges(qp, qs, kp, ks, c: _Cfg):
  """((lo, hi) key blocks per query block, (lo, hi) query blocks per key block): a block pair is kept
  unless the block min/max prove every (query, key) pair in it masked."""
  vis = block_visibility(qp[:, 0], qs[:, 0], kp[:, 0], ks[:, 0], c.block_q, c.block_k, causal=c.causal,
                         window=c.window)  # [B, nq, nk] from the lane-major [B, 1, L] vectors.
  flat = lambda ends: tuple(x.reshape(-1) for x in ends)  # noqa: E731  [B·rows]: scalar-prefetch layout.
  return flat(first_last(vis)), flat(first_last(jnp.swapaxes(vis, 1, 2)))


# ----------------------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, qp, qs, kp, ks, c: _Cfg):
  return _flash_fwd(q, k, v, qp, qs, kp, ks, c)[0]


def _flash_fwd(q, k, v, qp, qs, kp, ks, c: _Cfg):
  ranges = _block_ranges(qp, qs, kp, ks, c)
  o, lse = _fwd_call(q, k, v, qp, qs, kp, ks, *ranges[0], c)
  return o, (q, k, v, qp, qs, kp, ks, o, lse)


def _flash_bwd(c: _Cfg, res, do):
  q, k, v, qp, qs, kp, ks, o, lse = res
  ranges = _block_ranges(qp, qs, kp, ks, c)
  # D = rowsum(dO ∘ O) (FA-2 Alg. 2, line 4): an O(T·H) XLA reduction, lane-major like the lse.
  di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)[:, :, None, :]
  dq, dk, dv = _bwd_calls(q, k, v, qp, qs, kp, ks, lse, di, do.astype(q.dtype), ranges, c)
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------ interface

def _fold_padding(pos, seg, pad_seg: int):
  """[B, L] positions/segments → lane-major [B, 1, L] int32 with padding (negative position or segment)
  folded in: position -1 and segment `pad_seg` (-1 for queries, -2 for keys, below every real id), so no
  padding token matches anything, not even other padding, and the kernel tests one equality."""
  pos = pos.astype(jnp.int32)
  seg = jnp.zeros_like(pos) if seg is None else seg.astype(jnp.int32)
  pad = (pos < 0) | (seg < 0)
  return jnp.where(pad, -1, pos)[:, None, :], jnp.where(pad, pad_seg, seg)[:, None, :]


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def block_sizes(T: int, S: int, block_q: int, block_k: int) -> tuple[int, int]:
  """Blocks actually used: the requested ones, shrunk to the (8- / 128-aligned) padded length when a
  sequence is shorter (a whole-length block satisfies Mosaic's tiling whatever its size)."""
  return min(block_q, _round_up(T, 8)), min(block_k, _round_up(S, 8))


@functools.partial(jax.jit, static_argnames=("sliding_window", "causal", "scale", "block_q", "block_k",
                                             "interpret"))
def flash_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                    sliding_window: int = 0, causal: bool = True, scale: float | None = None,
                    block_q: int = 512, block_k: int = 512, interpret: bool = False):
  """Attention of q [B, T, N, H] over k/v [B, S, K, H] → [B, T, N, H] in q.dtype (see module docstring).

  block_q / block_k: tile sizes along T / S; on a TPU each must be a multiple of 128 unless it covers
  the whole (padded) length. At 512 × 512 the three kernels (blocks double-buffered, fp32 accumulators,
  [bk, bq] fp32 temporaries) fit the default scoped VMEM up to H = 256: checked by ahead-of-time
  compiles for v4, v5e, v5p and v6e (tests/test_kernels_tpu.py); speed is not measured yet (no TPU).
  `interpret=True` runs the kernels with the TPU interpreter (CPU tests).
  """
  B, T, N, H = q.shape
  Bk, S, K, Hk = k.shape
  if v.shape != k.shape or Bk != B or Hk != H:
    raise ValueError(f"flash_attention: q {q.shape}, k {k.shape}, v {v.shape}: want q [B, T, N, H] and "
                     "k, v [B, S, K, H] with the same B and H")
  if N % K:
    raise ValueError(f"flash_attention: {N} query heads are not a multiple of {K} kv heads")
  if q_positions.shape != (B, T) or kv_positions.shape != (B, S):
    raise ValueError(f"flash_attention: positions {q_positions.shape} / {kv_positions.shape}, want "
                     f"{(B, T)} / {(B, S)}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("flash_attention: give both q_segment_ids and kv_segment_ids, or neither")
  bq, bk = block_sizes(T, S, block_q, block_k)
  Tp, Sp = _round_up(T, bq), _round_up(S, bk)
  c = _Cfg(causal=bool(causal), window=int(sliding_window),
           scale=float(scale if scale is not None else 1.0 / math.sqrt(H)),
           block_q=bq, block_k=bk, groups=N // K, interpret=bool(interpret))
  qp, qs = _fold_padding(pad(q_positions, 1, Tp, -1), None if q_segment_ids is None else
                         pad(q_segment_ids, 1, Tp, -1), -1)
  kp, ks = _fold_padding(pad(kv_positions, 1, Sp, -1), None if kv_segment_ids is None else
                         pad(kv_segment_ids, 1, Sp, -1), -2)
  head_major = lambda x, L: pad(jnp.swapaxes(x, 1, 2), 2, L)  # [B, L, heads, H] → [B, heads, Lp, H]
  o = _flash(head_major(q, Tp), head_major(k, Sp), head_major(v.astype(k.dtype), Sp), qp, qs, kp, ks, c)
  return jnp.swapaxes(o[:, :, :T], 1, 2)
