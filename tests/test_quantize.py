"""Weight-only quantization (model/quantize.py): round-trip bounds, int4 packing, logits error of a quantized
model against fp32, stored bytes, loading quantized, and the dense KV sampler on a quantized model."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from model.config import ModelConfig
from model.load import load_model, make_meta, save_model
from model.quantize import (SCALE_SUFFIX, dequantize_array, element_scales, pack_int4, param_bytes,
                            quantize_array, quantize_model, quantized_params, unpack_int4)
from model.transformer import Transformer
from train.sample import generate_ids

# d_ff = 88 is not a multiple of the int4 group (32 below): exercises the zero padding of the input dim.
CFG = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=88, max_seq_len=64,
                  compute_dtype="float32", init_std=0.05)
QMAX = {"int8": 127, "int4": 7}


def build(cfg=CFG, seed=0):
  """A random model with the init's distribution — N(0, init_std) truncated at ±2σ, unit norm scales —
  drawn by NumPy/SciPy (the initializers' per-shape XLA compiles are slow on a loaded 2-core machine)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if path[-1].key == "scale":
      return jnp.ones(s.shape, s.dtype)
    value = stats.truncnorm.rvs(-2, 2, scale=cfg.init_std, size=s.shape, random_state=rng)
    return jnp.asarray(value, s.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, toks):
  return nnx.merge(graphdef, state)(toks)


def logits(model, toks):
  """model(toks), jitted: one compile instead of an eager XLA compile per op and shape."""
  return _forward(*nnx.split(model), toks)


def tokens(b=2, t=12, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)), jnp.int32)


# ------------------------------------------------------------------ arrays

@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("shape,in_axes,batch_dims,group", [
    ((64, 48), (0,), 0, 128),  # K = 64 < 128: one group per column.
    ((200, 24), (0,), 0, 128),  # K = 200: int4 pads to 256 (two groups).
    ((3, 20, 4, 5), (1, 2), 1, 8),  # stacked layers, two contraction axes (like wo), K = 80.
    ((24, 40), (1,), 0, 16),  # contraction on the last axis (like the embedding), K = 40 → 48.
])
def test_round_trip_error_is_at_most_half_a_step(mode, shape, in_axes, batch_dims, group):
  w = jax.random.normal(jax.random.PRNGKey(0), shape) * 0.3
  w = w.at[..., 0].set(0.0) if in_axes != (len(shape) - batch_dims - 1,) else w  # an all-zero column.
  codes, scales, spec = quantize_array(w, mode, in_axes, group_size=group, batch_dims=batch_dims)
  assert codes.dtype == jnp.int8
  back = dequantize_array(codes, scales, spec)
  step = element_scales(scales, spec)
  assert back.shape == w.shape == step.shape
  # |w − deq(q(w))| ≤ scale/2 per element; 1e-6 relative slack covers fp32 rounding of w / scale.
  assert bool(jnp.all(jnp.abs(w - back) <= step / 2 * (1 + 1e-6)))
  raw = unpack_int4(codes) if mode == "int4" else codes
  assert int(jnp.max(jnp.abs(raw))) == QMAX[mode]  # ±absmax lands on ±qmax, -8 is never used.
  # The largest element of every group is reproduced to fp32 rounding (it is exactly ±qmax steps).
  assert float(jnp.max(jnp.abs(w))) == pytest.approx(float(jnp.max(jnp.abs(back))), rel=1e-6)


def test_round_trip_of_zeros_and_grid_values_is_exact():
  w = jnp.zeros((16, 4)).at[:, 1].set(jnp.arange(16) - 7.0)  # column 1 is on the int4 grid of scale 1.
  for mode in ("int8", "int4"):
    codes, scales, spec = quantize_array(w, mode, (0,), group_size=16)
    np.testing.assert_array_equal(dequantize_array(codes, scales, spec)[:, [0, 2, 3]], 0.0)
  codes, scales, spec = quantize_array(w[:15], "int4", (0,), group_size=16)
  np.testing.assert_allclose(dequantize_array(codes, scales, spec), w[:15], rtol=1e-6)


def test_int4_packing_round_trip_is_exact_for_all_16_values():
  values = jnp.arange(-8, 8, dtype=jnp.int8)
  lo, hi = jnp.meshgrid(values, values, indexing="ij")
  codes = jnp.stack([lo.ravel(), hi.ravel()])  # [2 input rows, 256 columns]: every (low, high) pair.
  packed = pack_int4(codes)
  assert packed.shape == (1, 256) and packed.dtype == jnp.int8
  assert len(set(np.asarray(packed).ravel().tolist())) == 256  # every byte value used once.
  np.testing.assert_array_equal(unpack_int4(packed), codes)


def test_bad_mode_and_group_are_errors():
  with pytest.raises(ValueError, match="int3"):
    quantize_array(jnp.ones((4, 4)), "int3", (0,))
  with pytest.raises(ValueError, match="group_size"):
    quantize_array(jnp.ones((4, 4)), "int4", (0,), group_size=0)
  with pytest.raises(ValueError, match="fp8"):
    quantize_model(build(), "fp8")


# ------------------------------------------------------------------ models

