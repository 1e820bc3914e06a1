"""Per-request sampling inside the engine's jitted step: every row of a batch has its own settings.

    out = sample(logits [B, V], temperature [B], top_k [B], top_p [B], seeds [B] uint32, steps [B] int32)
    out["tokens"], out["logprobs"], out["top_ids"], out["top_logprobs"]

Temperature 0 is greedy (argmax). Otherwise logits / temperature are filtered by the row's top-k and top-p
(`train.sample.filter_logits` with per-row arrays) and sampled with the key fold_in(PRNGKey(seed), step),
`step` being the index of the token in the request's output: a seeded request draws the same tokens
whatever shares its batch, and again after a preemption recomputes it. Log-probs are those of the
temperature-1, unfiltered distribution (what OpenAI's API reports), for the sampled token and the
`MAX_TOP_LOGPROBS` best; the host keeps what each request asked for.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from train.sample import filter_logits

MAX_TOP_LOGPROBS = 20  # OpenAI's API caps top_logprobs at 20; SamplingParams.logprobs does too.


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           seeds: jax.Array, steps: jax.Array) -> dict[str, jax.Array]:
  logits = logits.astype(jnp.float32)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  greedy = jnp.argmax(logits, axis=-1)
  hot = temperature > 0
  scaled = logits / jnp.where(hot, temperature, 1.0)[:, None]
  filtered = filter_logits(scaled, top_k, top_p)
  keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seeds, steps)
  drawn = jax.vmap(jax.random.categorical)(keys, filtered)
  tokens = jnp.where(hot, drawn, greedy).astype(jnp.int32)
  top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_TOP_LOGPROBS, logits.shape[-1]))
  return dict(tokens=tokens, logprobs=jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0],
              top_ids=top_ids.astype(jnp.int32), top_logprobs=top_logprobs)
