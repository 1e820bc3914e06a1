"""Speculative decoding inside the serving engine (serve/engine.py with a draft): greedy parity with the
dense sampler, the target's exact sampling law (chi-square, and a wrong rule it catches), stats, blocks."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import random_transformer
from model.config import ModelConfig
from serve.api import Request, SamplingParams
from serve.engine import Engine
from serve.speculative import token_probs
from train.sample import generate_ids

TARGET = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96,
                     compute_dtype="float32", init_std=0.3)  # std 0.3: peaked, varied continuations.
DRAFT = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=96,
                    compute_dtype="float32", init_std=0.3, scan_layers=False)  # list caches on this side.
# One shape for every engine of the greedy tests (16 pages of 8, 2 slots): each program compiles once.
ENGINE = dict(block_size=8, num_blocks=16, max_slots=2, prefill_chunk=16, spec_k=4)


build = random_transformer


@pytest.fixture(scope="module")
def target():
  return build(TARGET, 0)


@pytest.fixture(scope="module")
def draft():  # a different, smaller architecture: low acceptance.
  return build(DRAFT, 1)


def run(engine, requests, joins):
  """Adds request i at step joins[i], steps to completion, checking the block invariants every step;
  returns {id: [TokenEvent]}."""
  todo, events, step = list(range(len(requests))), {}, 0
  while todo or engine.has_unfinished():
    for i in [i for i in todo if joins[i] <= step]:
      engine.add_request(requests[i])
      todo.remove(i)
    for e in engine.step():
      assert not (events.get(e.request_id) and events[e.request_id][-1].finished), "event after finish"
      events.setdefault(e.request_id, []).append(e)
    engine._blocks.check()
    step += 1
  return events


# ------------------------------------------------------------------ greedy: token for token

@pytest.mark.parametrize("draft_kind", ["random", "target"])
def test_greedy_equals_target_greedy_decoding(target, draft, draft_kind):
  draft = draft if draft_kind == "random" else target
  rng = np.random.default_rng(0)
  prompts = [[int(t) for t in rng.integers(3, 64, n)] for n in (1, 7, 20, 4, 11)]  # 20: two chunks.
  ref = generate_ids(target, prompts, eos_id=-1, max_new_tokens=24, temperature=0.0)
  eos = ref[1][7]  # request 1 stops at its 8th token: inside the second round of a fully accepted run.
  stop = ref[3][13]  # request 3 stops at its 14th token on a stop id.
  max_tokens = [24, 24, 13, 24, 9]  # 13, 9: cut inside a run of 5.
  want = []
  for i, row in enumerate(ref):
    stops = {eos} | ({stop} if i == 3 else set())
    cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
    want.append(row[:min(cut, max_tokens[i])])
  assert [len(w) for w in want] == [24, 8, 13, 14, 9]  # the stop tokens occur first where meant.
  requests = [Request(f"r{i}", tuple(p), SamplingParams(max_tokens=m, temperature=0.0,
                                                        stop_token_ids=(stop,) if i == 3 else ()))
              for i, (p, m) in enumerate(zip(prompts, max_tokens))]
  engine = Engine(target, eos_id=eos, draft=draft, **ENGINE)
  events = run(engine, requests, joins=[0, 0, 1, 3, 5])  # 5 requests, 2 slots: they queue for slots.
  assert [[e.token_id for e in events[f"r{i}"]] for i in range(5)] == want
  assert [events[f"r{i}"][-1].finish_reason for i in range(5)] == [
      "stop" if want[i][-1] in ({eos, stop} if i == 3 else {eos}) else "length" for i in range(5)]
  st = engine.stats()
  assert st["spec_proposed"] == ENGINE["spec_k"] * st["spec_rounds"] > 0
  assert st["spec_tokens_per_round"] == 1 + st["spec_accepted"] / st["spec_rounds"]
  if draft_kind == "target":
    assert st["spec_acceptance_rate"] == 1.0
    assert st["spec_rounds"] < sum(map(len, want)) // 2  # ~5 tokens per target call instead of 1.
  else:
    assert st["spec_acceptance_rate"] < 0.5
  assert st["blocks_used"] == 0 and st["blocks_free"] == st["blocks_total"]
  assert st["requests_running"] == st["requests_waiting"] == 0


def test_prefix_hits_and_preemption_keep_greedy_outputs(target):
  # Two requests of 36 + 48 tokens (11 pages each, 4 shared) overflow the 16 pages: the later one is
  # preempted and recomputed. The second hits the first's prefix blocks, which must hold the draft's K/V
  # too (else the acceptance rate, not the output, would suffer: checked by the rate).
  rng = np.random.default_rng(1)
  shared = [int(t) for t in rng.integers(3, 64, 35)]
  prompts = [shared + [5], shared + [9], [int(t) for t in rng.integers(3, 64, 6)]]
  ref = generate_ids(target, prompts, eos_id=-1, max_new_tokens=48, temperature=0.0)
  engine = Engine(target, eos_id=-1, draft=target, **ENGINE)
  requests = [Request(f"r{i}", tuple(p), SamplingParams(max_tokens=48, temperature=0.0))
              for i, p in enumerate(prompts)]
  events = run(engine, requests, joins=[0, 4, 4])
  assert [[e.token_id for e in events[f"r{i}"]] for i in range(3)] == ref
  st = engine.stats()
  assert st["prefix_hit_tokens"] >= 32 and st["preemptions"] >= 1
  assert st["spec_acceptance_rate"] == 1.0
  assert st["blocks_used"] == 0


def test_abort_mid_speculation_frees_blocks(target, draft):
  engine = Engine(target, eos_id=-1, draft=draft, **ENGINE)
  for i in range(3):
    engine.add_request(Request(f"r{i}", (3, 4, 5 + i), SamplingParams(max_tokens=40, temperature=0.8, seed=i)))
  got = []
  while len(got) < 6:
    got += engine.step()
  assert engine.stats()["spec_rounds"] >= 1
  engine.abort("r1")
  engine._blocks.check()
  assert "r1" not in engine._blocks
  while engine.has_unfinished():
    engine.step()
  assert engine.stats()["blocks_used"] == 0


def test_seeded_sampling_does_not_depend_on_batch_neighbours(target, draft):
  engine = Engine(target, eos_id=-1, draft=draft, **ENGINE)
  params = SamplingParams(max_tokens=12, temperature=0.9, top_k=20, seed=7)
  alone = engine.generate([[3, 4, 5]], params)[0]
  crowd = engine.generate([[9, 8], [3, 4, 5], [1] * 9], [SamplingParams(max_tokens=20, temperature=1.0, seed=1),
                                                         params, SamplingParams(max_tokens=12, temperature=0)])
  assert crowd[1] == alone and len(alone) == 12


def test_logprobs_of_every_kept_token_match_the_full_forward(target, draft):
  engine = Engine(target, eos_id=-1, draft=draft, **ENGINE)
  prompt = [3, 14, 15, 9, 2, 6]
  events = run(engine, [Request("r", tuple(prompt), SamplingParams(max_tokens=10, temperature=0.0,
                                                                   logprobs=3))], joins=[0])["r"]
  ids = [e.token_id for e in events]
  logp = np.asarray(jax.nn.log_softmax(target(jnp.asarray([prompt + ids]))[0, len(prompt) - 1:-1], -1))
  np.testing.assert_allclose([e.logprob for e in events], logp[np.arange(10), ids], atol=1e-4)
  for e, row in zip(events, logp):
    assert [i for i, _ in e.top_logprobs] == list(np.argsort(-row)[:3])


def test_mismatched_draft_is_one_clear_error(target):
  with pytest.raises(ValueError, match="vocabulary"):
    Engine(target, eos_id=0, draft=build(dataclasses.replace(DRAFT, vocab_size=65), 0), **ENGINE)
  with pytest.raises(ValueError, match="spec_k"):
    Engine(target, eos_id=0, draft=target, **dict(ENGINE, spec_k=0))


# ------------------------------------------------------------------ sampling: the target's exact law

V = 8
SMALL_T = ModelConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16,
                      compute_dtype="float32", init_std=0.5)
SMALL_D = dataclasses.replace(SMALL_T, d_model=8, n_layers=1)
PROMPT = [1, 5, 3]
N = 2000  # seeded requests, 32 at a time.
HOT = dict(temperature=0.9, top_k=6, top_p=0.95)


@pytest.fixture(scope="module")
def small_pair():
  return build(SMALL_T, 0), build(SMALL_D, 1)


def chi_square_p(observed, probs) -> float:
  """p-value of counts against exact probabilities; cells expecting < 5 pooled, zero-probability ones left
  out (as tests/test_serve_speculative.py)."""
  observed, probs = observed.ravel().astype(np.float64), np.asarray(probs, np.float64).ravel()
  if observed[probs == 0].sum() > 0:  # an impossible outcome happened.
    return 0.0
  expected = observed.sum() * probs / probs.sum()
  big, small = expected >= 5, (expected < 5) & (probs > 0)
  obs, exp = observed[big], expected[big]
  if expected[small].sum() > 0:
    obs, exp = np.append(obs, observed[small].sum()), np.append(exp, expected[small].sum())
  return float(stats.chisquare(obs, exp).pvalue)


def exact_joint(model) -> np.ndarray:
  """P(t1, t2 | PROMPT) [V, V] from full (cache-free) forwards."""
  p1 = token_probs(model(jnp.asarray([PROMPT]))[:, -1], **HOT)[0]
  p2 = token_probs(model(jnp.asarray([PROMPT + [t] for t in range(V)]))[:, -1], **HOT)
  return np.asarray(p1[:, None] * p2, np.float64)


def sampled_joint(target, draft, accept=None):
  engine = Engine(target, eos_id=-1, draft=draft, block_size=8, num_blocks=64, max_slots=32,
                  prefill_chunk=16, spec_k=2, prefix_caching=False)
  if accept is not None:
    engine._accept = accept
  rows = engine.generate([PROMPT] * N, [SamplingParams(max_tokens=2, seed=s, **HOT) for s in range(N)])
  counts = np.zeros((V, V))
  np.add.at(counts, tuple(np.asarray(rows).T), 1)
  return counts, engine.stats()


def test_sampled_pairs_follow_the_target_distribution(small_pair):
  # k = 2, 2 tokens: a round keeps x1 x2, x1 + resample, or resamples x1; the bonus comes after keeping both.
  target, draft = small_pair
  want = exact_joint(target)
  assert np.abs(exact_joint(draft) - want).sum() > 0.5  # the draft differs.
  counts, st = sampled_joint(target, draft)
  assert counts[want == 0].sum() == 0  # tokens filtered out of the target's law never appear.
  assert chi_square_p(counts, want) > 0.01
  assert 0.1 < st["spec_acceptance_rate"] < 0.9  # both keeps and rejections happen.
  assert st["blocks_used"] == 0


def test_wrong_acceptance_rule_is_rejected_by_the_same_test(small_pair):
  target, draft = small_pair
  counts, st = sampled_joint(target, draft, accept=lambda p_x, q_x, u: jnp.ones_like(u, bool))
  assert st["spec_acceptance_rate"] == 1.0
  assert chi_square_p(counts, exact_joint(target)) < 1e-6
