"""train.scoring.LanguageModel against direct computations on a tiny model trained on Tiny Shakespeare.

References are one forward per sequence, unbatched (log-softmax at the scored positions, summed in
float64), greedy decoding by full forwards, and train.sample.generate; the class must match them at
fp32 tolerances whatever the batch size.
"""
import functools

import jax
import numpy as np
import pytest
from flax import nnx
from scipy.special import log_softmax

from conftest import shared_data
from train.scoring import LanguageModel

MAX_LEN = 64  # small windows so a ~3×max_len text costs a few forwards on CPU.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def run_dir(tiny_run):
  return tiny_run


@pytest.fixture(scope="module")
def lm(run_dir):
  return LanguageModel.from_checkpoint(run_dir, batch_size=4, max_len=MAX_LEN)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def forward(model, tokens):
  """Logits [T, V] of one sequence, in one forward. Jitted (an eager forward costs seconds on CPU) and
  right-padded to MAX_LEN so every reference shares one compiled shape: causal, so the pad can't
  change the logits before it."""
  padded = np.zeros((1, MAX_LEN), np.int32)
  padded[0, :len(tokens)] = tokens
  return np.asarray(_forward(*nnx.split(model), jax.numpy.asarray(padded)), np.float64)[0, :len(tokens)]


def direct_logprobs(model, seq):
  """log p(seq[t+1] | seq[:t+1]) for every t, and whether it is the argmax, from one forward."""
  logits = forward(model, seq[:-1])
  logp = log_softmax(logits, axis=-1)
  return logp[np.arange(len(seq) - 1), seq[1:]], logits.argmax(-1) == np.asarray(seq[1:])


def direct_loglikelihood(lm, context, continuation):
  ctx_ids, cont_ids = lm._encode_pairs([(context, continuation)])[0]
  seq = (ctx_ids + cont_ids)[-(lm.max_len + 1):]
  logp, hit = direct_logprobs(lm.model, seq)
  return logp[-len(cont_ids):].sum(), bool(hit[-len(cont_ids):].all())


REQUESTS = [
    ("ROMEO:", " I will"),
    ("", "First Citizen:\nBefore we proceed any further, hear me speak."),
    ("What say you, my ", "lord?"),
    ("KING HENRY:\nNow, by my troth, ", "I cannot tell."),
    ("To be, or not to be: that is the question: " * 6, "Whether 'tis nobler in the mind"),  # truncated
    ("All:\n", "Speak, speak."),
    ("A", "B"),
]


def test_loglikelihood_matches_direct_forward_at_any_batch_size(lm):
  expected = [direct_loglikelihood(lm, c, k) for c, k in REQUESTS]
  assert len(lm._encode_pairs([REQUESTS[4]])[0][0]) > MAX_LEN  # the long one really is truncated
  for batch_size in (1, 3, 16):
    got = LanguageModel(lm.model, lm.tokenizer, batch_size=batch_size, max_len=MAX_LEN).loglikelihood(REQUESTS)
    np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected], **TOL)
    assert [g[1] for g in got] == [e[1] for e in expected]
  again = lm.loglikelihood(REQUESTS)
  assert again == lm.loglikelihood(REQUESTS)  # stable: bitwise the same numbers


def test_tokenization_follows_hflm(lm):
  tok = lm.tokenizer
  # Trailing spaces of the context move to the continuation.
  ctx, cont = lm._encode_pairs([("Hello ", "world")])[0]
  assert ctx == [tok.bos_id] + tok.encode("Hello") and cont == tok.encode("Hello world")[len(tok.encode("Hello")):]
  # An empty context is BOS alone.
  assert lm._encode_pairs([("", "Hi there")])[0] == ([tok.bos_id], tok.encode("Hi there"))
  # A continuation that merges with the context's last piece falls back to separate encodes.
  whole, head = tok.encode("the king"), tok.encode("the ki")
  assert whole[:len(head)] != head, "pick a pair whose split is inconsistent"
  assert lm._encode_pairs([("the ki", "ng")])[0] == ([tok.bos_id] + head, tok.encode("ng"))
  # An empty continuation has probability 1.
  assert lm.loglikelihood([("ROMEO:", "")]) == [(0.0, True)]


