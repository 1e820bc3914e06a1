"""Mixture of experts (model/layers/moe.py): routing, capacity dispatch vs a NumPy re-implementation,
aux losses by hand, dropless vs dense mixture, sigmoid bias routing, expert parallelism vs one device,
and the `tiny,moe,smoke` preset through `python -m train`'s entry point."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import packed_batch, require, shared_data, train_on_mesh
from model.config import ModelConfig
from model.layers.moe import (Moe, dispatch_masks, expert_capacity, load_balancing_loss, route,
                              router_z_loss, update_router_bias)
from model.params import active_params, count_model_params, count_params
from train import flops, sharding
from train.config import parse_args, model_config, resolve
from train.state import init_state, make_setup
from train.step import _loss_sums, cross_entropy, make_train_step


def _moe(seed=0, router_std=1.0, **kw) -> Moe:
  kw = dict(dict(n_experts=4, experts_per_token=2, moe_d_ff=24), **kw)
  cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, compute_dtype="float32",
                    **kw)
  moe = Moe(cfg, rngs=nnx.Rngs(seed))
  # A wide router so routing is uneven and capacity really binds (init std 0.02 routes ~uniformly).
  moe.router.set_value(jax.random.normal(jax.random.PRNGKey(seed + 1), moe.router.shape) * router_std)
  return moe


@nnx.jit
def _call(moe: Moe, x):
  """moe(x), compiled once (op-by-op eager dispatch is ~5x slower to first result on CPU)."""
  return moe(x)


def _x(b=2, t=16, d=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, d)), jnp.float32)


def _np_expert(moe: Moe, e: int, x: np.ndarray) -> np.ndarray:
  """SwiGLU expert e on rows x [N, D], in NumPy."""
  wi, wg, wo = (np.asarray(getattr(moe, n).get_value()[e], np.float64) for n in ("w_in", "w_gate", "w_out"))
  g = x @ wg
  return (g / (1 + np.exp(-g)) * (x @ wi)) @ wo


def _np_slots(experts: np.ndarray, capacity: int, n_experts: int) -> np.ndarray:
  """GShard Algorithm 1 by loops: slot of each (group, token, choice) in its expert, -1 if dropped.
  Every token's first choice is placed (in position order) before any second choice."""
  g_, t_, k_ = experts.shape
  slots = np.full(experts.shape, -1)
  for g in range(g_):
    used = np.zeros(n_experts, int)
    for r in range(k_):
      for t in range(t_):
        e = experts[g, t, r]
        if used[e] < capacity:
          slots[g, t, r] = used[e]
          used[e] += 1
  return slots


# ------------------------------------------------------------------ capacity dispatch

def test_capacity_dispatch_matches_numpy_and_dropped_tokens_add_nothing():
  moe = _moe(capacity_factor=0.5)
  x = _x()
  cap = expert_capacity(16, 2, 0.5, 4)
  assert cap == 4  # ceil(2 · 16 · 0.5 / 4): 16 slots for 32 (token, choice) pairs per sequence
  logits = jnp.einsum("btd,de->bte", x, moe.router.get_value())
  weights, experts, _ = route(logits, k=2)
  experts_np, weights_np = np.asarray(experts), np.asarray(weights, np.float64)
  slots = _np_slots(experts_np, cap, 4)

  dispatch, combine, kept = dispatch_masks(experts, weights, 4, cap)
  np.testing.assert_array_equal(np.asarray(kept), slots >= 0)
  want, want_combine = np.zeros((2, 16, 4, cap)), np.zeros((2, 16, 4, cap))
  for g, t, r in zip(*np.nonzero(slots >= 0)):
    want[g, t, experts_np[g, t, r], slots[g, t, r]] = 1
    want_combine[g, t, experts_np[g, t, r], slots[g, t, r]] = weights_np[g, t, r]
  np.testing.assert_array_equal(np.asarray(dispatch), want)
  np.testing.assert_allclose(np.asarray(combine), want_combine, rtol=1e-6)
  assert (np.asarray(dispatch).sum(1) <= 1).all()  # each slot holds at most one token → ≤ C per expert
  for g in range(2):  # the per-expert counts equal the loop's, none above capacity
    counts = np.asarray(dispatch)[g].sum((0, 2))
    np.testing.assert_array_equal(counts, [(slots[g][experts_np[g] == e] >= 0).sum() for e in range(4)])
    assert counts.max() == cap  # the capacity really binds in this case

  y, aux = _call(moe, x)
  y = np.asarray(y, np.float64)
  xs = np.asarray(x, np.float64)
  ref = np.zeros_like(y)
  for g, t, r in zip(*np.nonzero(slots >= 0)):
    ref[g, t] += weights_np[g, t, r] * _np_expert(moe, experts_np[g, t, r], xs[g, t][None])[0]
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
  all_dropped = (slots < 0).all(-1)
  assert all_dropped.any(), "the case should drop some token entirely"
  np.testing.assert_array_equal(y[all_dropped], 0.0)  # exactly zero: the block passes the residual
  assert float(aux["dropped_frac"]) == pytest.approx((slots < 0).mean())


