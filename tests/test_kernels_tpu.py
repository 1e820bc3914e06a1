"""TPU flash attention (model/kernels/flash_tpu.py) on CPU: interpret mode, TPU lowering, AOT compile.

    python -m pytest tests/test_kernels_tpu.py -x -q

- Outputs and dq/dk/dv under `pltpu.force_tpu_interpret_mode()` match `jax.nn.dot_product_attention`
  (implementation="xla") with the project's mask (`make_mask`), its jax.grad, at fp32 1e-5 / bf16 2e-2,
  over a small grid: GQA and MHA, causal (offset: q_len < kv_len, chunked prefill) and not, packed
  segments, sliding window, padding tokens (position -1 / segment -1: zero rows and zero gradients),
  lengths that are and are not block multiples.
- The block ranges that drive skipping equal a brute-force per-block check of the full mask.
- The kernels (forward and backward) lower for TPU on this CPU machine at the presets' shapes
  (configs/lm.py: head_dim 64/128, seq 2k-8k, 512-blocks), which runs Pallas' Mosaic block-shape checks.
- With libtpu (the `test` extra) they compile ahead of time for a TPU v5e (`train.plan`'s topology path),
  which runs Mosaic's own layout passes, and the compiled memory grows linearly with the sequence, where
  XLA's attention grows quadratically.
"""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from model.kernels.flash_tpu import _block_ranges, _Cfg, _fold_padding, flash_attention
from tests.conftest import flash_mask, flash_reference, require


def _inputs(B, T, S, N, K, H, dtype, *, segments, pad, seed=0):
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.normal(size=shape), dtype) for shape in
             ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
  kp = np.broadcast_to(np.arange(S), (B, S)).copy()
  qp = kp[:, S - T:].copy()  # the last query sits at the last key (chunked prefill)
  qs = ks = None
  if segments:  # two packed documents; positions restart at the boundary
    ks = np.where(np.arange(S) < S // 2, 1, 2)[None].repeat(B, 0)
    kp = np.where(ks == 1, np.arange(S), np.arange(S) - S // 2)
    qs, qp = ks[:, S - T:].copy(), kp[:, S - T:].copy()
  if pad:  # row 1 ends in padding, like a short sequence in a batch
    kp[1, -pad:] = -1
    qp[1, -pad:] = -1
    if segments:
      ks[1, -pad:] = qs[1, -pad:] = -1
  as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  return q, k, v, as_int(qp), as_int(kp), as_int(qs), as_int(ks)


# (B, T, S, N, K, H, dtype, causal, window, segments, pad), blocks 32 × 32: 40 and 72 are not block
# multiples (padded inside), 64 is; N / K = 2 is GQA, 2 / 2 MHA. Interpret mode costs ~12 s a case on 2
# shared cores whatever the shape (its own compile), so each case combines several features.
CASES = [
    (2, 40, 72, 2, 1, 64, "float32", True, 24, True, 5),
    (2, 64, 64, 2, 2, 128, "bfloat16", False, 0, True, 7),
]


@pytest.mark.parametrize("B,T,S,N,K,H,dtype,causal,window,segments,pad", CASES)
def test_matches_xla_reference_with_gradients(B, T, S, N, K, H, dtype, causal, window, segments, pad):
  q, k, v, qp, kp, qs, ks = _inputs(B, T, S, N, K, H, jnp.dtype(dtype), segments=segments, pad=pad)
  cot = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, H)), jnp.float32)

  kernel = lambda q, k, v: flash_attention(q, k, v, q_positions=qp, kv_positions=kp, q_segment_ids=qs,
                                           kv_segment_ids=ks, sliding_window=window, causal=causal,
                                           block_q=32, block_k=32)
  reference = lambda q, k, v: flash_reference(q, k, v, qp, kp, qs, ks, window=window, causal=causal)
  with pltpu.force_tpu_interpret_mode():
    got, vjp = jax.vjp(kernel, q, k, v)
    grads = vjp(cot.astype(got.dtype))
  want, vjp = jax.vjp(reference, q, k, v)
  want_grads = vjp(cot.astype(want.dtype))
  tol = 1e-5 if dtype == "float32" else 2e-2
  f32 = lambda x: np.asarray(x.astype(jnp.float32))
  assert got.dtype == q.dtype and got.shape == q.shape
  np.testing.assert_allclose(f32(got), f32(want), atol=tol, rtol=tol)
  for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
    assert g.dtype == q.dtype, name
    scale = max(1.0, float(jnp.abs(w.astype(jnp.float32)).max()))  # bf16 grads reach ~10: relative tol
    np.testing.assert_allclose(f32(g), f32(w), atol=tol * scale, rtol=tol, err_msg=name)
  if pad:  # padding queries output 0 and get no gradient; padding keys get none either
    assert not np.any(f32(got)[1, -pad:]) and not np.any(f32(grads[0])[1, -pad:])
    assert not np.any(f32(grads[1])[1, -pad:]) and not np.any(f32(grads[2])[1, -pad:])