PROMPTS = ["ROMEO:", "", "First Citizen:\nWe are", "JULIET:\nO Romeo, Romeo! wherefore art thou"]
GREEDY = {"until": [], "max_gen_toks": 12}  # four prompts, these settings: one compiled sampler shape.


def test_greedy_continuation_is_flagged_and_is_the_most_likely(lm):
  greedy = lm.generate_until([(p, GREEDY) for p in PROMPTS])[0]
  ctx_ids = [lm.tokenizer.bos_id] + lm.tokenizer.encode(PROMPTS[0])
  cont_ids = lm.tokenizer.encode(greedy)
  assert lm.tokenizer.decode(cont_ids) == greedy and len(cont_ids) >= 4, (greedy, cont_ids)
  # Same token length, one token swapped for another learned piece (ids ≥ 266: past specials and bytes).
  rng = np.random.default_rng(0)
  perturbed = []
  for pos in list(range(len(cont_ids))) * 2:
    alt = list(cont_ids)
    alt[pos] = int(rng.choice([t for t in range(266, lm.tokenizer.vocab_size) if t != alt[pos]]))
    perturbed.append(alt)
  results = lm.loglikelihood_tokens([(ctx_ids, cont_ids)] + [(ctx_ids, p) for p in perturbed])
  assert results[0][1] is True
  assert not any(greedy_flag for _, greedy_flag in results[1:])
  assert all(results[0][0] > lp for lp, _ in results[1:]), results
  # The same through the text API (no trailing space to move; the greedy text re-encodes to the
  # generated tokens here).
  assert lm.loglikelihood([(PROMPTS[0], greedy)])[0] == pytest.approx(results[0], rel=1e-5)


def test_rolling_short_text_equals_loglikelihood_from_empty_context(lm):
  text = "First Citizen:\nWe are accounted poor citizens."
  (total, n), = lm.rolling_tokens([text])
  assert n == len(lm.tokenizer.encode(text)) < MAX_LEN
  np.testing.assert_allclose(total, lm.loglikelihood([("", text)])[0][0], **TOL)
  assert lm.loglikelihood_rolling([text]) == [total]
  assert lm.rolling_tokens([""]) == [(0.0, 0)]


def _direct_rolling(lm, ids, stride):
  """Window by window, written out independently of LanguageModel.rolling_windows."""
  toks, n, w = [lm.tokenizer.bos_id] + ids, len(ids), lm.max_len
  logp, _ = direct_logprobs(lm.model, toks[:min(w, n) + 1])
  total, done = logp.sum(), min(w, n)
  while done < n:
    end = min(done + stride, n)
    logp, _ = direct_logprobs(lm.model, toks[end - w:end + 1])
    assert len(logp) == w
    total += logp[-(end - done):].sum()
    done = end
  return total


def test_rolling_long_text_equals_direct_window_sums(lm):
  text = (shared_data() / "text" / "tinyshakespeare.txt").read_text()[5000:5400]
  ids = lm.tokenizer.encode(text)
  assert 2.5 * MAX_LEN < len(ids) < 5 * MAX_LEN, len(ids)
  results = {}
  for stride in (MAX_LEN, 40, 17):
    (total, n), = lm.rolling_tokens([text], stride=stride)
    assert n == len(ids)
    np.testing.assert_allclose(total, _direct_rolling(lm, ids, stride), **TOL)
    results[stride] = total
    windows = lm.rolling_windows(ids, stride)
    assert sum(k for _, k in windows) == len(ids)  # every token predicted exactly once
  # More context per token helps a trained model: the overlapping strides score higher than disjoint.
  assert results[17] > results[MAX_LEN]
  # The constructor's rolling_stride is the default; batched texts give the same per-text numbers.
  lm17 = LanguageModel(lm.model, lm.tokenizer, batch_size=3, max_len=MAX_LEN, rolling_stride=17)
  got = lm17.rolling_tokens(["to be", text, "", text[:100]])
  np.testing.assert_allclose(got[1][0], results[17], **TOL)
  assert [g[1] for g in got] == [len(lm.tokenizer.encode(t)) for t in ["to be", text, "", text[:100]]]