def test_capacity_equals_dropless_when_nothing_drops():
  x = _x(seed=1)
  # c = E / k gives C = T slots per expert: room for every token, so nothing can drop.
  big, dropless = _moe(capacity_factor=2.0), _moe(capacity_factor=0.0)
  r = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)

  def loss(m):
    y, _ = m(x)
    return jnp.sum(y * r)

  (ya, aux_a), (yb, aux_b) = _call(big, x), _call(dropless, x)
  assert float(aux_a["dropped_frac"]) == 0.0
  np.testing.assert_allclose(np.asarray(ya), np.asarray(yb), rtol=1e-5, atol=1e-6)
  grad = nnx.jit(nnx.grad(loss))
  ga, gb = grad(big), grad(dropless)  # the sort/scatter path's backward too
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_dropless_equals_dense_mixture_when_every_expert_is_selected():
  moe = _moe(experts_per_token=4, capacity_factor=0.0)  # k = E: every expert, softmax weights
  x = _x(seed=3)
  y, _ = _call(moe, x)
  xs = np.asarray(x, np.float64).reshape(-1, 16)
  logits = xs @ np.asarray(moe.router.get_value(), np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ref = sum(p[:, e:e + 1] * _np_expert(moe, e, xs) for e in range(4))  # Σ_e p_e(x) · expert_e(x)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), ref, rtol=1e-5, atol=1e-6)


def test_shared_expert_is_added_to_every_token():
  # Same seed: the router and experts are built first, so both modules share them exactly.
  with_shared, routed_only = _moe(n_shared_experts=2, capacity_factor=0.5), _moe(capacity_factor=0.5)
  for i, name in enumerate(("w_in", "w_gate", "w_out")):  # O(1) weights: its output is not ~1e-4
    var = getattr(with_shared.shared, name)
    var.set_value(jax.random.normal(jax.random.PRNGKey(10 + i), var.shape) * 0.5)
  x = _x(seed=4)
  (y, _), (y_routed, _) = _call(with_shared, x), _call(routed_only, x)
  shared = with_shared.shared
  assert shared.w_in.shape == (16, 2 * 24)  # n_shared · moe_d_ff wide
  np.testing.assert_array_equal(np.asarray(routed_only.w_out.get_value()),
                                np.asarray(with_shared.w_out.get_value()))
  np.testing.assert_allclose(np.asarray(y - y_routed), np.asarray(shared(x)), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(shared(x))).mean() > 0.1  # the shared MLP really contributes


# ------------------------------------------------------------------ aux losses by hand

def test_load_balancing_and_z_loss_by_hand():
  # Token 0: probs (4, 2, 1)/7 → top-2 {0, 1}. Token 1: probs (1, 1, 2)/4 → top-2 {2, 0} (tie: lower id).
  logits = jnp.log(jnp.asarray([[4.0, 2.0, 1.0], [1.0, 1.0, 2.0]]))
  weights, experts, probs = route(logits, k=2)
  np.testing.assert_array_equal(np.asarray(experts), [[0, 1], [2, 0]])
  np.testing.assert_allclose(np.asarray(weights), [[4 / 6, 2 / 6], [2 / 3, 1 / 3]], rtol=1e-6)
  # f = (2, 1, 1) / (k · N = 4); P = ((4/7 + 1/4) / 2, (2/7 + 1/4) / 2, (1/7 + 2/4) / 2) = (23, 15, 18) / 56
  # E · Σ f · P = 3 · (2·23 + 15 + 18) / (4 · 56) = 237 / 224
  assert float(load_balancing_loss(probs, experts, 3)) == pytest.approx(237 / 224, rel=1e-6)
  # mean of logsumexp²: (ln 7² + ln 4²) / 2
  assert float(router_z_loss(logits)) == pytest.approx((math.log(7) ** 2 + math.log(4) ** 2) / 2, rel=1e-6)
  # Perfectly balanced top-1 routing with uniform probs scores exactly 1.0.
  flat = jnp.zeros((4, 4))
  _, e1, p1 = route(flat.at[jnp.arange(4), jnp.arange(4)].set(1e-3), k=1, renormalize=False)
  assert float(load_balancing_loss(p1, e1, 4)) == pytest.approx(1.0, rel=1e-3)


# ------------------------------------------------------------------ sigmoid router with bias

def test_sigmoid_router_selects_with_bias_but_weights_without():
  logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
  s = 1 / (1 + np.exp(-np.asarray([2.0, 1.0, 0.0, -1.0])))
  bias = jnp.asarray([0.0, 0.0, 0.0, 5.0])  # lifts the weakest expert into the top 2
  w, e, probs = route(logits, k=2, router="sigmoid", bias=bias, renormalize=True)
  np.testing.assert_array_equal(np.asarray(e), [[3, 0]])
  np.testing.assert_allclose(np.asarray(w), [[s[3] / (s[3] + s[0]), s[0] / (s[3] + s[0])]], rtol=1e-6)
  w_raw, _, _ = route(logits, k=2, router="sigmoid", bias=bias, renormalize=False)
  np.testing.assert_allclose(np.asarray(w_raw), [[s[3], s[0]]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(probs), [s / s.sum()], rtol=1e-6)  # what the aux loss averages
  _, e0, _ = route(logits, k=2, router="sigmoid", bias=jnp.zeros(4))
  np.testing.assert_array_equal(np.asarray(e0), [[0, 1]])
  grad = jax.grad(lambda b: route(logits, k=2, router="sigmoid", bias=b)[0].sum() ** 2)(bias)
  np.testing.assert_array_equal(np.asarray(grad), 0.0)  # the bias is never trained by the loss


def test_router_bias_update_moves_toward_underloaded_experts():
  load = jnp.asarray([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.5, 0.5]])
  stacked = {"blocks": {"mlp": {"router_bias": jnp.zeros((3, 4)), "w_in": jnp.ones((3, 2))}}}
  out = update_router_bias(stacked, load, 0.1)
  np.testing.assert_allclose(np.asarray(out["blocks"]["mlp"]["router_bias"]),
                             [[-0.1, 0, 0, 0.1], [0, 0, 0, 0], [0.1, 0.1, -0.1, -0.1]])
  np.testing.assert_array_equal(np.asarray(out["blocks"]["mlp"]["w_in"]), 1.0)
  per_layer = {"blocks": {i: {"mlp": {"router_bias": jnp.zeros(4)}} for i in (0, 1, 2)}}  # scan off
  out = update_router_bias(per_layer, load, 0.1)
  np.testing.assert_allclose(np.asarray(out["blocks"][2]["mlp"]["router_bias"]), [0.1, 0.1, -0.1, -0.1])
  nan = update_router_bias(stacked, load * jnp.nan, 0.1)
  np.testing.assert_array_equal(np.asarray(nan["blocks"]["mlp"]["router_bias"]), 0.0)


def test_train_step_adds_weighted_moe_losses_and_moves_sigmoid_bias_by_gamma():
  """Sigmoid router, dropless, one shared expert: the step's loss = CE + z + α·aux + β·z_router, the
  `moe/*` metrics, and the bias moved by exactly γ · sign(mean load − load) outside the optimizer."""
  overrides = ["--config.model.moe_router=sigmoid", "--config.model.capacity_factor=0",
               "--config.model.n_shared_experts=1", "--config.model.moe_bias_rate=0.01",
               "--config.model.moe_aux_weight=0.5", "--config.model.moe_z_weight=0.25",
               "--config.optim.warmup_steps=0"]  # a real first update, so Adam's zero move on the bias shows
  cfg, _ = parse_args(["--config=configs/lm.py:tiny,moe,smoke", *overrides])
  resolve(cfg, 500)
  mc = model_config(cfg)
  setup = make_setup(cfg, mc, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  state = init_state(setup, 0)
  params0 = jax.tree.map(np.asarray, state["params"])
  batch = _batch(8, 32, mc.vocab_size, 0)

  @jax.jit
  def by_hand(params):
    loss, (_, n, _) = _loss_sums(setup, params, batch, None, 1e-4)
    logits, aux = setup.model(params)(batch["inputs"], positions=batch["positions"],
                                      segment_ids=batch["segment_ids"], return_aux=True)
    ce, z, n2 = cross_entropy(logits, batch["targets"], batch["loss_mask"], 1e-4)
    return loss / n, (ce + z) / n2 + 0.5 * aux["aux_loss"] + 0.25 * aux["z_loss"], aux

  got, want, aux = by_hand(state["params"])
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  assert 0.9 < float(aux["aux_loss"]) < 8 and float(aux["z_loss"]) > 0  # ~1 and ~(ln 8)² at init
  load = np.asarray(aux["expert_load"])
  assert load.shape == (2, 8)  # per layer, per expert
  state, m = make_train_step(setup, cfg, (8, 32))(state, batch)
  mlp, mlp0 = state["params"]["blocks"]["mlp"], params0["blocks"]["mlp"]
  # Exactly ±γ (or 0): the optimizer's own update of the bias is zero (no gradient, no weight decay).
  np.testing.assert_allclose(np.asarray(mlp["router_bias"]) - mlp0["router_bias"],
                             0.01 * np.sign(load.mean(-1, keepdims=True) - load), atol=1e-7)
  assert float(m["moe/aux_loss"]) == pytest.approx(float(aux["aux_loss"]), rel=1e-5)
  assert float(m["moe/z_loss"]) == pytest.approx(float(aux["z_loss"]), rel=1e-5)
  assert float(m["moe/dropped_frac"]) == 0.0  # dropless
  assert not np.allclose(np.asarray(mlp["w_in"]), mlp0["w_in"])  # while the experts did train


def test_flops_count_the_k_active_experts_and_the_shared_one():
  cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, n_experts=4,
                    experts_per_token=2, moe_d_ff=24, n_shared_experts=1)
  # Per layer: attention 4·16·16 = 1024, norms 2·16, router 16·4 = 64, experts 4·3·16·24 = 4608,
  # shared 3·16·24 = 1152 → 6880; + final norm 16 + tied table 32·16 = 512.
  assert count_params(cfg)["total"] == count_model_params(cfg) == 2 * 6880 + 16 + 512 == 14_288
  # Active: 2 of the 4 experts, so 2 · 3 · 16 · 24 = 2304 fewer per layer.
  assert active_params(cfg) == 14_288 - 2 * 2304 == 9_680
  assert flops.flops_per_token(cfg, 32) == 6 * 9_680 + 12 * 2 * 2 * 8 * 32  # PaLM: 6N_active + 12·L·H·Q·T
  # Chinchilla MLP term: router logits 2·16·4, then (k + shared) = 3 experts of 2·3·16·24, per layer.
  assert flops.chinchilla_flops_breakdown(cfg, 32)["mlp"] == 2 * (2 * 16 * 4 + 3 * 2 * 3 * 16 * 24)
  dense = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=24)
  assert active_params(dense) == count_params(dense)["non_embedding"]


