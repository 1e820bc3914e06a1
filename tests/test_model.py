"""Model behaviour: parameter counts, causality, packing isolation, positions, KV cache, variants."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.lm import SIZES, get_config
from model.config import ModelConfig
from model.layers.attention import make_mask
from model.layers.positions import alibi_slopes, apply_rope, rope_inv_freq
from model.params import count_model_params, count_params
from model.transformer import Transformer

SMALL = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                    compute_dtype="float32")


def build(cfg=SMALL, seed=0):
  return Transformer(cfg, rngs=nnx.Rngs(seed))


def tokens(b, t, vocab=97, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


# ------------------------------------------------------------------ parameter counts

def test_param_count_by_hand_tiny():
  # tiny: V=4096, D=256, L=4, 4 heads of 64, SwiGLU d_ff=704, RMSNorm, tied.
  v, d, f, layers = 4096, 256, 704, 4
  per_layer = 4 * d * d + 3 * d * f + 2 * d
  expected = v * d + layers * per_layer + d
  cfg = ModelConfig(vocab_size=v, d_model=d, n_layers=layers, n_heads=4, n_kv_heads=4, d_ff=f)
  assert count_params(cfg)["total"] == expected == 4_262_144
  assert count_model_params(cfg) == expected


@pytest.mark.parametrize("size,published", [("1b", 1_100_048_384), ("7b", 6_738_415_616),
                                            ("70b", 68_976_648_192)])
def test_param_count_matches_published_llama(size, published):
  # TinyLlama-1.1B, Llama-2-7B, Llama-2-70B (model cards / HF safetensors totals).
  cfg = ModelConfig.from_dict(dict(get_config(size).model.to_dict()))
  assert count_params(cfg)["total"] == published


@pytest.mark.parametrize("size", sorted(SIZES))
def test_param_formula_matches_module_for_every_preset(size):
  d = dict(get_config(size).model.to_dict())
  d["vocab_size"] = d["vocab_size"] or 4096
  cfg = ModelConfig.from_dict(d)
  if cfg.n_layers * cfg.d_model > 30_000:  # eval_shape of 70b still traces fine but is slow to build
    cfg = dataclasses.replace(cfg, n_layers=2)
  assert count_model_params(cfg) == count_params(cfg)["total"]


@pytest.mark.parametrize("variant", [dict(use_bias=True), dict(qk_norm=True), dict(norm="layernorm"),
                                     dict(activation="gelu"), dict(positions="learned"),
                                     dict(tie_embeddings=False), dict(norm="layernorm", qk_norm=True,
                                                                      use_bias=True)])
def test_param_formula_matches_module_variants(variant):
  cfg = dataclasses.replace(SMALL, **variant)
  assert count_model_params(cfg) == count_params(cfg)["total"]


# ------------------------------------------------------------------ masking and packing

@pytest.mark.parametrize("positions", ["rope", "alibi", "learned", "sinusoidal", "none"])
def test_causal_future_token_does_not_change_past_logits(positions):
  model = build(dataclasses.replace(SMALL, positions=positions))
  x = tokens(2, 16)
  y = x.at[:, 10].set((x[:, 10] + 1) % 97)
  a, b = model(x), model(y)
  np.testing.assert_array_equal(np.asarray(a[:, :10]), np.asarray(b[:, :10]))
  assert not np.allclose(np.asarray(a[:, 10:]), np.asarray(b[:, 10:]))


@pytest.mark.parametrize("positions", ["rope", "alibi", "learned"])
def test_packed_document_logits_equal_alone(positions):
  model = build(dataclasses.replace(SMALL, positions=positions))
  d1, d2, d3 = tokens(1, 5, seed=1), tokens(1, 7, seed=2), tokens(1, 4, seed=3)
  packed = jnp.concatenate([d1, d2, d3], axis=1)
  seg = jnp.asarray([[1] * 5 + [2] * 7 + [3] * 4])
  pos = jnp.asarray([list(range(5)) + list(range(7)) + list(range(4))])
  out = model(packed, positions=pos, segment_ids=seg)
  for doc, start in ((d1, 0), (d2, 5), (d3, 12)):
    alone = model(doc)
    np.testing.assert_allclose(np.asarray(out[:, start:start + doc.shape[1]]), np.asarray(alone),
                               atol=1e-5, rtol=1e-5)


def test_sliding_window_limits_context():
  w = 4
  model = build(dataclasses.replace(SMALL, sliding_window=w, n_layers=1))
  x = tokens(1, 16)
  y = x.at[:, 3].set((x[:, 3] + 1) % 97)
  a, b = model(x), model(y)
  # One layer: position p sees p-w+1..p, so token 3 affects positions 3..6 only.
  np.testing.assert_array_equal(np.asarray(a[:, 7:]), np.asarray(b[:, 7:]))
  assert not np.allclose(np.asarray(a[:, 3:7]), np.asarray(b[:, 3:7]))
  mask = make_mask(jnp.arange(8)[None], jnp.arange(8)[None], sliding_window=3)[0, 0]
  assert np.asarray(mask).sum(axis=1).tolist() == [1, 2, 3, 3, 3, 3, 3, 3]


# ------------------------------------------------------------------ positions

@pytest.mark.parametrize("scaling", ["none", "linear", "llama3", "yarn"])
def test_rope_scores_depend_only_on_relative_position(scaling):
  cfg = dataclasses.replace(SMALL, rope_scaling=scaling, rope_factor=4.0, rope_original_max_len=32)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, cfg.hd)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, cfg.hd)), jnp.float32)

  def score(pq, pk):
    rq = apply_rope(q, jnp.asarray([[pq]]), cfg)
    rk = apply_rope(k, jnp.asarray([[pk]]), cfg)
    return float(jnp.sum(rq * rk))

  for offset in (0, 3, 17):
    np.testing.assert_allclose(score(5 + offset, 5), score(40 + offset, 40), rtol=1e-4, atol=1e-5)
  assert abs(score(8, 5) - score(5, 5)) > 1e-4


def test_rope_linear_scaling_is_position_interpolation():
  cfg = dataclasses.replace(SMALL, rope_scaling="linear", rope_factor=4.0)
  base, _ = rope_inv_freq(dataclasses.replace(cfg, rope_scaling="none"))
  scaled, _ = rope_inv_freq(cfg)
  np.testing.assert_allclose(scaled, base / 4.0)


def test_rope_llama3_keeps_high_and_scales_low_frequencies():
  # Llama 3.1 settings: factor 8, low 1, high 4, original context 8192, theta 500000, head_dim 128.
  cfg = ModelConfig(d_model=128, n_heads=1, n_kv_heads=1, rope_theta=500_000.0, rope_scaling="llama3",
                    rope_factor=8.0, rope_original_max_len=8192)
  base, _ = rope_inv_freq(dataclasses.replace(cfg, rope_scaling="none"))
  scaled, _ = rope_inv_freq(cfg)
  wavelen = 2 * np.pi / base
  high = wavelen < 8192 / 4
  low = wavelen > 8192 / 1
  np.testing.assert_allclose(scaled[high], base[high])
  np.testing.assert_allclose(scaled[low], base[low] / 8.0)
  mid = ~high & ~low
  assert np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8.0)


def test_rope_yarn_attention_scale():
  cfg = dataclasses.replace(SMALL, rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=32)
  _, mscale = rope_inv_freq(cfg)
  assert mscale == pytest.approx(0.1 * np.log(4.0) + 1.0)  # YaRN paper, eq. for sqrt(1/t).


def test_alibi_slopes_match_paper():
  np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
  # 6 heads: 4 from the 4-head series, then every other of the 8-head series.
  expected = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
  np.testing.assert_allclose(alibi_slopes(6), expected)


# ------------------------------------------------------------------ KV cache, scan, variants

@pytest.mark.parametrize("variant", [dict(), dict(positions="alibi"), dict(positions="learned"),
                                     dict(positions="sinusoidal"), dict(sliding_window=5),
                                     dict(scan_layers=False), dict(n_kv_heads=1, qk_norm=True)])
def test_kv_cache_decode_equals_full_forward(variant):
  model = build(dataclasses.replace(SMALL, **variant))
  x = tokens(2, 12)
  full = model(x)
  cache = model.init_cache(2, 16, jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  logits, cache = model.decode(x[:, :7], positions=pos[:, :7], cache=cache)
  outs = [logits]
  for t in range(7, 12):
    logits, cache = model.decode(x[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache)
    outs.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_scan_and_unrolled_layers_compute_the_same():
  scanned = build(SMALL)
  unrolled = build(dataclasses.replace(SMALL, scan_layers=False))
  stacked = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  flat = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  for i in range(SMALL.n_layers):
    flat["blocks"][i] = jax.tree.map(lambda a: a[i], stacked["blocks"])
  for k in ("embed", "final_norm"):
    flat[k] = stacked[k]
  nnx.update(unrolled, flat)
  x = tokens(2, 10)
  np.testing.assert_allclose(np.asarray(scanned(x)), np.asarray(unrolled(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_gives_same_gradients(remat):
  model = build(SMALL)
  remodel = build(dataclasses.replace(SMALL, remat=remat))
  x = tokens(2, 8)
  g1 = nnx.grad(lambda m: m(x).sum())(model)
  g2 = nnx.grad(lambda m: m(x).sum())(remodel)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", [dict(activation=a) for a in ("swiglu", "geglu", "gelu", "relu")]
                         + [dict(norm="layernorm"), dict(norm_placement="post"), dict(use_bias=True),
                            dict(tie_embeddings=False), dict(n_kv_heads=4), dict(n_kv_heads=1),
                            dict(head_dim=16)])
def test_variants_run_and_train(variant):
  model = build(dataclasses.replace(SMALL, **variant))
  x = tokens(2, 8)
  loss = lambda m: -jax.nn.log_softmax(m(x[:, :-1]))[0, 0, x[0, 1]]
  before = float(loss(model))
  grads = nnx.grad(loss)(model)
  nnx.update(model, jax.tree.map(lambda p, g: p - 0.02 * g, nnx.state(model, nnx.Param), grads))
  assert np.isfinite(before) and float(loss(model)) < before


def test_dtype_policy_bf16_compute_fp32_params_and_logits():
  model = build(dataclasses.replace(SMALL, compute_dtype="bfloat16"))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  out = model(tokens(1, 8))
  assert out.dtype == jnp.float32
  ref = build(SMALL)(tokens(1, 8))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=5e-2)


def test_dropout_only_with_key():
  model = build(dataclasses.replace(SMALL, dropout=0.5))
  x = tokens(1, 8)
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
  a = model(x, dropout_key=jax.random.PRNGKey(0))
  b = model(x, dropout_key=jax.random.PRNGKey(1))
  assert not np.allclose(np.asarray(a), np.asarray(b))


def test_every_param_has_logical_axes():
  model = build(dataclasses.replace(SMALL, use_bias=True, qk_norm=True, positions="learned",
                                    tie_embeddings=False))
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      axes = var.get_metadata()["axes"]
      assert len(axes) == var.get_value().ndim, path
      assert axes[0] == "layers" if "blocks" in path else True


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="n_kv_heads"):
    ModelConfig(n_heads=4, n_kv_heads=3)
  with pytest.raises(ValueError, match="activation"):
    ModelConfig(activation="tanh")
  with pytest.raises(ValueError, match="unknown keys"):
    ModelConfig.from_dict({"d_modle": 3})
