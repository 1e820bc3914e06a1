"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one call.

    from serve.speculative import speculative_generate
    rows, stats = speculative_generate(target, draft, [[bos, 17, 4], [bos, 9]], k=4, eos_id=eos,
                                       max_new_tokens=64, temperature=0.8, top_k=50, top_p=0.95, seed=0)
    stats["acceptance_rate"], stats["tokens_per_target_call"]

Library module, no entry point. Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative
Decoding", Alg. 1) and Chen et al. 2023: the draft samples x_1..x_k from its distributions q_1..q_k; the
target scores [last, x_1..x_k] in one forward (k+1 positions of its KV cache) giving p_1..p_{k+1}; x_i is
kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the token is resampled from the
normalized residual max(0, p_i − q_i) and the round ends; if all k are kept, a bonus token comes from
p_{k+1}. Every round emits 1..k+1 tokens and each is distributed exactly as the target's own sample.
p and q are the distributions `train.sample.sample_token` draws from — tempered, then top-k/top-p
filtered (`train.sample.filter_logits`) — so the output is the target's *filtered* sampling distribution;
at temperature 0 both are one-hot at the argmax, the rule keeps x_i iff it is the target's argmax, and the
output is greedy decoding token for token (up to float ties between differently shaped matmuls).

Batching: B sequences advance together in one jitted `lax.while_loop` with fixed shapes; each row keeps its
own accepted count, length and positions (so rows drift apart), and a finished row (EOS or max_new_tokens)
is frozen while the others go on. Generation starts from the prompt's last token, so the very first new
token is already speculated.

KV caches are the dense ones of `Transformer.init_cache` (slot = position), one per model, of length
prompt + max_new_tokens + k. After a partial acceptance the slots past the accepted prefix hold k/v of
rejected tokens; they are never read: attention masks by position (a query at position t sees slots ≤ t),
and the next round's call writes positions from the new last token on before attending, so every slot a
query can see holds the right token (`tests/test_serve_speculative.py` checks that stale slots are
invisible). The draft is fed [previous, last] in its first step of a round, so a token it proposed but
never consumed (x_k of an all-accepted round) enters its cache; rewriting an already cached token is
harmless (same position, same value).