@pytest.mark.parametrize("causal,window,segments", [(True, 0, False), (True, 40, True), (False, 0, True)])
def test_block_ranges_equal_brute_force(causal, window, segments):
  """Skipping is only a speedup if no block that holds a visible pair is skipped (a wrong range would
  also fail the test above, but only for the cases it runs); here against the full mask, block by block."""
  B, T, S, bq, bk = 2, 256, 384, 32, 64
  _, _, _, qp, kp, qs, ks = _inputs(B, T, S, 1, 1, 8, jnp.float32, segments=segments, pad=20)
  c = _Cfg(causal=causal, window=window, scale=1.0, block_q=bq, block_k=bk, groups=1, interpret=False)
  fq, fk = _fold_padding(qp, qs, -1), _fold_padding(kp, ks, -2)
  (qlo, qhi), (klo, khi) = _block_ranges(*fq, *fk, c)
  pair = np.asarray(flash_mask(qp, kp, qs, ks, window=window, causal=causal))[:, 0]
  blocks = pair.reshape(B, T // bq, bq, S // bk, bk).any(axis=(2, 4))  # [B, nq, nk]
  for b in range(B):
    for i in range(T // bq):
      hit = np.flatnonzero(blocks[b, i])
      lo, hi = int(qlo[b * (T // bq) + i]), int(qhi[b * (T // bq) + i])
      if hit.size:  # every block with a visible pair lies inside [lo, hi]
        assert lo <= hit.min() and hit.max() <= hi
        if not segments:  # positions are monotone there: the range is exact
          assert (lo, hi) == (hit.min(), hit.max())
      else:
        assert hi < lo
    for j in range(S // bk):
      hit = np.flatnonzero(blocks[b, :, j])
      lo, hi = int(klo[b * (S // bk) + j]), int(khi[b * (S // bk) + j])
      assert (lo <= hit.min() and hit.max() <= hi) if hit.size else hi < lo
  if causal and not segments:  # causal skipping: about half the blocks of the square part go unvisited
    visited = (np.asarray(qhi) - np.asarray(qlo) + 1).clip(0).sum()
    assert visited < 0.8 * B * (T // bq) * (S // bk)


# Preset shapes (configs/lm.py): 350m (16 heads, hd 64, seq 2k), 1b (32/4, hd 64, seq 4k = its
# max_seq_len), 70b (64/8, hd 128) at 8k with packed documents and a 4k window, 7b-like MHA at hd 256.
PRESETS = [(2048, 16, 16, 64, 0, False), (4096, 32, 4, 64, 0, True), (8192, 64, 8, 128, 4096, True),
           (2048, 8, 8, 256, 0, False)]


def _attention_grad(T, N, K, H, window, segments, *, sharding=None, attention=None):
  """Abstract args and fn = (q, k, v, pos) ↦ (dq, dk, dv) of a bf16 causal attention, batch 1."""
  s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  args = (s((1, T, N, H), jnp.bfloat16), s((1, T, K, H), jnp.bfloat16), s((1, T, K, H), jnp.bfloat16),
          s((1, T), jnp.int32))

  def attn(q, k, v, pos):
    seg = pos if segments else None
    if attention is not None:
      return attention(q, k, v, pos, seg)
    return flash_attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                           kv_segment_ids=seg, sliding_window=window)

  fn = jax.grad(lambda q, k, v, pos: jnp.sum(attn(q, k, v, pos).astype(jnp.float32)), argnums=(0, 1, 2))
  return fn, args


@pytest.mark.parametrize("T,N,K,H,window,segments", PRESETS)
def test_lowers_for_tpu_at_preset_shapes(T, N, K, H, window, segments):
  fn, args = _attention_grad(T, N, K, H, window, segments)
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  # The three kernels are Mosaic custom calls in the TPU module (no XLA attention fallback).
  assert text.count("tpu_custom_call") == 3, text.count("tpu_custom_call")


def _tpu_device():
  require(importlib.util.find_spec("libtpu") is not None, "libtpu not installed (pip install -e '.[tpu]')")
  from train.plan import tpu_topology_devices
  return tpu_topology_devices("v5e:2x2")[0]


def _compiled_bytes(fn, args):
  m = jax.jit(fn).lower(*args).compile().memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def test_compiles_for_tpu_and_memory_grows_linearly():
  """AOT compile for a TPU v5e chip (Mosaic's layout passes run: the real check of block shapes and
  in-kernel relayouts), forward + backward at 1k and 2k tokens: the compiled memory (arguments, outputs,
  temporaries) doubles, and stays far below the [N, T, T] fp32 logits XLA's attention would keep."""
  sharding = jax.sharding.SingleDeviceSharding(_tpu_device())
  N, K, H = 8, 2, 128
  used = {T: _compiled_bytes(*_attention_grad(T, N, K, H, 0, True, sharding=sharding)) for T in (1024, 2048)}
  assert 1.9 < used[2048] / used[1024] < 2.1, used
  assert used[2048] < N * 2048 * 2048 * 4 / 8, used  # measured: 12.6 MB; [N, T, T] fp32 is 134 MB
