"""Serving engine (serve/engine.py) and the paged cache in the model, against the dense KV-cache sampler.

Every engine here has the same shapes (block 12, 20 blocks, 2 slots, chunks of 16), so the jitted step
compiles once per model and batch bucket for the whole file.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ModelConfig
from model.transformer import Transformer
from serve.api import Request, SamplingParams
from serve.engine import Engine
from serve.sampling import sample
from train.sample import filter_logits, generate_ids

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                  compute_dtype="float32")
ENGINE = dict(block_size=12, num_blocks=20, max_slots=2, prefill_chunk=16)  # 12 divides no prompt below.
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def random_model(cfg, seed=0):
  """A random Transformer filled from numpy: its jax initializers would cost a compile per param shape
  (~7 s on 2 busy cores). Weights N(0, 0.3²), so greedy continuations vary (at 0.02 a row repeats one
  token); norm scales 1 + N(0, 0.1²)."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      shape = var.get_value().shape
      noise = rng.standard_normal(shape)
      var.set_value(jnp.asarray(1 + 0.1 * noise if path[-1] == "scale" else 0.3 * noise, jnp.float32))
  return model


@pytest.fixture(scope="module", params=[True, False], ids=["scan", "unrolled"])
def model(request):
  return random_model(dataclasses.replace(CFG, scan_layers=request.param))


@pytest.fixture(scope="module")
def scan_model():
  return random_model(CFG)


def prompts_of(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(2, CFG.vocab_size, n)] for n in lengths]


def reference(model, prompts, max_new=GREEDY.max_tokens):
  """Greedy decodes with the dense KV cache of `train.sample` (its rows never interact: each is the
  single-request decode), never stopping (eos -1)."""
  return generate_ids(model, prompts, eos_id=-1, max_new_tokens=max_new, temperature=0.0)


def cut(row, stops):
  """What the engine should emit: the reference up to and including the first stop token."""
  for i, t in enumerate(row):
    if t in stops:
      return row[:i + 1]
  return row


def run(engine, requests, joins=None):
  """Adds request i at step joins[i], steps to completion; returns {id: [TokenEvent]}."""
  joins = joins or [0] * len(requests)
  todo, events, step = list(range(len(requests))), {}, 0
  while todo or engine.has_unfinished():
    for i in [i for i in todo if joins[i] <= step]:
      engine.add_request(requests[i])
      todo.remove(i)
    evs = engine.step()
    ids = [e.request_id for e in evs]
    assert len(ids) == len(set(ids)), "more than one token for a request in one step"
    for e in evs:
      assert not (events.get(e.request_id) and events[e.request_id][-1].finished), "event after finish"
      events.setdefault(e.request_id, []).append(e)
    engine._blocks.check()  # ref counts ≥ 0, free + used == total, nothing both free and referenced.
    step += 1
  return events


# ------------------------------------------------------------------ paged attention in the model

@pytest.mark.parametrize("variant", [dict(sliding_window=5),
                                     dict(scan_layers=False, positions="alibi", n_kv_heads=1)])