Stats: `acceptance_rate` = accepted draft tokens / proposed (k per active row per round);
`tokens_per_target_call` = tokens emitted per row per verification call (1..k+1; the bonus/resampled token
included, counted before cutting at max_new_tokens or EOS; Leviathan's (1 − α^{k+1}) / (1 − α)); the
prompt's prefill call (one per model) is not counted.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.sample import filter_logits, pad_prompts


# --- the acceptance rule ---------------------------------------------------------------------------

def token_probs(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """logits [..., V] → the fp32 distribution `train.sample.sample_token` samples from: one-hot argmax at
  temperature 0, else softmax of the tempered, top-k/top-p filtered logits (filtered tokens get 0)."""
  shape = logits.shape
  flat = logits.astype(jnp.float32).reshape(-1, shape[-1])
  if temperature <= 0.0:
    return jax.nn.one_hot(jnp.argmax(flat, axis=-1), shape[-1], dtype=jnp.float32).reshape(shape)
  return jax.nn.softmax(filter_logits(flat / temperature, top_k, top_p), axis=-1).reshape(shape)


def draw(probs: jax.Array, key: jax.Array) -> jax.Array:
  """A token from each distribution [..., V] (a one-hot one always gives its index: log 0 = −inf)."""
  return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def acceptance_probability(p_token: jax.Array, q_token: jax.Array) -> jax.Array:
  """min(1, p(x) / q(x)) for a draft token x ~ q (q(x) > 0)."""
  return jnp.minimum(1.0, p_token / q_token)


def exact_accept(p_token: jax.Array, q_token: jax.Array, u: jax.Array) -> jax.Array:
  """Leviathan et al. Alg. 1: keep x iff u < p(x)/q(x), u ~ U[0, 1); written u·q < p (no division)."""
  return u * q_token < p_token


def residual(p: jax.Array, q: jax.Array) -> jax.Array:
  """norm(max(0, p − q)) over the last axis: where a rejected token is resampled from. When p == q the
  residual is empty but then nothing is ever rejected; p stands in so the result is never NaN."""
  r = jnp.maximum(p - q, 0.0)
  total = jnp.sum(r, axis=-1, keepdims=True)
  return jnp.where(total > 0, r / jnp.where(total > 0, total, 1.0), p)


def verify(p: jax.Array, q: jax.Array, proposed: jax.Array, key: jax.Array,
           accept: Callable = exact_accept) -> tuple[jax.Array, jax.Array]:
  """One round's decision for each row.

  p [B, k+1, V]: target distributions after [last, x_1..x_k]; q [B, k, V]: draft distributions the
  proposals x [B, k] were drawn from. Returns (accepted [B] in 0..k: the length of the kept prefix,
  next [B]: the resampled token at the first rejection, or the bonus token from p_{k+1}).
  """
  batch, k = proposed.shape
  key_u, key_next = jax.random.split(key)
  p_x = jnp.take_along_axis(p[:, :k], proposed[..., None], axis=-1)[..., 0]
  q_x = jnp.take_along_axis(q, proposed[..., None], axis=-1)[..., 0]
  ok = accept(p_x, q_x, jax.random.uniform(key_u, (batch, k)))
  accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # the leading run of keeps.
  # q gets a zero row k: when all k are kept, residual(p_{k+1}, 0) = p_{k+1}, the bonus distribution.
  q_ext = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)
  rows = jnp.arange(batch)
  nxt = draw(residual(p[rows, accepted], q_ext[rows, accepted]), key_next)
  return accepted, nxt


# --- the jitted generation loop --------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("target_def", "draft_def", "k", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "eos_id", "cache_len", "accept"))
def _speculate(target_params, draft_params, prompts, lengths, key, *, target_def, draft_def, k,
               max_new_tokens, temperature, top_k, top_p, eos_id, cache_len, accept):
  target, draft = nnx.merge(target_def, target_params), nnx.merge(draft_def, draft_params)
  batch, plen = prompts.shape
  rows = jnp.arange(batch)
  probs = functools.partial(token_probs, temperature=temperature, top_k=top_k, top_p=top_p)

  # Prefill both caches with the whole padded prompt (logits unused: XLA drops the head). Slots past a
  # short row's length hold padding until generation overwrites them, invisible meanwhile (by position).
  positions = jnp.broadcast_to(jnp.arange(plen), (batch, plen))
  _, t_cache = target.decode(prompts, positions=positions, cache=target.init_cache(batch, cache_len))
  _, d_cache = draft.decode(prompts, positions=positions, cache=draft.init_cache(batch, cache_len))

  width = max_new_tokens + k + 1  # room for a last round that overshoots max_new_tokens.
  state = dict(
      n=jnp.zeros(batch, jnp.int32),  # tokens generated so far; `last` sits at position lengths + n - 1.
      last=prompts[rows, lengths - 1],
      prev=prompts[rows, jnp.maximum(lengths - 2, 0)],  # the token at position max(pos(last) - 1, 0).
      t_cache=t_cache, d_cache=d_cache, out=jnp.zeros((batch, width), jnp.int32),
      done=jnp.zeros(batch, bool), key=key,
      stats=jnp.zeros(4, jnp.int32))  # rounds, row-rounds, accepted, emitted.

  def round_(s):
    key, k_draft, k_verify = jax.random.split(s["key"], 3)
    pos = lengths + s["n"] - 1  # position of `last`.
    # Draft: k autoregressive steps; the first also (re)writes `prev` into the draft cache.
    two = jnp.stack([s["prev"], s["last"]], axis=1)
    logits, d_cache = draft.decode(two, positions=jnp.stack([jnp.maximum(pos - 1, 0), pos], axis=1),
                                   cache=s["d_cache"])
    keys = jax.random.split(k_draft, k)
    q1 = probs(logits[:, 1])
    x1 = draw(q1, keys[0])

    def draft_step(carry, j_key):
      x, cache = carry
      j, step_key = j_key
      logits, cache = draft.decode(x[:, None], positions=(pos + j)[:, None], cache=cache)
      q = probs(logits[:, 0])
      nxt = draw(q, step_key)
      return (nxt, cache), (nxt, q)

    (_, d_cache), (xs, qs) = jax.lax.scan(draft_step, (x1, d_cache), (jnp.arange(1, k), keys[1:]))
    proposed = jnp.concatenate([x1[:, None], xs.T], axis=1)  # [B, k]
    q = jnp.concatenate([q1[:, None], jnp.moveaxis(qs, 0, 1)], axis=1)  # [B, k, V]

    # Target: one call over [last, x_1..x_k] at positions pos..pos+k.
    tokens = jnp.concatenate([s["last"][:, None], proposed], axis=1)
    logits, t_cache = target.decode(tokens, positions=pos[:, None] + jnp.arange(k + 1), cache=s["t_cache"])
    accepted, nxt = verify(probs(logits), q, proposed, k_verify, accept)

    # Emit x_1..x_a and the resampled/bonus token; finished rows stay frozen.
    active = ~s["done"]
    emitted = jnp.concatenate([proposed, jnp.zeros_like(nxt)[:, None]], axis=1).at[rows, accepted].set(nxt)
    j = jnp.arange(k + 1)
    keep = (j <= accepted[:, None]) & active[:, None]
    out = s["out"].at[rows[:, None], jnp.where(keep, s["n"][:, None] + j, width)].set(emitted, mode="drop")
    n = jnp.where(active, s["n"] + accepted + 1, s["n"])
    prev = jnp.where(accepted > 0, emitted[rows, jnp.maximum(accepted - 1, 0)], s["last"])
    done = s["done"] | jnp.any(keep & (emitted == eos_id), axis=1) | (n >= max_new_tokens)
    stats = s["stats"] + jnp.stack([jnp.int32(1), jnp.sum(active), jnp.sum(jnp.where(active, accepted, 0)),
                                    jnp.sum(jnp.where(active, accepted + 1, 0))]).astype(jnp.int32)
    return dict(n=n, last=jnp.where(active, nxt, s["last"]), prev=jnp.where(active, prev, s["prev"]),
                t_cache=t_cache, d_cache=d_cache, out=out, done=done, key=key, stats=stats)

  final = jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), round_, state)
  return final["out"], final["n"], final["stats"]


