"""align/losses.py against arithmetic written out by hand (math.log/exp on 2-3 pairs), plain Python
loops (GAE), Monte Carlo (KL estimators) and jax.grad (PPO clipping, finite gradients everywhere).

    python -m pytest tests/test_align_losses.py -x -q
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax

from align import losses as L


def log_sigmoid(x: float) -> float:
  return -math.log1p(math.exp(-x))


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# Three pairs: summed response log-probs under policy and reference, and response lengths.
PC, PR = [-10.0, -12.0, -8.0], [-11.0, -9.0, -8.5]
RC, RR = [-10.5, -11.0, -9.0], [-10.0, -10.0, -8.0]
LC, LR = [4.0, 6.0, 2.0], [5.0, 3.0, 2.0]
# KTO's mismatched rows (prompt i with reply i+1): policy and reference summed log-probs.
PKL, RKL = [-20.0, -15.0, -18.0], [-21.0, -15.5, -17.9]  # mean log-ratio (1.0 + 0.5 − 0.1) / 3 = 0.4667
BATCH = {"policy_chosen": jnp.array(PC), "policy_rejected": jnp.array(PR), "ref_chosen": jnp.array(RC),
         "ref_rejected": jnp.array(RR), "chosen_len": jnp.array(LC), "rejected_len": jnp.array(LR),
         "policy_kl": jnp.array(PKL), "ref_kl": jnp.array(RKL)}
# h_i = (pc - rc) - (pr - rr): 0.5 - (-1.0) = 1.5; -1.0 - 1.0 = -2.0; 1.0 - (-0.5) = 1.5
H = [1.5, -2.0, 1.5]


# ------------------------------------------------------------------------------------------------
# log-probs


def test_token_logps_matches_log_softmax_in_fp32():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, size=(2, 3))
  want = np.take_along_axis(log_softmax(logits.astype(np.float64), -1), targets[..., None], -1)[..., 0]
  got = L.token_logps(jnp.asarray(logits), jnp.asarray(targets))
  assert got.dtype == jnp.float32 and got.shape == (2, 3)
  close(got, want)
  # bf16 logits are upcast before the logsumexp.
  assert L.token_logps(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets)).dtype == jnp.float32
  mask = np.array([[1, 1, 0], [0, 1, 1]])
  total, count = L.sequence_logps(got, jnp.asarray(mask))
  close(total, [want[0, 0] + want[0, 1], want[1, 1] + want[1, 2]])
  close(count, [2, 2])


# ------------------------------------------------------------------------------------------------
# paired preference losses


def test_dpo_equals_minus_log_sigmoid_beta_h():
  beta = 0.1
  want = sum(-log_sigmoid(beta * h) for h in H) / 3  # -log σ(0.15), -log σ(-0.2), -log σ(0.15)
  loss, m = L.preference_loss("dpo", BATCH, beta=beta)
  close(loss, want)
  close(m["rewards/chosen"], beta * (0.5 - 1.0 + 1.0) / 3)
  close(m["rewards/rejected"], beta * (-1.0 + 1.0 - 0.5) / 3)
  close(m["rewards/accuracy"], 2 / 3)  # pair 2 prefers the rejected response
  close(m["rewards/margin"], beta * (1.5 - 2.0 + 1.5) / 3)
  # ε = 0 cDPO is exactly DPO.
  close(L.dpo_loss(BATCH, beta=beta, label_smoothing=0.0)[0], want)


def test_cdpo_label_smoothing():
  beta, eps = 0.5, 0.1
  want = sum(-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in H) / 3
  close(L.preference_loss("dpo", BATCH, beta=beta, label_smoothing=eps)[0], want)
  assert abs(want - sum(-log_sigmoid(beta * h) for h in H) / 3) > 1e-2  # the smoothing matters here


def test_robust_dpo_reduces_to_dpo_and_matches_formula():
  beta = 0.5
  close(L.preference_loss("robust", BATCH, beta=beta, label_smoothing=0.0)[0],
        sum(-log_sigmoid(beta * h) for h in H) / 3)
  eps = 0.2
  want = sum(((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps)
             for h in H) / 3
  close(L.preference_loss("robust", BATCH, beta=beta, label_smoothing=eps)[0], want)
  with pytest.raises(ValueError, match="label_smoothing"):
    L.preference_loss("robust", BATCH, label_smoothing=0.5)


def test_ipo_summed_and_length_averaged():
  tau = 0.1  # target 1/(2τ) = 5
  close(L.preference_loss("ipo", BATCH, tau=tau, ipo_average=False)[0],
        ((1.5 - 5) ** 2 + (-2.0 - 5) ** 2 + (1.5 - 5) ** 2) / 3)
  # averaged: chosen ratios (0.5, -1, 1) / (4, 6, 2), rejected ratios (-1, 1, -0.5) / (5, 3, 2)
  h = [0.5 / 4 + 1 / 5, -1 / 6 - 1 / 3, 1 / 2 + 0.5 / 2]
  loss, m = L.preference_loss("ipo", BATCH, tau=tau)
  close(loss, sum((x - 5) ** 2 for x in h) / 3)
  close(m["rewards/chosen"], tau * (0.5 / 4 - 1 / 6 + 1 / 2) / 3)


def test_simpo_without_reference():
  beta, gamma = 2.0, 1.0
  batch = {"policy_chosen": BATCH["policy_chosen"], "policy_rejected": BATCH["policy_rejected"],
           "chosen_len": BATCH["chosen_len"], "rejected_len": BATCH["rejected_len"]}
  # β·avg logp: chosen (-10/4, -12/6, -8/2)·2 = (-5, -4, -8); rejected (-11/5, -9/3, -8.5/2)·2
  chosen, rejected = [-5.0, -4.0, -8.0], [-4.4, -6.0, -8.5]
  want = sum(-log_sigmoid(c - r - gamma) for c, r in zip(chosen, rejected)) / 3
  loss, m = L.preference_loss("simpo", batch, beta=beta, gamma=gamma)
  close(loss, want)
  close(m["rewards/chosen"], sum(chosen) / 3)
  close(m["rewards/accuracy"], 2 / 3)  # -5 < -4.4; -4 > -6; -8 > -8.5


def _log_odds(avg: float) -> float:
  return avg - math.log(-math.expm1(avg))  # float64: log p - log(1 - p)


def test_orpo_value():
  lam = 0.1
  avg_w, avg_l = [-10 / 4, -12 / 6, -8 / 2], [-11 / 5, -9 / 3, -8.5 / 2]
  want = sum(-w + lam * -log_sigmoid(_log_odds(w) - _log_odds(l)) for w, l in zip(avg_w, avg_l)) / 3
  loss, m = L.preference_loss("orpo", {k: v for k, v in BATCH.items() if not k.startswith("ref")}, lam=lam)
  close(loss, want)
  close(m["orpo/nll"], -sum(avg_w) / 3)
  # An explicit per-token NLL replaces −avg log p(y_w).
  nll = jnp.array([1.0, 2.0, 3.0])
  close(L.orpo_loss(dict(BATCH, chosen_nll=nll), lam=lam)[0], want + 2.0 + sum(avg_w) / 3)


def test_orpo_log_odds_stable_as_p_goes_to_one():
  logps = np.array([-1e-9, -1e-7, -1e-4, -0.1, -0.69, -0.7, -1.0, -5.0, -20.0, -50.0])
  got = L.log1mexp(jnp.asarray(logps, jnp.float32))
  want = [math.log(-math.expm1(x)) for x in logps]
  close(got, want, tol=2e-5)
  n = len(logps)
  batch = {"policy_chosen": jnp.asarray(logps, jnp.float32), "policy_rejected": jnp.full((n,), -1.0),
               "chosen_len": jnp.ones(n), "rejected_len": jnp.ones(n)}

  def per_pair(pc):
    return L.orpo_loss(dict(batch, policy_chosen=pc))[0] * n

  loss, grads = jax.jit(jax.value_and_grad(per_pair))(batch["policy_chosen"])
  assert np.isfinite(float(loss)) and np.all(np.isfinite(grads)), grads
  want = sum(-x + 0.1 * -log_sigmoid(_log_odds(x) - _log_odds(-1.0)) for x in logps)
  close(loss, want, tol=1e-4)
  # Also finite when the rejected response is the near-certain one, and at log p = 0 exactly.
  flipped = dict(batch, policy_chosen=jnp.full((n,), -1.0), policy_rejected=jnp.asarray(logps))
  flipped["policy_rejected"] = flipped["policy_rejected"].at[0].set(0.0)
  g = jax.grad(lambda b: L.orpo_loss(b)[0])(flipped)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(g))
  assert np.isfinite(float(L.orpo_loss(flipped)[0]))


def test_preference_loss_errors_name_the_problem():
  with pytest.raises(ValueError, match="unknown preference loss 'dpp'"):
    L.preference_loss("dpp", BATCH)
  with pytest.raises(ValueError, match=r"unknown: \['tau'\]"):
    L.preference_loss("dpo", BATCH, tau=0.1)
  with pytest.raises(ValueError, match="needs batch\\['ref_chosen'\\]"):
    L.preference_loss("dpo", {"policy_chosen": BATCH["policy_chosen"],
                                  "policy_rejected": BATCH["policy_rejected"]})
  with pytest.raises(ValueError, match="policy_chosn"):
    L.preference_loss("dpo", dict(BATCH, policy_chosn=BATCH["policy_chosen"]))
  assert L.preference_hparams("simpo") == {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.0}
  assert set(L.preference_hparams("orpo")) == {"lam"}


def test_preference_losses_jit_and_reference_is_frozen():
  for name in L.PREFERENCE_LOSSES:
    loss, metrics = jax.jit(lambda b, name=name: L.preference_loss(name, b))(BATCH)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
    grads = jax.jit(jax.grad(lambda b, name=name: L.preference_loss(name, b)[0]))(BATCH)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(grads)), name
    assert np.all(grads["ref_chosen"] == 0) and np.all(grads["ref_rejected"] == 0), name
    assert np.any(grads["policy_chosen"] != 0), name


# ------------------------------------------------------------------------------------------------
# KTO


def test_kto_on_pairs_hand_computed():
  """Registered `kto`: chosen desirable, rejected undesirable, z0 = max(0, mean(policy_kl − ref_kl))."""
  beta, ld, lu = 0.1, 1.0, 1.33
  sig = lambda x: 1 / (1 + math.exp(-x))
  z0 = max(0.0, sum(p - r for p, r in zip(PKL, RKL)) / 3)
  rc = [p - r for p, r in zip(PC, RC)]  # 0.5, -1.0, 1.0
  rr = [p - r for p, r in zip(PR, RR)]  # -1.0, 1.0, -0.5
  want = (sum(ld - ld * sig(beta * (r - z0)) for r in rc) + sum(lu - lu * sig(beta * (z0 - r)) for r in rr)) / 6
  loss, m = L.preference_loss("kto", BATCH, beta=beta, lambda_d=ld, lambda_u=lu)
  close(loss, want)
  close(m["kto/kl_ref_point"], z0)
  close(m["rewards/accuracy"], 2 / 3)  # h = 1.5, -2.0, 1.5
  assert L.preference_hparams("kto") == {"beta": 0.1, "lambda_d": 1.0, "lambda_u": 1.0}
  # z0 is clipped at 0 and detached: no gradient reaches the mismatched rows.
  g = jax.grad(lambda b: L.preference_loss("kto", b)[0])(BATCH)
  assert np.all(g["policy_kl"] == 0) and np.all(g["ref_kl"] == 0) and np.all(g["ref_chosen"] == 0)
  assert np.all(np.asarray(g["policy_chosen"]) < 0) and np.all(np.asarray(g["policy_rejected"]) > 0)
  with pytest.raises(ValueError, match="needs batch\\['policy_kl'\\]"):
    L.preference_loss("kto", {k: v for k, v in BATCH.items() if k != "policy_kl"})


def test_whiten_over_masked_tokens():
  x = jnp.array([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -7.0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
  valid = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
  want = np.zeros((2, 4))
  want[0, :3] = (valid[:3] - valid.mean()) / valid.std()
  want[1, :2] = (valid[3:] - valid.mean()) / valid.std()
  close(L.whiten(x, mask), want)


def test_kto_both_branches_and_detached_reference_point():
  beta, ld, lu, z0 = 0.5, 1.0, 1.5, 0.3
  policy, ref = [-5.0, -7.0, -6.0], [-6.0, -6.5, -6.0]  # r = 1.0, -0.5, 0.0
  desirable = [True, False, False]
  sig = lambda x: 1 / (1 + math.exp(-x))
  want = ((ld - ld * sig(beta * (1.0 - z0))) + (lu - lu * sig(beta * (z0 + 0.5)))
          + (lu - lu * sig(beta * (z0 - 0.0)))) / 3
  args = (jnp.array(policy), jnp.array(ref), jnp.array(desirable), jnp.float32(z0))
  loss, m = L.kto_loss(*args, beta=beta, lambda_d=ld, lambda_u=lu)
  close(loss, want)
  close(m["rewards/chosen"], beta * 1.0)
  close(m["rewards/rejected"], beta * (-0.5 + 0.0) / 2)
  g = jax.grad(lambda p, r, z: L.kto_loss(p, r, args[2], z, beta=beta)[0], argnums=(0, 1, 2))(
      args[0], args[1], args[3])
  assert g[0][0] < 0 and g[0][1] > 0  # push desirable up, undesirable down
  assert np.all(g[1] == 0) and float(g[2]) == 0.0

  # z0 = max(0, mean(policy − ref)) over mismatched pairs, detached.
  close(L.kto_kl_estimate(jnp.array([-3.0, -4.0]), jnp.array([-3.5, -4.1])), (0.5 + 0.1) / 2)
  close(L.kto_kl_estimate(jnp.array([-3.0, -4.0]), jnp.array([-2.0, -4.1])), 0.0)
  assert float(jax.grad(lambda p: L.kto_kl_estimate(p, jnp.array([-3.5, -4.1])))(
      jnp.array([-3.0, -4.0])).sum()) == 0.0


# ------------------------------------------------------------------------------------------------
# reward model


def test_bradley_terry_with_and_without_margin():
  rc, rr, margin = [2.0, -1.0, 0.5], [1.0, 0.5, 0.5], [1.0, 0.0, 2.0]
  loss, m = L.bradley_terry_loss(jnp.array(rc), jnp.array(rr))
  close(loss, (-log_sigmoid(1.0) - log_sigmoid(-1.5) - log_sigmoid(0.0)) / 3)
  close(m["rewards/accuracy"], 1 / 3)  # ties count as wrong
  close(m["rewards/margin"], (1.0 - 1.5 + 0.0) / 3)
  loss_m, _ = L.bradley_terry_loss(jnp.array(rc), jnp.array(rr), jnp.array(margin))
  close(loss_m, (-log_sigmoid(0.0) - log_sigmoid(-1.5) - log_sigmoid(-2.0)) / 3)
  g = jax.grad(lambda a, b: L.bradley_terry_loss(a, b, jnp.array(margin))[0], argnums=(0, 1))(
      jnp.array(rc), jnp.array(rr))
  assert np.all(np.asarray(g[0]) < 0) and np.all(np.asarray(g[1]) > 0)


# ------------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimators_on_numbers():
  logp, ref = jnp.array([-1.0, -2.0, -0.5]), jnp.array([-1.5, -1.0, -0.5])  # r = ref - logp: -0.5, 1, 0
  close(L.kl_penalty(logp, ref, "k1"), [0.5, -1.0, 0.0])
  close(L.kl_penalty(logp, ref, "k2"), [0.125, 0.5, 0.0])
  close(L.kl_penalty(logp, ref, "k3"), [math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1, 0.0])
  with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
    L.kl_penalty(logp, ref, "k4")
  # k3 ≥ 0 everywhere, including |r| ~ 1e-4 where exp(r) − 1 − r rounds below 0 in fp32, and huge |r|.
  r = jnp.concatenate([jnp.linspace(-1e-3, 1e-3, 20001), jnp.linspace(-200.0, 200.0, 4001)])
  k3 = L.kl_penalty(jnp.zeros_like(r), r, "k3")
  assert np.all(np.isfinite(k3)) and float(k3.min()) >= 0.0
  g = jax.grad(lambda x: L.kl_penalty(x, r, "k3").sum())(jnp.zeros_like(r))
  assert np.all(np.isfinite(g))


def test_kl_estimators_monte_carlo():
  # KL(p‖q) for two categoricals, estimated from samples of p (the policy).
  p, q = np.array([0.5, 0.3, 0.15, 0.05]), np.array([0.25, 0.25, 0.25, 0.25])
  kl = float(np.sum(p * np.log(p / q)))
  x = np.random.default_rng(0).choice(4, size=200_000, p=p)
  logp, ref = jnp.asarray(np.log(p)[x], jnp.float32), jnp.asarray(np.log(q)[x], jnp.float32)
  for kind in ("k1", "k3"):  # both unbiased
    est = np.asarray(L.kl_penalty(logp, ref, kind), np.float64)
    assert abs(est.mean() - kl) < 4 * est.std() / math.sqrt(len(est)) + 1e-4, (kind, est.mean(), kl)
  # k3 has lower variance than k1 here (Schulman 2020's point).
  assert np.var(np.asarray(L.kl_penalty(logp, ref, "k3"))) < np.var(np.asarray(L.kl_penalty(logp, ref, "k1")))


# ------------------------------------------------------------------------------------------------
# GAE


def gae_reference(rewards, values, mask, gamma, lam, bootstrap):
  """Plain backwards loop over the valid tokens of each sequence; padding gets 0."""
  b, t = rewards.shape
  adv = np.zeros((b, t))
  for i in range(b):
    next_v, next_a = bootstrap[i], 0.0
    for j in reversed(range(t)):
      if not mask[i, j]:
        continue
      delta = rewards[i, j] + gamma * next_v - values[i, j]
      next_a = delta + gamma * lam * next_a
      adv[i, j] = next_a
      next_v = values[i, j]
  return adv, (adv + values) * mask


def test_gae_matches_python_loop_with_padding():
  rng = np.random.default_rng(1)
  rewards, values = rng.normal(size=(3, 6)), rng.normal(size=(3, 7))
  # full, padded after the end, a masked hole
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 1, 0]], np.float32)
  gamma, lam = 0.9, 0.8
  # [B, T+1] values: the last column bootstraps.
  adv, ret = L.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
  want_adv, want_ret = gae_reference(rewards, values[:, :6], mask, gamma, lam, values[:, 6])
  close(adv, want_adv)
  close(ret, want_ret)
  assert np.all(np.asarray(adv)[mask == 0] == 0)
  # [B, T] values: terminal (0) unless last_value is given.
  adv0, _ = L.gae(jnp.asarray(rewards), jnp.asarray(values[:, :6]), jnp.asarray(mask), gamma, lam)
  close(adv0, gae_reference(rewards, values[:, :6], mask, gamma, lam, np.zeros(3))[0])
  adv1, _ = L.gae(jnp.asarray(rewards), jnp.asarray(values[:, :6]), jnp.asarray(mask), gamma, lam,
                  last_value=jnp.asarray(values[:, 6]))
  close(adv1, want_adv)
  # Hand check on one short sequence, γ = λ = 1: A_t = Σ_{k≥t} r_k − V_t.
  a, _ = L.gae(jnp.array([[1.0, 0.0, 2.0]]), jnp.array([[0.5, 0.25, 1.0]]), jnp.ones((1, 3)), 1.0, 1.0)
  close(a, [[3.0 - 0.5, 2.0 - 0.25, 2.0 - 1.0]])
  with pytest.raises(ValueError, match="values must be"):
    L.gae(jnp.zeros((2, 3)), jnp.zeros((2, 5)), jnp.ones((2, 3)))


# ------------------------------------------------------------------------------------------------
# PPO


def test_ppo_clip_gradients_and_value():
  # ratios: 1.5 (A>0: clipped), 0.5 (A<0: clipped), 1.5 (A<0: not clipped), 0.5 (A>0: not clipped), 1.1
  ratio = np.array([1.5, 0.5, 1.5, 0.5, 1.1])
  adv = jnp.array([[1.0, -1.0, -2.0, 3.0, 2.0]])
  old = jnp.full((1, 5), -2.0)
  logp = old + jnp.log(jnp.asarray(ratio))[None]
  mask = jnp.ones((1, 5))
  loss, m = L.ppo_policy_loss(logp, old, adv, mask, clip_low=0.2)
  per_token = [-1.2 * 1.0, 0.8 * 1.0, 1.5 * 2.0, -0.5 * 3.0, -1.1 * 2.0]
  close(loss, sum(per_token) / 5)
  close(m["policy/clip_frac"], 2 / 5)
  close(m["policy/approx_kl"], np.mean(ratio - 1 - np.log(ratio)))
  g = np.asarray(jax.grad(lambda x: L.ppo_policy_loss(x, old, adv, mask)[0])(logp))[0]
  assert g[0] == 0 and g[1] == 0  # outside the clip range on the side the advantage pushes: no gradient
  close(g[2:], [2.0 * 1.5 / 5, -3.0 * 0.5 / 5, -2.0 * 1.1 / 5])  # d(−ρA)/dlogp = −ρA
  # Padding contributes nothing.
  padded = jnp.concatenate([logp, jnp.zeros((1, 2))], 1)
  close(L.ppo_policy_loss(padded, jnp.concatenate([old, jnp.zeros((1, 2))], 1),
                          jnp.concatenate([adv, jnp.full((1, 2), 9.0)], 1),
                          jnp.concatenate([mask, jnp.zeros((1, 2))], 1))[0], sum(per_token) / 5)


def test_ppo_asymmetric_clip_higher():
  old = jnp.zeros((1, 2))
  logp = jnp.log(jnp.array([[1.25, 0.75]]))
  adv = jnp.array([[1.0, -1.0]])
  mask = jnp.ones((1, 2))

  def grads(**kw):
    return np.asarray(jax.grad(lambda x: L.ppo_policy_loss(x, old, adv, mask, **kw)[0])(logp))[0]

  sym, asym = grads(clip_low=0.2), grads(clip_low=0.2, clip_high=0.28)
  assert sym[0] == 0 and sym[1] == 0  # 1.25 > 1.2 and 0.75 < 0.8: both clipped
  assert asym[0] < 0 and asym[1] == 0  # 1.25 < 1.28 now learns; the low side is still clipped at 0.8
  loss, m = L.ppo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
  close(loss, (-1.25 + 0.8) / 2)
  close(m["policy/clip_frac"], 0.5)


def test_value_loss_clipped():
  values = jnp.array([[1.0, 2.0, 0.0]])
  old = jnp.array([[0.5, 2.0, 0.0]])
  returns = jnp.array([[2.0, 0.0, 1.0]])
  mask = jnp.array([[1.0, 1.0, 0.0]])
  # token 0: clipped value 0.7 → max((1-2)², (0.7-2)²) = 1.69; token 1: unchanged → max(4, 4) = 4
  loss, m = L.value_loss(values, old, returns, mask, clip=0.2)
  close(loss, 0.5 * (1.69 + 4.0) / 2)
  close(m["value/clip_frac"], 0.5)
  close(L.value_loss(values, old, returns, mask, clip=None)[0], 0.5 * (1.0 + 4.0) / 2)
  g = np.asarray(jax.grad(lambda v: L.value_loss(v, old, returns, mask)[0])(values))[0]
  assert g[0] == 0 and g[1] != 0 and g[2] == 0  # token 0 is on the clipped branch; token 2 is padding


# ------------------------------------------------------------------------------------------------
# GRPO


def test_grpo_advantages_std_and_none():
  r = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]  # 2 groups of 4
  mean2 = 0.75
  std1 = math.sqrt(4 * 0.25 / 3)  # ddof = 1
  std2 = math.sqrt((3 * 0.0625 + 0.5625) / 3)
  want = [(x - 0.5) / (std1 + 1e-6) for x in r[:4]] + [(x - mean2) / (std2 + 1e-6) for x in r[4:]]
  close(L.grpo_advantages(jnp.array(r), 4), want)
  close(L.grpo_advantages(jnp.array(r).reshape(2, 4), 4), np.reshape(want, (2, 4)))
  close(L.grpo_advantages(jnp.array(r), 4, scale="none"), [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, -0.75, 0.25])
  # identical rewards: exactly zero, no NaN, even for a value whose mean rounds in fp32
  for value in (1.0, 0.3, 1e4 / 3):
    a = np.asarray(L.grpo_advantages(jnp.full((8,), value), 8))
    assert np.all(a == 0), (value, a)
  with pytest.raises(ValueError, match="groups of 3"):
    L.grpo_advantages(jnp.zeros(8), 3)
  with pytest.raises(ValueError, match="scale"):
    L.grpo_advantages(jnp.zeros(8), 4, scale="mad")


def test_aggregation_modes_on_ragged_mask():
  x = jnp.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.0, 5.0]])
  mask = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], jnp.float32)  # 4, 1 and 0 tokens
  # GRPO: per-sequence means 2.5 and 10; the empty sequence is left out of the mean.
  close(L.aggregate(x, mask, "seq_mean_token_mean"), (2.5 + 10.0) / 2)
  close(L.aggregate(x, mask, "token_mean"), (10.0 + 10.0) / 5)  # DAPO
  close(L.aggregate(x, mask, "seq_mean_token_sum_norm", max_len=8), (10 / 8 + 10 / 8 + 0) / 3)  # Dr.GRPO
  close(L.aggregate(x, mask, "seq_mean_token_sum_norm"), (10 / 4 + 10 / 4 + 0) / 3)  # max_len = T
  with pytest.raises(ValueError, match="unknown aggregation"):
    L.aggregate(x, mask, "sum")


def test_grpo_loss_by_hand():
  old = jnp.array([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
  logp = old + jnp.log(jnp.array([[1.1, 1.5, 1.0], [0.9, 1.0, 1.0]]))
  ref = jnp.array([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
  adv = jnp.array([1.0, -0.5])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]], jnp.float32)
  beta = 0.04
  k3 = lambda ratio: 1 / ratio - 1 + math.log(ratio)  # r = ref − logp = −log ratio
  seq0 = [-1.1 + beta * k3(1.1), -1.2 + beta * k3(1.5), -1.0]  # 1.5 clipped at 1.2 (A > 0)
  seq1 = [0.5 * 0.9 + beta * k3(0.9), 0.5]  # 0.9 inside [0.8, 1.2]
  loss, m = L.grpo_loss(logp, old, ref, adv, mask, beta_kl=beta)
  close(loss, (sum(seq0) / 3 + sum(seq1) / 2) / 2)
  close(m["kl"], (k3(1.1) + k3(1.5) + k3(0.9)) / 5)
  close(m["policy/clip_frac"], 1 / 5)
  # DAPO-style: token mean, clip-higher, no KL and no reference.
  loss_dapo, m = L.grpo_loss(logp, old, None, adv, mask, beta_kl=0.0, clip_high=0.28,
                             aggregation="token_mean")
  close(loss_dapo, (-1.1 - 1.28 - 1.0 + 0.45 + 0.5) / 5)
  assert "kl" not in m
  with pytest.raises(ValueError, match="ref_logp"):
    L.grpo_loss(logp, old, None, adv, mask)
  # old_logp=None: ratio 1, gradient −A / n_tokens per token (seq mean then batch mean).
  g = np.asarray(jax.grad(lambda x: L.grpo_loss(x, None, None, adv, mask, beta_kl=0.0)[0])(logp))
  close(g, [[-1 / 6] * 3, [0.5 / 4, 0.5 / 4, 0.0]])


# ------------------------------------------------------------------------------------------------
# gradients finite everywhere


def test_gradients_finite_through_every_loss():
  rng = np.random.default_rng(2)
  b, t = 4, 5
  logp = jnp.asarray(-rng.exponential(3.0, size=(b, t)), jnp.float32).at[0, 0].set(-60.0).at[1, 1].set(0.0)
  old = logp + jnp.asarray(rng.normal(0, 3.0, size=(b, t)), jnp.float32)  # ratios far outside the clip
  ref = logp + jnp.asarray(rng.normal(0, 30.0, size=(b, t)), jnp.float32)  # k3 needs the ±20 clip here
  mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], jnp.float32)
  adv_tok = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)
  adv_seq = L.grpo_advantages(jnp.array([1.0, 1.0, 0.0, 1.0]), 2)
  seq, n = L.sequence_logps(logp, mask)
  pairs = {"policy_chosen": seq[:2] * 50, "policy_rejected": seq[2:] * 50, "ref_chosen": seq[:2] * 0.1,
           "ref_rejected": seq[2:] * 0.1, "chosen_len": n[:2], "rejected_len": n[2:]}

  fns = {name: (lambda x, name=name: L.preference_loss(
      name, dict(pairs, policy_chosen=pairs["policy_chosen"] + x[0, :2],
                 policy_rejected=pairs["policy_rejected"] + x[1, :2]))[0]) for name in L.PREFERENCE_LOSSES}
  fns.update({
      "token_logps": lambda x: L.token_logps(jnp.stack([x, x * 2], -1) * 30, jnp.ones((b, t), int)).sum(),
      "kto": lambda x: L.kto_loss(x.sum(1), ref.sum(1), jnp.array([1, 0, 1, 0], bool),
                                  L.kto_kl_estimate(x[::-1].sum(1), ref.sum(1)))[0],
      "bradley_terry": lambda x: L.bradley_terry_loss(x[:, 0] * 100, x[:, 1], x[:, 2])[0],
      "kl_k1": lambda x: L.kl_penalty(x, ref, "k1").sum(),
      "kl_k2": lambda x: L.kl_penalty(x, ref, "k2").sum(),
      "kl_k3": lambda x: L.kl_penalty(x, ref, "k3").sum(),
      "ppo": lambda x: L.ppo_policy_loss(x, old, adv_tok, mask, clip_high=0.28)[0],
      "value": lambda x: L.value_loss(x, old, ref, mask)[0],
      "gae": lambda x: L.gae(x, jnp.pad(x, ((0, 0), (0, 1))), mask, 0.99, 0.95)[0].sum(),
      "grpo_advantages": lambda x: L.grpo_advantages(x[:, 0], 2).sum(),
  })
  for mode in L.AGGREGATIONS:
    fns[f"grpo_{mode}"] = lambda x, mode=mode: L.grpo_loss(x, old, ref, adv_seq, mask, aggregation=mode)[0]
  for name, fn in fns.items():
    value, grad = jax.jit(jax.value_and_grad(fn))(logp)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad))), name