def test_paged_cache_decode_equals_dense_attention(variant):
  cfg = dataclasses.replace(CFG, d_model=32, max_seq_len=64, **variant)
  graphdef, state = nnx.split(random_model(cfg, seed=1))
  x = jnp.asarray(np.random.default_rng(0).integers(0, 128, (3, 14)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(14), (3, 14))
  ppos = pos.at[2].set(-1)  # row 2 is all padding: it must write only the null page 0.
  tables = jnp.asarray([[5, 9, 2, 14, 0], [3, 1, 12, 7, 0], [15, 4, 0, 0, 0]], jnp.int32)  # scattered pages.

  @jax.jit
  def both(state):  # one compile: full (dense) forward, and a 9-token paged prefill + 5 paged decodes.
    model = nnx.merge(graphdef, state)
    pages = model.init_paged_cache(16, 4, jnp.float32)
    logits, pages = model.decode(x[:, :9], positions=ppos[:, :9], cache=pages, block_tables=tables)
    outs = [logits]
    for t in range(9, 14):
      logits, pages = model.decode(x[:, t:t + 1], positions=ppos[:, t:t + 1], cache=pages,
                                   block_tables=tables)
      outs.append(logits)
    at, _ = model.decode(x[:, :9], positions=ppos[:, :9], cache=model.init_paged_cache(16, 4, jnp.float32),
                         block_tables=tables, logits_at=jnp.asarray([8, 3, 0]))
    return model(x), jnp.concatenate(outs, 1), at[:, 0], pages

  want, got, at, pages = both(state)
  np.testing.assert_allclose(np.asarray(got[:2]), np.asarray(want[:2]), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(at[:2]), np.asarray(want[jnp.arange(2), jnp.asarray([8, 3])]),
                             atol=1e-5, rtol=1e-5)
  k_pages = pages["k_pages"] if cfg.scan_layers else jnp.stack([p["k_pages"] for p in pages])
  assert not np.asarray(k_pages[:, :, jnp.asarray([15, 4])]).any(), "padding wrote outside the null page"
  assert np.asarray(k_pages[:, :, 0]).any(), "padding should land on the null page"


# ------------------------------------------------------------------ continuous batching vs the reference

def test_staggered_greedy_requests_match_single_request_decodes(model):
  # 7 requests on 2 slots (queueing), joining at different steps; prompts of 3..64 tokens in chunks of 16
  # over blocks of 12; one stops on EOS, one on its own stop token, the rest on max_tokens.
  prompts = prompts_of((5, 23, 40, 17, 64, 3, 30))
  ref = reference(model, prompts)
  eos, stop = ref[1][4], ref[3][6]
  params = [GREEDY] * len(prompts)
  params[3] = dataclasses.replace(GREEDY, stop_token_ids=(stop,))
  engine = Engine(model, eos_id=eos, **ENGINE)
  reqs = [Request(f"r{i}", tuple(p), sp) for i, (p, sp) in enumerate(zip(prompts, params))]
  events = run(engine, reqs, joins=[0, 0, 1, 3, 3, 8, 12])
  reasons = set()
  for i, (row, sp) in enumerate(zip(ref, params)):
    evs = events[f"r{i}"]
    stops = {eos, *sp.stop_token_ids}
    assert [e.token_id for e in evs] == cut(row, stops), f"request {i}"
    assert evs[-1].finished and not any(e.finished for e in evs[:-1])
    assert evs[-1].finish_reason == ("stop" if evs[-1].token_id in stops else "length")
    assert all(e.logprob is None and e.top_logprobs is None for e in evs)
    reasons.add(evs[-1].finish_reason)
  assert reasons == {"stop", "length"}
  assert len(events[f"r{1}"]) <= 5 and events["r3"][-1].token_id == stop
  stats = engine.stats()
  assert stats["blocks_used"] == 0 and stats["blocks_free"] == stats["blocks_total"] == 20
  assert stats["requests_running"] == stats["requests_waiting"] == 0 and not engine.has_unfinished()


def test_chunked_prefill_does_not_stall_decodes(scan_model):
  engine = Engine(scan_model, eos_id=-1, **ENGINE)  # -1: never sampled, requests end on max_tokens.
  short, long = prompts_of((5, 100), seed=3)
  reqs = [Request("short", tuple(short), SamplingParams(max_tokens=20, temperature=0.0)),
          Request("long", tuple(long), SamplingParams(max_tokens=4, temperature=0.0))]
  engine.add_request(reqs[0])
  steps = []
  for i in range(30):
    if i == 2:
      engine.add_request(reqs[1])
    steps.append({e.request_id for e in engine.step()})
  first_long = next(i for i, ids in enumerate(steps) if "long" in ids)
  assert first_long >= 2 + 100 // 16  # the 100-token prompt took ≥ 7 steps of ≤ 16-token chunks...
  assert all("short" in ids for ids in steps[:20])  # ...during which the short request decoded every step.


def test_preemption_recomputes_and_keeps_outputs(scan_model):
  # 2 running requests of 56 + 70 tokens need 2 × 11 blocks of 12 > 20: the later one is preempted,
  # requeued and recomputed; a seeded sampled one draws the same tokens as when it ran alone.
  prompts = prompts_of((56, 56, 56), seed=4)
  ref = reference(scan_model, prompts[:2], max_new=70)
  greedy = SamplingParams(max_tokens=70, temperature=0.0)
  seeded = SamplingParams(max_tokens=70, temperature=1.0, seed=11)
  alone = Engine(scan_model, eos_id=-1, **ENGINE).generate([prompts[2]], seeded)[0]
  engine = Engine(scan_model, eos_id=-1, **ENGINE)
  reqs = [Request("g0", tuple(prompts[0]), greedy), Request("s", tuple(prompts[2]), seeded),
          Request("g1", tuple(prompts[1]), greedy)]
  events = run(engine, reqs, joins=[0, 1, 2])
  tokens = {k: [e.token_id for e in v] for k, v in events.items()}
  assert engine.stats()["preemptions"] >= 1
  assert tokens["g0"] == ref[0] and tokens["g1"] == ref[1]
  assert tokens["s"] == alone


# ------------------------------------------------------------------ prefix cache, abort

def test_prefix_cache_hit_gives_the_same_output_as_a_miss(scan_model):
  p = prompts_of((40,), seed=1)[0]
  c = p[:30] + prompts_of((7,), seed=2)[0]  # shares 2 full blocks (24 tokens) with p.
  ref = reference(scan_model, [p, c])
  engine = Engine(scan_model, eos_id=-1, **ENGINE)
  miss = engine.generate([p], GREEDY)[0]
  assert engine.stats()["prefix_hit_tokens"] == 0
  hit = engine.generate([p], GREEDY)[0]
  assert engine.stats()["prefix_hit_tokens"] == 36  # 3 blocks: the 4th holds the last prompt token.
  assert hit == miss == ref[0]
  assert engine.generate([c], GREEDY)[0] == ref[1]
  assert engine.stats()["prefix_hit_tokens"] == 36 + 24
  # A follow-up turn reuses the blocks of the generated tokens too (p + 9 computed outputs = 4 blocks).
  d = p + hit + [5, 6]
  before = engine.stats()["prefix_hit_tokens"]
  no_cache = Engine(scan_model, eos_id=-1, prefix_caching=False, **ENGINE)
  assert engine.generate([d], GREEDY)[0] == no_cache.generate([d], GREEDY)[0]
  assert engine.stats()["prefix_hit_tokens"] - before == 48
  assert no_cache.stats()["prefix_hit_tokens"] == 0 and no_cache.stats()["blocks_cached"] == 0
  stats = engine.stats()
  assert stats["blocks_used"] == 0 and stats["blocks_cached"] > 0 and stats["blocks_free"] == 20


def test_abort_frees_slot_and_blocks_at_once(scan_model):
  engine = Engine(scan_model, eos_id=-1, **ENGINE)
  prompts = prompts_of((30, 20, 10), seed=5)
  for i, p in enumerate(prompts):
    engine.add_request(Request(f"r{i}", tuple(p), SamplingParams(max_tokens=20, temperature=0.0)))
  for _ in range(3):
    engine.step()
  assert engine.stats()["requests_running"] == 2 and engine.stats()["requests_waiting"] == 1
  engine.abort("r0")  # running: its slot and blocks go now.
  engine.abort("r2")  # waiting.
  engine.abort("r2")
  engine.abort("never-added")
  engine._blocks.check()
  stats = engine.stats()
  assert stats["requests_running"] == 1 and stats["requests_waiting"] == 0
  assert stats["blocks_used"] == len(engine._blocks.table("r1"))
  rest = []
  while engine.has_unfinished():
    rest += engine.step()
  assert {e.request_id for e in rest} == {"r1"} and rest[-1].finished
  assert engine.stats()["blocks_free"] == 20


# ------------------------------------------------------------------ sampling

def test_seeded_sampling_does_not_depend_on_batch_neighbours(scan_model):
  p, q, r = prompts_of((9, 21, 14), seed=6)
  sp = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=7)
  engine = Engine(scan_model, eos_id=-1, **ENGINE)
  alone = engine.generate([p], sp)[0]
  reqs = [Request("x", tuple(p), sp), Request("n1", tuple(q), SamplingParams(max_tokens=12, seed=3)),
          Request("n2", tuple(r), SamplingParams(max_tokens=5, temperature=0.5, top_k=5))]
  events = run(engine, reqs, joins=[2, 0, 1])
  assert [e.token_id for e in events["x"]] == alone
  other_seed = engine.generate([p], dataclasses.replace(sp, seed=8))[0]
  assert other_seed != alone  # the seed matters: this is sampling, not a disguised argmax.
  greedy = engine.generate([p], GREEDY)[0]
  assert alone != greedy[:12]
  top1 = engine.generate([p], SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=5))[0]
  assert top1 == greedy