def speculative_generate(target, draft, prompts: Sequence[Sequence[int]], *, k: int = 4, eos_id: int,
                         pad_id: int = 0, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 0,
                         top_p: float = 1.0, seed: int = 0,
                         accept: Callable = exact_accept) -> tuple[list[list[int]], dict]:
  """Completes each token-id prompt with the target's distribution, drafting with `draft`.

  Returns (new ids of each row, cut before its first EOS and at max_new_tokens; stats). `accept(p_x,
  q_x, u) -> keep` is the acceptance rule (default: the exact one; anything else changes the output
  distribution — e.g. lossy "typical acceptance" experiments).
  """
  if target.cfg.vocab_size != draft.cfg.vocab_size:
    raise ValueError(f"draft vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                     f"({target.cfg.vocab_size}); speculative decoding needs the same token ids")
  if k < 1:
    raise ValueError(f"k (draft tokens per round) must be ≥ 1, got {k}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
  padded, lengths = pad_prompts(prompts, pad_id)
  plen = padded.shape[1]
  cache_len = plen + max_new_tokens + k  # a last round may look k tokens past max_new_tokens.
  context = min(target.cfg.max_seq_len, draft.cfg.max_seq_len)
  if cache_len > context:
    raise ValueError(f"prompt ({plen} tokens) + max_new_tokens ({max_new_tokens}) + k ({k}) exceeds the "
                     f"models' context ({context})")
  target_def, target_params = nnx.split(target, nnx.Param)
  draft_def, draft_params = nnx.split(draft, nnx.Param)
  out, n, stats = _speculate(
      nnx.to_pure_dict(target_params), nnx.to_pure_dict(draft_params), jnp.asarray(padded),
      jnp.asarray(lengths), jax.random.PRNGKey(seed), target_def=target_def, draft_def=draft_def, k=int(k),
      max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
      top_p=float(top_p), eos_id=int(eos_id), cache_len=cache_len, accept=accept)
  rows = []
  for row, count in zip(np.asarray(out).tolist(), np.asarray(n).tolist()):
    row = row[:min(count, max_new_tokens)]
    rows.append(row[:row.index(eos_id)] if eos_id in row else row)
  rounds, row_rounds, accepted, emitted = (int(v) for v in np.asarray(stats))
  return rows, dict(acceptance_rate=accepted / max(k * row_rounds, 1),
                    tokens_per_target_call=emitted / max(row_rounds, 1),
                    target_calls=rounds, draft_calls=rounds * k, proposed=k * row_rounds, accepted=accepted)