# ------------------------------------------------------------------ expert parallelism

_batch = packed_batch


def _train(data, expert, steps=3):
  run = train_on_mesh(dict(data=data, expert=expert), preset="tiny,moe,smoke", steps=steps)
  return run["losses"], run["params"], run["state"], run["metrics"]


def test_expert_parallel_mesh_matches_one_device():
  ref_losses, ref_params, _, ref_m = _train(1, 1)
  losses, params, state, m = _train(2, 4)  # 4 expert × 2 data
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for k in ("moe/aux_loss", "moe/z_loss", "moe/dropped_frac"):
    assert float(m[k]) == pytest.approx(float(ref_m[k]), rel=1e-5, abs=1e-7), k
  assert 0 < float(m["moe/dropped_frac"]) < 0.5  # capacity factor 1.25 drops a few
  # The layout is really expert-parallel: each device holds 2 of the 8 experts.
  w_in = state["params"]["blocks"]["mlp"]["w_in"]
  assert w_in.sharding.spec == P(None, "expert", None, None)
  assert w_in.addressable_shards[0].data.shape[1] == 2


# ------------------------------------------------------------------ preset through the CLI entry point

def test_moe_smoke_preset_trains_through_python_m_train(tmp_path):
  from train.__main__ import main
  from train.metrics import read_metrics
  src = shared_data() / "text" / "tinyshakespeare.txt"
  require(src.exists(), f"shared data not found at {src} (set SHARED_DATA)")
  corpus = tmp_path / "shakespeare.jsonl"
  with open(corpus, "w") as f:
    for i, p in enumerate(p for p in src.read_text().split("\n\n") if p.strip()):
      f.write(json.dumps({"id": f"p{i}", "text": p}) + "\n")
  run_dir = tmp_path / "run"
  rc = main(["--config=configs/lm.py:tiny,moe,smoke", f"--config.data.sources=text={corpus}",
             f"--config.run.dir={run_dir}", f"--config.data.cache_dir={tmp_path / 'cache'}",
             "--config.mesh.expert=4", "--config.train.progress=false", "--config.checkpoint.every=0",
             "--config.train.log_every=1", "--config.train.eval_every=20", "--config.sample.max_new_tokens=4"])
  assert rc == 0
  rows = [r for r in read_metrics(run_dir) if "loss" in r]
  assert rows[-1]["step"] == 20 and rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
  for k in ("moe/aux_loss", "moe/z_loss", "moe/dropped_frac"):
    assert all(math.isfinite(r[k]) for r in rows), k
  assert 0.9 < rows[-1]["moe/aux_loss"] < 2.0  # ~1 balanced; E = 8 at worst
  cfg = json.loads((run_dir / "config.json").read_text())
  assert cfg["model"]["n_experts"] == 8 and cfg["mesh"]["expert"] == 4