def test_logprobs_match_log_softmax_of_the_full_forward(scan_model):
  p = prompts_of((11,), seed=7)[0]
  engine = Engine(scan_model, eos_id=-1, **ENGINE)
  sp = SamplingParams(max_tokens=8, temperature=0.7, seed=2, logprobs=5)
  engine.add_request(Request("lp", tuple(p), sp))
  events = []
  while engine.has_unfinished():
    events += engine.step()
  out = [e.token_id for e in events]
  graphdef, state = nnx.split(scan_model)
  logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray([p + out[:-1]]))
  want = np.asarray(jax.nn.log_softmax(logits[0, len(p) - 1:], axis=-1))
  for j, e in enumerate(events):
    np.testing.assert_allclose(e.logprob, want[j, e.token_id], atol=1e-4)
    top = np.argsort(-want[j])[:5]
    assert [t for t, _ in e.top_logprobs] == top.tolist()
    np.testing.assert_allclose([lp for _, lp in e.top_logprobs], want[j, top], atol=1e-4)
  zero = Engine(scan_model, eos_id=-1, **ENGINE)
  zero.add_request(Request("z", tuple(p), dataclasses.replace(sp, logprobs=0)))
  ev = zero.step()[0]
  assert ev.top_logprobs is None and ev.logprob == pytest.approx(events[0].logprob, abs=1e-5)


