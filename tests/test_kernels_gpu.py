"""GPU flash attention (`model/kernels/flash_gpu.py`) in Pallas interpret mode on CPU, its CUDA lowering,
the `model.attention` switch and the kernel benchmark.

Reference: `jax.nn.dot_product_attention(implementation="xla")` with the position mask (`make_mask`), and
its gradients; padding (position -1) sees and is seen by nothing, so its output rows are 0.
"""
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flash_reference, train_on_mesh

from model.config import ModelConfig
from model.kernels import bench, kernel_for
from model.kernels.flash_gpu import flash_attention
from model.layers.attention import get_attention

BLOCKS = dict(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=32)  # T/S 40..56: not block multiples.


def packed(b, t, splits, pad):
  """Positions/segment ids of rows holding documents split at `splits[row]`, the last `pad` tokens padding."""
  pos, seg = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  for r in range(b):
    s = splits[r]
    pos[r] = np.r_[np.arange(s), np.arange(t - s)]
    seg[r] = np.r_[np.ones(s), 2 * np.ones(t - s)]
  pos[:, t - pad:], seg[:, t - pad:] = -1, -1
  return jnp.asarray(pos), jnp.asarray(seg)


# name: (N, K, T, S, causal, window, segments, dtype)
CASES = {
    "gqa_chunked_prefill": (4, 2, 24, 56, True, 0, False, jnp.float32),  # last query at the last key.
    "mqa_packed_padding": (4, 1, 48, 48, True, 0, True, jnp.float32),
    "window_packed": (2, 1, 48, 48, True, 9, True, jnp.float32),
    "noncausal_segments": (2, 2, 40, 40, False, 0, True, jnp.float32),
    "bf16_gqa": (4, 2, 24, 24, True, 0, True, jnp.bfloat16),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_matches_xla_outputs_and_grads(name):
  n, kh, t, s, causal, window, segments, dtype = CASES[name]
  b, h = 2, 32
  r = np.random.default_rng(0)
  q, do = (jnp.asarray(r.normal(size=(b, t, n, h)), dtype) for _ in range(2))
  k, v = (jnp.asarray(r.normal(size=(b, s, kh, h)), dtype) for _ in range(2))
  if segments:
    qp, qs = packed(b, t, [t // 2, t // 3], pad=5)
    kp, ks = qp, qs
  else:
    kp = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    qp, qs, ks = kp[:, s - t:].at[1, -3:].set(-1), None, None  # row 1 ends in 3 padding queries.
  kw = dict(q_positions=qp, kv_positions=kp, q_segment_ids=qs, kv_segment_ids=ks, sliding_window=window,
            causal=causal, interpret=True, **BLOCKS)

  def run(f):
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(do))

  got = jax.jit(lambda: run(lambda q, k, v: flash_attention(q, k, v, **kw)))()
  want = jax.jit(lambda: run(lambda q, k, v: flash_reference(q, k, v, qp, kp, qs, ks, window=window,
                                                              causal=causal)))()
  for label, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.dtype == dtype and g.shape == w.shape, label
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    if dtype == jnp.float32:
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=label)
    else:  # bf16 inputs, fp32 accumulation: ~2e-2 of the tensor's scale.
      np.testing.assert_allclose(g, w, atol=2e-2 * np.abs(w).max(), rtol=2e-2, err_msg=label)
  out, dq, dk, dv = (np.asarray(x, np.float32) for x in got)
  q_pad, k_pad = np.asarray(qp) < 0, np.asarray(kp) < 0
  assert q_pad.any()
  assert (out[q_pad] == 0).all() and (dq[q_pad] == 0).all()  # padding: no output, no gradient.
  assert (dk[k_pad] == 0).all() and (dv[k_pad] == 0).all()


def _preset_args(n, kh, h, t, dtype=jnp.bfloat16):
  q = jax.ShapeDtypeStruct((1, t, n, h), dtype)
  kv = jax.ShapeDtypeStruct((1, t, kh, h), dtype)
  ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
  return q, kv, kv, ids, ids


@pytest.mark.parametrize("n,kh,h,t,window", [
    (4, 4, 64, 256, 0),  # tiny
    (16, 16, 64, 2048, 0),  # 350m
    (32, 4, 64, 2048, 0),  # 1b (GQA 8:1)
    (32, 32, 128, 2048, 1024),  # 7b head_dim 128, with a window
    (8, 2, 256, 1000, 0),  # head_dim 256, length not a block multiple
])
def test_lowers_for_cuda_forward_and_backward(n, kh, h, t, window):
  def f(q, k, v, pos, seg):
    return flash_attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                           sliding_window=window)

  loss = lambda *a: f(*a).astype(jnp.float32).sum()
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*_preset_args(n, kh, h, t)).lower(
      lowering_platforms=("cuda",)).as_text()
  calls = re.findall(r"custom_call @(\S+)\(", text)
  assert calls.count("__gpu$xla.gpu.triton") == 3, calls  # forward, dQ, dK/dV: each one Triton kernel.
  assert 'name = "flash_bwd_dkv"' in text