def test_generate_until_matches_the_sampler_and_honours_stops(lm):
  from train.sample import generate
  ref = generate(lm.model, lm.tokenizer, PROMPTS, max_new_tokens=12, temperature=0.0)
  assert len(set(ref)) > 1 and all(ref), ref
  # Equivalent spellings of greedy decoding share one batch.
  kwargs = [GREEDY, {"max_gen_toks": 12, "temperature": 0.0, "top_k": 5, "seed": 9},
            {"max_gen_toks": 12, "do_sample": False, "temperature": 0.7}, {"max_new_tokens": 12}]
  assert lm.generate_until(list(zip(PROMPTS, kwargs))) == ref
  # max_gen_toks: at most that many tokens come back (fewer only at EOS), a prefix of the longer run.
  out = lm.generate_until([(p, {"max_gen_toks": 3}) for p in PROMPTS])
  assert all(len(lm.tokenizer.encode(o)) <= 3 for o in out)
  assert out == [r[:len(o)] for r, o in zip(ref, out)] and out != ref
  # Stop strings: cut before the first occurrence of any of them; a plain string works too.
  full = ref[3]
  stop = full[len(full) // 2:len(full) // 2 + 2]
  cut = full[:full.index(stop)]
  assert len(cut) < len(full)
  out = lm.generate_until([(PROMPTS[3], dict(GREEDY, until=[stop, "\u2603"])),
                           (PROMPTS[3], dict(GREEDY, until=stop)),
                           (PROMPTS[3], dict(GREEDY, until=["\u2603", full[-1:], stop])),
                           (PROMPTS[0], GREEDY)])
  assert out == [cut, cut, full[:min(full.index(stop), full.index(full[-1:]))], ref[0]]
  # Sampling is reproducible from its seed.
  sample = {"temperature": 1.0, "top_k": 50, "top_p": 0.9, "seed": 3, "max_gen_toks": 12}
  assert lm.generate_until([(PROMPTS[0], sample)]) == lm.generate_until([(PROMPTS[0], sample)])


def test_generation_prompt_is_left_truncated(lm):
  tok = lm.tokenizer
  long_prompt = "To be, or not to be: that is the question. " * 20
  kept = ([tok.bos_id] + tok.encode(long_prompt))[-(MAX_LEN - 8):]  # room for 8 new tokens
  assert lm._truncate_prompt(tok.encode(long_prompt), 8) == kept and len(kept) == MAX_LEN - 8
  assert lm._truncate_prompt(tok.encode("Hi"), 8) == [tok.bos_id] + tok.encode("Hi")
  # Reference: greedy decoding by full forwards (no KV cache) from exactly the kept tokens.
  seq, new = list(kept), []
  for _ in range(8):
    nxt = int(forward(lm.model, seq)[-1].argmax())
    if nxt == tok.eos_id:
      break
    seq.append(nxt)
    new.append(nxt)
  assert lm.generate_until([(long_prompt, {"max_gen_toks": 8})]) == [tok.decode(new)]


def test_bad_requests_name_the_index(lm):
  with pytest.raises(ValueError, match="request 1 must be a"):
    lm.loglikelihood([("a", "b"), ("only one",)])
  with pytest.raises(ValueError, match="request 0 must be a"):
    lm.loglikelihood([("a", 3)])
  with pytest.raises(ValueError, match="request 1: token ids must be integers in \\[0, 512\\)"):
    lm.loglikelihood_tokens([([1, 2], [3]), ([1], [512])])
  with pytest.raises(ValueError, match="request 2 must be a string"):
    lm.rolling_tokens(["a", "b", None])
  with pytest.raises(ValueError, match="request 0 must be a"):
    lm.generate_until([("prompt", "not a dict")])
  with pytest.raises(ValueError, match="request 1: unsupported gen kwargs \\['beams'\\]"):
    lm.generate_until([("a", {"max_gen_toks": 1}), ("b", {"beams": 4})])
  with pytest.raises(ValueError, match="max_gen_toks=64 must be in"):
    lm.generate_until([("a", {"max_gen_toks": 64})])
  with pytest.raises(ValueError, match="rolling_stride=0"):
    lm.rolling_tokens(["abc"], stride=0)
  with pytest.raises(ValueError, match="max_len=1000"):
    LanguageModel(lm.model, lm.tokenizer, max_len=1000)
  empty, = lm.generate_until([("", {"max_gen_toks": 2})])  # an empty prompt is fine: BOS alone
  assert isinstance(empty, str) and 1 <= len(lm.tokenizer.encode(empty)) <= 2