def test_per_row_filter_equals_the_batch_filter_row_by_row():
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((5, 128)) * 3, jnp.float32)
  settings = [(0, 1.0), (5, 1.0), (0, 0.8), (20, 0.5), (1, 0.3)]
  rows = filter_logits(logits, np.array([k for k, _ in settings]), np.array([p for _, p in settings]))
  for i, (k, p) in enumerate(settings):
    np.testing.assert_array_equal(np.asarray(rows[i]), np.asarray(filter_logits(logits[i:i + 1], k, p)[0]))
  # Greedy rows in a mixed batch take the argmax; keys fold in the token index.
  out = sample(logits, jnp.asarray([0.0, 1.0, 0.0, 1.0, 1.0]), jnp.asarray([0, 5, 0, 20, 1]),
               jnp.ones(5), jnp.zeros(5, jnp.uint32), jnp.arange(5))
  assert out["tokens"][0] == jnp.argmax(logits[0]) and out["tokens"][2] == jnp.argmax(logits[2])
  assert out["tokens"][4] == jnp.argmax(logits[4])  # top_k=1.


# ------------------------------------------------------------------ bad input

def test_bad_requests_get_one_clear_error(scan_model):
  engine = Engine(scan_model, eos_id=-1, **ENGINE)
  with pytest.raises(ValueError, match="prompt is empty"):
    engine.add_request(Request("a", ()))
  with pytest.raises(ValueError, match=r"exceeds the model's context \(128\)"):
    engine.add_request(Request("b", (1,) * 100, SamplingParams(max_tokens=29)))
  with pytest.raises(ValueError, match=r"token id 128 is outside the vocabulary"):
    engine.add_request(Request("c", (1, 128)))
  engine.add_request(Request("d", (1, 2)))
  with pytest.raises(ValueError, match="already in flight"):
    engine.add_request(Request("d", (3,)))
  with pytest.raises(RuntimeError, match="idle engine"):
    engine.generate([[1]])
  small = Engine(scan_model, eos_id=-1, block_size=12, num_blocks=4)
  with pytest.raises(ValueError, match="needs 5 KV-cache blocks"):
    small.add_request(Request("e", (1,) * 50, SamplingParams(max_tokens=10)))
  with pytest.raises(ValueError, match="max_step_tokens"):
    Engine(scan_model, eos_id=-1, max_slots=8, max_step_tokens=8)
  with pytest.raises(ValueError, match="prompt is empty"):  # generate validates all before queueing any.
    small.generate([[1, 2], []])
  assert not small.has_unfinished()


def test_cache_dtype_defaults_to_compute_dtype_but_fp32_for_16_bit_on_cpu():
  bf16 = random_model(dataclasses.replace(CFG, compute_dtype="bfloat16"))
  dtypes = lambda e: {a.dtype for a in jax.tree.leaves(e._cache)}  # noqa: E731
  assert dtypes(Engine(bf16, eos_id=-1, **ENGINE)) == {jnp.dtype(jnp.float32)}  # tests run on CPU.
  assert dtypes(Engine(bf16, eos_id=-1, cache_dtype="bfloat16", **ENGINE)) == {jnp.dtype(jnp.bfloat16)}