def test_compiled_memory_grows_linearly_unlike_xla():
  def temp_bytes(fn, t):
    q, _, _, pos, _ = _preset_args(2, 2, 32, t, jnp.float32)
    return jax.jit(fn).trace(q, q, q, pos).lower().compile().memory_analysis().temp_size_in_bytes

  def flash(q, k, v, p):
    return flash_attention(q, k, v, q_positions=p, kv_positions=p, interpret=True, block_q=64, block_k=64,
                           block_q_bwd=64, block_k_bwd=64)

  def xla(q, k, v, p):
    return get_attention("xla")(q, k, v, q_positions=p, kv_positions=p)

  f256, f1024 = temp_bytes(flash, 256), temp_bytes(flash, 1024)
  x256, x1024 = temp_bytes(xla, 256), temp_bytes(xla, 1024)
  assert f1024 / f256 < 6, (f256, f1024)  # 4× the length: ~4× the memory (measured 3.93).
  assert x1024 / x256 > 12, (x256, x1024)  # the T×S logits: ~16× (measured 16.0).
  assert f1024 < x1024 / 5


def test_training_with_pallas_equals_xla():
  run = dict(steps=2, batch=(4, 32))  # tiny,smoke: 2 layers, 4 heads of 16, fp32.
  xla = train_on_mesh({}, overrides=("--config.model.attention=xla",), **run)
  pallas = train_on_mesh({}, overrides=("--config.model.attention=pallas",), **run)
  np.testing.assert_allclose(pallas["losses"], xla["losses"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), pallas["params"], xla["params"])


def test_attention_switch_on_cpu():  # pallas through the switch: test_training_with_pallas_equals_xla.
  r = np.random.default_rng(1)
  q, k, v = (jnp.asarray(r.normal(size=(1, 8, 2, 16)), jnp.float32) for _ in range(3))
  pos = jnp.arange(8, dtype=jnp.int32)[None]
  kw = dict(q_positions=pos, kv_positions=pos, sliding_window=3)
  want = get_attention("xla")(q, k, v, **kw)
  np.testing.assert_array_equal(get_attention("auto")(q, k, v, **kw), want)  # auto on CPU = xla.
  with pytest.raises(ValueError, match="cudnn needs a GPU"):
    get_attention("cudnn")(q, k, v, **kw)
  with pytest.raises(ValueError, match="takes no additive bias"):
    get_attention("pallas")(q, k, v, bias=jnp.zeros((1, 2, 8, 8)), **kw)
  with pytest.raises(ValueError, match="attention=pallas has no additive-bias"):
    ModelConfig(positions="alibi", attention="pallas")
  with pytest.raises(ValueError, match="no flash attention kernel for backend 'metal'"):
    kernel_for("metal")
  assert kernel_for("cpu") == (flash_attention, True)


def test_bench_quick_rows(capsys):
  assert bench.main(["--quick", "--seqs=64", "--causal=1", "--impls=pallas,cudnn", "--e2e="]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  by = {(r["impl"], r.get("mode")): r for r in rows}
  assert set(by) == {("pallas", "fwd"), ("pallas", "fwd_bwd"), ("cudnn", None)}
  assert "needs a GPU" in by["cudnn", None]["error"]
  for key in [k for k in by if k[1]]:
    r = by[key]
    assert r["bench"] == "attention" and r["device"] and r["commit"] and r["time_ms"] > 0
    # FLOPs as FlashAttention counts them: 4·B·N·T·S·H / 2 (causal), ×2.5 with the backward.
    flops = 4 * r["batch"] * r["heads"] * 64 * 64 * 64 / 2 * (2.5 if r["mode"] == "fwd_bwd" else 1)
    assert r["tflops"] == pytest.approx(flops / (r["time_ms"] / 1e3) / 1e12, rel=0.01, abs=1e-3)
  assert bench.attention_flops(2, 16, 4096, 4096, 128, causal=False, backward=True) == 2.5 * 4 * 2 * 16 * 4096**2 * 128
  assert bench.main(["--impls=pallas,flash3"]) == 2


def test_kv_cache_decode_with_pallas_equals_xla():
  # The serving path: a prefill chunk then one decode step against a dense cache (slot = position), GQA.
  from conftest import random_transformer
  cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                    compute_dtype="float32")
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 7)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
  logits = {}
  for name in ("xla", "pallas"):
    model = random_transformer(dataclasses.replace(cfg, attention=name), seed=0)

    @jax.jit
    def run(tokens, model=model):
      first, cache = model.decode(tokens[:, :6], positions=pos[:, :6], cache=model.init_cache(2, 24))
      last, _ = model.decode(tokens[:, 6:], positions=pos[:, 6:], cache=cache)
      return first, last

    logits[name] = run(tokens)
  for got, want in zip(logits["pallas"], logits["xla"]):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
