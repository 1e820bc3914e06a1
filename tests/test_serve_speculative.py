"""Speculative decoding (serve/speculative.py): the acceptance rule, greedy parity with the dense sampler,
and the output distribution against the target's exact one (chi-square), including a wrong rule it catches."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from conftest import random_transformer
from model.config import ModelConfig
from serve.speculative import (acceptance_probability, draw, residual, speculative_generate, token_probs,
                               verify)
from train.sample import generate_ids

TARGET = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96,
                     compute_dtype="float32", init_std=0.3)  # std 0.3: peaked, non-uniform next-token laws.
DRAFT = ModelConfig(vocab_size=61, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=96,
                    compute_dtype="float32", init_std=0.3, scan_layers=False)  # list caches on this side.


build = random_transformer


@pytest.fixture(scope="module")
def target():
  return build(TARGET, 0)


def chi_square_p(observed: np.ndarray, probs: np.ndarray) -> float:
  """p-value of observed counts against exact probabilities; cells with expectation < 5 are pooled
  (the usual validity condition of the chi-square approximation), zero-probability cells left out."""
  observed, probs = observed.ravel().astype(np.float64), np.asarray(probs, np.float64).ravel()
  probs = probs / probs.sum()
  expected = observed.sum() * probs
  big, small = expected >= 5, (expected < 5) & (probs > 0)
  obs, exp = observed[big], expected[big]
  if expected[small].sum() > 0:
    obs, exp = np.append(obs, observed[small].sum()), np.append(exp, expected[small].sum())
  return float(stats.chisquare(obs, exp).pvalue)


# ------------------------------------------------------------------ the rule on hand-made vectors

def test_acceptance_probability_and_residual_by_hand():
  p = jnp.array([0.5, 0.3, 0.2, 0.0])
  q = jnp.array([0.2, 0.3, 0.25, 0.25])
  np.testing.assert_allclose(acceptance_probability(p, q), [1.0, 1.0, 0.8, 0.0], rtol=1e-6)
  # max(0, p − q) = [0.3, 0, 0, 0]: a rejection can only resample the token the draft under-proposes.
  np.testing.assert_allclose(residual(p, q), [1.0, 0.0, 0.0, 0.0], rtol=1e-6)
  p2, q2 = jnp.array([0.1, 0.6, 0.3]), jnp.array([0.4, 0.2, 0.4])
  np.testing.assert_allclose(residual(p2, q2), [0.0, 1.0, 0.0], atol=1e-7)
  np.testing.assert_allclose(residual(q2, p2), [0.75, 0.0, 0.25], rtol=1e-6)  # [0.3, 0, 0.1] / 0.4
  assert np.all(np.isfinite(residual(p, p)))  # p == q: empty residual, never NaN.


def test_accept_or_resample_reproduces_p_exactly():
  # Leviathan et al. Thm 3.5: q(x)·min(1, p/q) + P(reject)·residual(x) = p(x) for any p, q.
  rng = np.random.default_rng(0)
  for _ in range(20):
    p, q = rng.dirichlet(np.ones(7) * 0.5), rng.dirichlet(np.ones(7) * 0.5)
    keep = q * np.asarray(acceptance_probability(jnp.asarray(p), jnp.asarray(q)))
    total = keep + (1 - keep.sum()) * np.asarray(residual(jnp.asarray(p), jnp.asarray(q)))
    np.testing.assert_allclose(total, p, atol=1e-6)


def test_verify_samples_resample_and_bonus_from_the_right_laws():
  # k = 1 over many identical rows: the first token is ~p_1 (kept draft or resample), and after a keep
  # the bonus token is ~p_2; the keep rate is Σ min(p_1, q_1).
  batch, v = 40_000, 6
  p1, p2 = jnp.array([0.05, 0.4, 0.1, 0.25, 0.2, 0.0]), jnp.array([0.3, 0.0, 0.1, 0.1, 0.2, 0.3])
  q1 = jnp.array([0.3, 0.1, 0.1, 0.1, 0.2, 0.2])
  p = jnp.broadcast_to(jnp.stack([p1, p2]), (batch, 2, v))
  q = jnp.broadcast_to(q1, (batch, 1, v))
  proposed = draw(q, jax.random.PRNGKey(1))
  accepted, nxt = jax.jit(verify)(p, q, proposed, jax.random.PRNGKey(2))
  accepted, nxt, proposed = np.asarray(accepted), np.asarray(nxt), np.asarray(proposed[:, 0])
  first = np.where(accepted == 1, proposed, nxt)
  assert chi_square_p(np.bincount(first, minlength=v), np.asarray(p1)) > 0.01
  assert np.sum(first == 5) == 0  # p_1(5) = 0: never emitted though the draft proposes it 20% of the time.
  assert chi_square_p(np.bincount(nxt[accepted == 1], minlength=v), np.asarray(p2)) > 0.01
  assert abs(accepted.mean() - float(jnp.minimum(p1, q1).sum())) < 0.01  # 0.6, ~0.0025 std error.


def test_stale_cache_slots_beyond_the_position_are_invisible(target):
  # What speculative decoding relies on after a partial acceptance: slots past the query's position
  # (rejected tokens' k/v) don't change the logits at that position, whatever they hold.
  graphdef, params = nnx.split(target, nnx.Param)

  @jax.jit
  def run(params, noise):
    model = nnx.merge(graphdef, params)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 7)), jnp.int32)
    _, cache = model.decode(prompt, positions=jnp.broadcast_to(jnp.arange(7), (2, 7)),
                            cache=model.init_cache(2, 16))
    # Slots 8.. hold garbage (slot 7 is written by the step itself).
    cache = jax.tree.map(lambda c: c.at[:, :, 8:].add(noise * jax.random.normal(
        jax.random.PRNGKey(3), c[:, :, 8:].shape, c.dtype)), cache)
    logits, _ = model.decode(jnp.array([[5], [9]]), positions=jnp.array([[7], [7]]), cache=cache)
    return logits

  clean, dirty = run(params, 0.0), run(params, 100.0)
  assert np.all(np.isfinite(dirty))
  np.testing.assert_array_equal(clean, dirty)


# ------------------------------------------------------------------ greedy: token for token

@pytest.mark.parametrize("draft_kind", ["random", "perturbed", "target"])
def test_greedy_equals_target_greedy_decoding(target, draft_kind):
  if draft_kind == "random":  # a different, smaller architecture: low acceptance.
    draft = build(DRAFT, 1)
  elif draft_kind == "perturbed":  # the target plus noise: partial acceptances, mid-round rejections.
    graphdef, params = nnx.split(target, nnx.Param)
    keys = iter(jax.random.split(jax.random.PRNGKey(7), 100))
    params = jax.tree.map(lambda w: w + 0.02 * jax.random.normal(next(keys), w.shape), params)
    draft = nnx.merge(graphdef, params)
  else:
    draft = target
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, 61, n)) for n in (1, 5, 9, 3)]  # ragged, one of length 1.
  want = generate_ids(target, prompts, eos_id=2, max_new_tokens=24, temperature=0.0)
  got, st = speculative_generate(target, draft, prompts, k=4, eos_id=2, max_new_tokens=24, temperature=0.0)
  assert got == want
  assert sorted(len(r) for r in want) == [7, 18, 24, 24]  # eos_id 2 stops two rows early, mid-round.
  if draft_kind == "target":
    assert st["acceptance_rate"] == 1.0 and st["tokens_per_target_call"] == 5.0
    assert st["target_calls"] == 5  # ceil(24 / (k + 1)) rounds instead of 24 decode steps.
  elif draft_kind == "perturbed":
    assert 0.2 < st["acceptance_rate"] < 0.95
  else:
    assert st["acceptance_rate"] < 0.3
  assert st["proposed"] == 4 * round(st["proposed"] / 4) and 0 <= st["accepted"] <= st["proposed"]


# ------------------------------------------------------------------ sampling: the target's exact law

V = 8
SMALL_T = ModelConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16,
                      compute_dtype="float32", init_std=0.5)
SMALL_D = dataclasses.replace(SMALL_T, d_model=8, n_layers=1)
PROMPT = [1, 5, 3]
N = 20_000  # samples: one jitted call with N identical rows, each with its own random draws.


@pytest.fixture(scope="module")
def small_pair():
  return build(SMALL_T, 0), build(SMALL_D, 1)


def exact_joint(model, temperature, top_k, top_p) -> np.ndarray:
  """P(t1, t2 | PROMPT) [V, V] from full (cache-free) forwards of the model."""
  p1 = token_probs(model(jnp.asarray([PROMPT]))[:, -1], temperature, top_k, top_p)[0]
  p2 = token_probs(model(jnp.asarray([PROMPT + [t] for t in range(V)]))[:, -1], temperature, top_k, top_p)
  return np.asarray(p1[:, None] * p2, np.float64)


def sampled_joint(target, draft, temperature, top_k, top_p, k, **kw) -> tuple[np.ndarray, dict]:
  rows, st = speculative_generate(target, draft, [PROMPT] * N, k=k, eos_id=-1, max_new_tokens=2,
                                  temperature=temperature, top_k=top_k, top_p=top_p, seed=0, **kw)
  counts = np.zeros((V, V))
  np.add.at(counts, tuple(np.asarray(rows).T), 1)
  return counts, st


# k = 2 covers keep-keep and a mid-round resample within the first two tokens; k = 1 the bonus token.
@pytest.mark.parametrize("temperature,top_k,top_p,k", [(1.0, 0, 1.0, 2), (0.7, 5, 0.9, 1)])
def test_sampled_pairs_follow_the_target_distribution(small_pair, temperature, top_k, top_p, k):
  target, draft = small_pair
  want = exact_joint(target, temperature, top_k, top_p)
  assert np.abs(exact_joint(draft, temperature, top_k, top_p) - want).sum() > 0.5  # the draft differs.
  counts, st = sampled_joint(target, draft, temperature, top_k, top_p, k)
  assert counts[want == 0].sum() == 0  # tokens filtered out of the target's law never appear.
  assert chi_square_p(counts, want) > 0.01
  assert 0.1 < st["acceptance_rate"] < 0.9  # both keeps and rejections happen.


def test_wrong_acceptance_rule_is_rejected_by_the_same_test(small_pair):
  # "Always accept" emits the draft's tokens: the chi-square test must see it (p < 1e-6).
  target, draft = small_pair
  counts, st = sampled_joint(target, draft, 1.0, 0, 1.0, 2, accept=lambda p_x, q_x, u: jnp.ones_like(u, bool))
  assert st["acceptance_rate"] == 1.0
  assert chi_square_p(counts, exact_joint(target, 1.0, 0, 1.0)) < 1e-6


# ------------------------------------------------------------------ bad input

def test_bad_input_is_one_clear_error(small_pair):
  target, draft = small_pair
  with pytest.raises(ValueError, match="vocabulary"):
    speculative_generate(target, build(dataclasses.replace(SMALL_D, vocab_size=9), 0), [PROMPT], eos_id=0)
  with pytest.raises(ValueError, match="k .* must be ≥ 1"):
    speculative_generate(target, draft, [PROMPT], k=0, eos_id=0)
  with pytest.raises(ValueError, match="context"):
    speculative_generate(target, draft, [PROMPT], k=4, eos_id=0, max_new_tokens=10)  # 3 + 10 + 4 > 16
  with pytest.raises(ValueError, match="at least one token"):
    speculative_generate(target, draft, [[]], eos_id=0)
