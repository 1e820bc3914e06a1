"""KV-cache sampler: generate text from a checkpoint.

    python -m train.sample --checkpoint=runs/tiny --prompt="def " --max_new_tokens=100 \
        --temperature=0.8 --top_k=50 --top_p=0.95 --seed=0

`--checkpoint` is a run directory (latest step) or one step directory. Prompts of different lengths
are batched: the prompt is prefilled into the cache in one call, then one token per step is decoded
inside a `lax.while_loop`, which exits as soon as every row has emitted EOS. Good enough for
evaluation and alignment rollouts; the paged, continuously batched engine lives in `serve/`.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def filter_logits(logits: jax.Array, top_k, top_p) -> jax.Array:
  """Masks logits [B, V] outside the top-k and outside the smallest set with mass ≥ top_p.

  top_k / top_p are Python numbers (one setting for the batch; off = 0 / 1.0 is skipped when tracing)
  or per-row arrays [B] (off = 0 / 1.0 per row), as the serving engine's mixed batches need.
  """
  if isinstance(top_k, (np.ndarray, jax.Array)) or isinstance(top_p, (np.ndarray, jax.Array)):
    return _filter_logits_rows(logits, top_k, top_p)
  neg = jnp.finfo(logits.dtype).min
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if 0.0 < top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token is kept if the mass strictly before it is < top_p (so the first token always is).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return logits


def _filter_logits_rows(logits: jax.Array, top_k, top_p) -> jax.Array:
  """`filter_logits` with a top_k and top_p per row: one descending sort serves both filters."""
  batch, vocab = logits.shape
  neg = jnp.finfo(logits.dtype).min
  top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (batch,))
  top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (batch,))[:, None]
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
  kth = jnp.take_along_axis(sorted_logits, k[:, None] - 1, axis=-1)
  logits = jnp.where(logits < kth, neg, logits)
  sorted_logits = jnp.where(sorted_logits < kth, neg, sorted_logits)  # masking keeps the order.
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  # top_p = 1 is off: rounding can bring the cumulative mass to 1.0 before the tail, which must stay.
  return jnp.where((top_p < 1.0) & (logits < cutoff), neg, logits)


def sample_token(logits, key, temperature: float, top_k: int, top_p: float):
  if temperature <= 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "eos_id", "cache_len"))
def _generate(params, prompts, lengths, key, *, graphdef, max_new_tokens, temperature, top_k, top_p,
              eos_id, cache_len):
  from flax import nnx
  model = nnx.merge(graphdef, params)
  batch, plen = prompts.shape
  cache = model.init_cache(batch, cache_len)
  positions = jnp.broadcast_to(jnp.arange(plen), (batch, plen))
  logits, cache = model.decode(prompts, positions=positions, cache=cache)
  last = logits[jnp.arange(batch), lengths - 1]
  key, sub = jax.random.split(key)
  token = sample_token(last, sub, temperature, top_k, top_p)
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
  done = token == eos_id

  def cond(carry):
    t, _, _, _, done, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    t, token, cache, out, done, key = carry
    pos = (lengths + t - 1)[:, None]
    logits, cache = model.decode(token[:, None], positions=pos, cache=cache)
    key, sub = jax.random.split(key)
    nxt = sample_token(logits[:, 0], sub, temperature, top_k, top_p)
    nxt = jnp.where(done, eos_id, nxt)
    out = out.at[:, t].set(nxt)
    return t + 1, nxt, cache, out, done | (nxt == eos_id), key

  _, _, _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, out, done, key))
  return out


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """(prompts right-padded to `width` (default: the longest) [B, width] int32, their lengths [B])."""
  lengths = np.array([len(e) for e in prompts], np.int32)
  if lengths.size == 0 or lengths.min() < 1:
    raise ValueError("every prompt needs at least one token (e.g. BOS)")
  width = int(lengths.max()) if width is None else width
  if lengths.max() > width:
    raise ValueError(f"a prompt of {int(lengths.max())} tokens does not fit the padded width {width}")
  padded = np.full((len(prompts), width), pad_id, np.int32)
  for i, e in enumerate(prompts):
    padded[i, :len(e)] = e
  return padded, lengths


def generate_ids(model, prompts: Sequence[Sequence[int]], *, eos_id: int, pad_id: int = 0,
                 max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, pad_to: int | None = None) -> list[list[int]]:
  """Completes each token-id prompt; returns the new ids of each row, cut before its first EOS (so a
  row shorter than `max_new_tokens` is one that stopped). Prompts are padded to the batch's longest, or
  to a fixed `pad_to` so callers with changing prompt lengths (RL rollouts) compile the sampler once."""
  from flax import nnx
  padded, lengths = pad_prompts(prompts, pad_id, pad_to)
  plen = padded.shape[1]
  cache_len = plen + max_new_tokens
  if cache_len > model.cfg.max_seq_len:
    raise ValueError(f"prompt ({plen} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                     f"context ({model.cfg.max_seq_len})")
  graphdef, params = nnx.split(model, nnx.Param)
  ids = _generate(nnx.to_pure_dict(params), jnp.asarray(padded), jnp.asarray(lengths),
                  jax.random.PRNGKey(seed), graphdef=graphdef, max_new_tokens=max_new_tokens,
                  temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                  eos_id=eos_id, cache_len=cache_len)
  out = []
  for row in np.asarray(ids).tolist():
    out.append(row[:row.index(eos_id)] if eos_id in row else row)
  return out


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
  """Completes each prompt; returns the generated text only (prompt excluded, stops at EOS)."""
  encoded = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
  rows = generate_ids(model, encoded, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      seed=seed)
  return [tokenizer.decode(row) for row in rows]


def load_for_inference(path, **kwargs):
  """(model, tokenizer, meta) from a run or step directory; the tokenizer travels in the checkpoint.
  `kwargs` go to `model.load.load_model` (e.g. `quantize="int8"`, `compute_dtype="float32"`)."""
  from data.tokenizer import tokenizer_from_meta
  from model.load import load_model
  model, meta = load_model(path, **kwargs)
  tokenizer = tokenizer_from_meta(meta)
  if tokenizer.vocab_size > model.cfg.vocab_size:
    raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds the model's "
                     f"({model.cfg.vocab_size}) in {path}")
  return model, tokenizer, meta


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.sample", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint step directory")
  parser.add_argument("--prompt", action="append", help="prompt text (repeatable)")
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.8)
  parser.add_argument("--top_k", type=int, default=50)
  parser.add_argument("--top_p", type=float, default=0.95)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    model, tokenizer, _ = load_for_inference(args.checkpoint)
    texts = generate(model, tokenizer, args.prompt or [""], max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for prompt, text in zip(args.prompt or [""], texts):
    print(f"=== {prompt!r}\n{prompt}{text}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