def dequantized_copy(model, quantized):
  """The fp32 model whose quantized weights are replaced by their dequantized values."""
  ref = nnx.clone(model)
  qstate = nnx.to_pure_dict(nnx.state(quantized, nnx.Param))
  state = nnx.to_pure_dict(nnx.state(ref, nnx.Param))
  specs = {}
  for path, var in nnx.iter_graph(quantized):
    if isinstance(var, nnx.Variable) and var.get_metadata().get("quant") is not None:
      specs[path] = var.get_metadata()["quant"]

  def at(tree, path):
    for p in path:
      tree = tree[p]
    return tree

  for path, spec in specs.items():
    parent = at(state, path[:-1])
    qparent = at(qstate, path[:-1])
    parent[path[-1]] = dequantize_array(qparent[path[-1]], qparent[path[-1] + SCALE_SUFFIX], spec)
  nnx.update(ref, state)
  return ref


@pytest.mark.parametrize("scan,tie,embeddings",
                         [(True, True, True), (False, False, True), (True, False, False)])
def test_quantized_model_is_the_model_with_dequantized_weights(scan, tie, embeddings):
  cfg = dataclasses.replace(CFG, scan_layers=scan, tie_embeddings=tie)
  model = build(cfg)
  quantized = quantize_model(build(cfg), "int4", group_size=32, embeddings=embeddings)
  names = {str(p[-1]) for p, v in nnx.iter_graph(quantized)
           if isinstance(v, nnx.Variable) and v.get_metadata().get("quant") is not None}
  want = {"wq", "wk", "wv", "wo", "w_in", "w_gate", "w_out"} | ({"embed"} if embeddings else set())
  assert names == want | (set() if tie else {"lm_head"})
  ref = dequantized_copy(model, quantized)
  # Dequantization inside the jitted forward gives the reference's logits up to fp32 reassociation of
  # the fused ops (~1e-7 here), five orders below the int4 error itself (~1e-2, see below).
  np.testing.assert_allclose(logits(quantized, tokens()), logits(ref, tokens()), rtol=0, atol=2e-6)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_logits_are_close_to_fp32(mode):
  # One matmul with weights in ±2σ (truncated init) and rounding errors uniform in ±scale/2 has a
  # relative output error ≈ (absmax/qmax)/√12 / σ ≈ 2/(qmax·√12): 0.45% for int8 (per channel),
  # 8.2% for int4. The logits collect the errors of M = 16 quantized matmuls (7 per layer, the
  # embedding lookup and the tied head); independent errors add in quadrature, so at most √M = 4× one
  # matmul's when none is damped on the way (measured: 2.3×). The floor (½×) fails a no-op quantizer.
  model = build()
  quantized = quantize_model(build(), mode, group_size=32)
  ref, got = logits(model, tokens()), logits(quantized, tokens())
  rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
  one_matmul = 2 / (QMAX[mode] * math.sqrt(12))
  assert one_matmul / 2 < rel < 4 * one_matmul, rel


def test_stored_bytes_really_shrink():
  # Counted from the arrays as stored on the device. CFG with d_ff = 128: per layer wq [64, 4·16], wk and
  # wv [64, 2·16], wo [4·16, 64], w_in and w_gate [64, 128], w_out [128, 64] (as K × N); the tied
  # embedding is K = 64 (d_model) × N = 97 (vocab); 5 norms of 64 stay fp32.
  cfg = dataclasses.replace(CFG, d_ff=128)
  mats = 2 * [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)] + [(64, 97)]
  norms = 4 * 5 * 64
  expected = {None: sum(4 * k * n for k, n in mats) + norms,
              "int8": sum(k * n + 4 * n for k, n in mats) + norms,  # 1 byte + one fp32 scale per column.
              "int4": sum(k * n // 2 + 4 * (k // 32) * n for k, n in mats) + norms}  # ½ byte, a scale/32.
  assert param_bytes(build(cfg)) == expected[None]
  for mode in ("int8", "int4"):
    q = quantize_model(build(cfg), mode, group_size=32)
    assert param_bytes(q) == expected[mode]
    assert all(v.get_value().dtype == jnp.int8 for v in quantized_params(q))
    # What the device really holds: a packed int4 byte is one byte (a jnp.int4 array would not be on CPU).
    arrays = jax.tree.leaves(nnx.state(q, nnx.Param))
    assert sum(x.on_device_size_in_bytes() for x in arrays) == expected[mode]
  assert expected["int8"] / expected[None] < 0.27 and expected["int4"] / expected[None] < 0.17


# ------------------------------------------------------------------ loading and sampling

def test_load_model_quantizes_and_the_kv_sampler_runs(tmp_path):
  model = build()
  meta = make_meta({"model": dataclasses.asdict(CFG)}, b"not a tokenizer", CFG.vocab_size)
  save_model(tmp_path / "run", model, meta)
  loaded, _ = load_model(tmp_path / "run", quantize="int8")
  assert len(quantized_params(loaded)) == 8  # wq wk wv wo w_in w_gate w_out (stacked) + embed.
  direct = quantize_model(build(), "int8")
  np.testing.assert_array_equal(logits(loaded, tokens()), logits(direct, tokens()))
  # The dense KV-cache sampler on the quantized model: greedy ids equal the dequantized-weights model's.
  prompts = [[1, 5, 9], [3]]
  got = generate_ids(loaded, prompts, eos_id=-1, max_new_tokens=8, temperature=0.0)
  want = generate_ids(dequantized_copy(model, loaded), prompts, eos_id=-1, max_new_tokens=8, temperature=0.0)
  assert got == want and [len(r) for r in got] == [8, 8]
  with pytest.raises(ValueError, match="int2"):
    load_model(tmp_path / "run", quantize="int2")
  with pytest.raises(ValueError, match="quantized"):
    save_model(tmp_path / "again", loaded, meta)
