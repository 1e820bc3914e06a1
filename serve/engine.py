"""Serving engine: paged KV cache, continuous batching, chunked prefill, prefix caching, per-request sampling.

    engine = Engine(model, eos_id=tok.eos_id, max_slots=8)
    engine.add_request(Request("r1", prompt_ids, SamplingParams(max_tokens=64, temperature=0.7, seed=1)))
    while engine.has_unfinished():
      for ev in engine.step(): ...            # serve/api.py TokenEvent: one per token (several with a draft)
    outs = engine.generate([ids_a, ids_b], SamplingParams(temperature=0))   # offline: run to completion

Run by the HTTP server (`python -m serve`), benchmarks and alignment rollouts; tested by
`tests/test_serve_engine.py`. Token ids only: text is the server's job.

One `step()` is one scheduler iteration (iteration-level batching, Orca, Yu et al. 2022; vLLM's scheduler):
  1. Every running sequence (at most `max_slots`) gets work, oldest first: a sequence whose only
     uncomputed token is its last sampled one decodes it; one still in its prompt gets the next chunk of
     at most `prefill_chunk` tokens, within what the per-step budget `max_step_tokens` leaves after one
     token per decode, so a long prompt is spread over steps and never stalls the decodes (chunked
     prefill, Sarathi, Agrawal et al. 2024).
  2. Waiting requests join while a slot, budget and KV blocks are free; a prefix-cache hit
     (`serve/blocks.py`) skips the prefill of the cached full blocks.
  3. Jitted calls: all one-token rows ([B, 1]), and the chunk rows ([B, T]) in one call per chunk-length
     bucket; each writes its K/V to the paged cache, reads its rows' pages, and samples a token for every
     row whose prompt is now complete.
  4. Sampled tokens become events; a request leaves at once on EOS, a stop token or max_tokens.

Memory never overflows: pages are taken from the block manager only when it can give them. A request is
admitted when the pages of its first chunk can be had (keeping one spare page per running sequence);
a running sequence that needs a page when none is left takes it by preempting the most recently
admitted sequence, which frees its pages and goes back to the head of the queue to be recomputed later
(vLLM's recompute preemption; its full blocks stay in the prefix cache, so the recompute is mostly hits,
and seeded sampling keys on the token index, so it draws the same tokens again). The oldest sequence can
always proceed, and `add_request` refuses a request that could not fit the cache alone.

Compiled shapes are fixed: batch rows padded to powers of two up to `max_slots`, chunk length to powers
of two from 16 up to `prefill_chunk`, block-table width to powers of two and their 1.5× midpoints of
≥ 128 tokens up to the context, so a steady load compiles a handful of programs once. Padding tokens have
position -1: they write only the null page 0 and see nothing.

Speculative decoding (`Engine(model, draft=small_model, spec_k=4)`; Leviathan et al. 2023, the rule and its
tests in `serve/speculative.py`): every decode row becomes one jitted round, `_speculate`: the draft proposes
k tokens (k one-token calls on its own page pool, indexed by the same block tables: same page ids, so one
block manager and one prefix-cache key space cover both caches), the target scores [last, x_1..x_k] in one
[B, k+1] call, and `serve.speculative.verify` keeps 1..k+1 tokens per row with that row's temperature /
top-k / top-p and the key fold_in(PRNGKey(seed), index of the round's first token), so a seeded request's
tokens do not depend on its batch. Stop conditions cut the kept run (one TokenEvent per kept token).
Before a round a row's table covers position + k (capped at prompt + max_tokens); pages holding only
rejected positions are kept for the next rounds (their stale K/V lie past the row's position, masked, and
are overwritten). Prefill chunks run through both models, so every computed block is in both caches;
a block is committed to the prefix cache only once the draft has it too (a fully accepted round leaves
x_k out of the draft's cache until the next round feeds it, as the first of [prev, last]). After a
preemption the recompute samples its next token from the target directly (exact, but not the token
the interrupted speculation would have drawn).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from serve.api import Request, SamplingParams, TokenEvent
from serve.blocks import BlockManager
from serve.sampling import MAX_TOP_LOGPROBS, sample
from serve.speculative import draw, exact_accept, verify
from train.sample import filter_logits


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _forward(state, cache, tokens, positions, tables, last, temperature, top_k, top_p, seeds, steps, *,
             graphdef, greedy=False):
  """One padded batch through the model with the paged cache; samples at each row's `last` index.

  `greedy`: every row is temperature 0 without logprobs, so the argmax is all it needs: the vocab sort,
  draws and top-20 of `sample` cost 15 ms of a 50 ms decode step of 32 rows (4.3M params, 2-core CPU).
  """
  model = nnx.merge(graphdef, state)
  logits, cache = model.decode(tokens, positions=positions, cache=cache, block_tables=tables,
                               logits_at=last)
  if greedy:
    return cache, dict(tokens=jnp.argmax(logits[:, 0].astype(jnp.float32), axis=-1).astype(jnp.int32))
  return cache, sample(logits[:, 0], temperature, top_k, top_p, seeds, steps)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _draft_fill(state, cache, tokens, positions, tables, *, graphdef):
  """A prefill chunk through the draft: only its K/V are wanted (the head runs on one token per row)."""
  model = nnx.merge(graphdef, state)
  _, cache = model.decode(tokens, positions=positions, cache=cache, block_tables=tables,
                          logits_at=jnp.zeros(tokens.shape[0], jnp.int32))
  return cache


def _row_probs(logits, temperature, top_k, top_p):
  """`serve.speculative.token_probs` with per-row settings: logits [B, T, V] → the law each row samples
  from (one-hot argmax where temperature is 0, else softmax of the tempered, top-k/top-p filtered logits)."""
  batch, t, vocab = logits.shape
  logits = logits.astype(jnp.float32)
  hot = temperature > 0
  scaled = logits / jnp.where(hot, temperature, 1.0)[:, None, None]
  filtered = filter_logits(scaled.reshape(batch * t, vocab), jnp.repeat(top_k, t), jnp.repeat(top_p, t))
  soft = jax.nn.softmax(filtered, axis=-1).reshape(batch, t, vocab)
  return jnp.where(hot[:, None, None], soft, jax.nn.one_hot(jnp.argmax(logits, -1), vocab, dtype=jnp.float32))


@functools.partial(jax.jit, static_argnames=("graphdef", "draft_graphdef", "k", "logprobs", "accept", "greedy"),
                   donate_argnames=("cache", "draft_cache"))
def _speculate(state, draft_state, cache, draft_cache, tokens, positions, tables, temperature, top_k, top_p,
               seeds, steps, *, graphdef, draft_graphdef, k, logprobs=False, accept=exact_accept, greedy=False):
  """One speculative round per row. tokens/positions [B, 2]: (prev, last) at (c - 1, c), padding rows -1;
  positions past the context are -1 too (they are past max_tokens: their tokens are dropped anyway).

  The draft's first call rewrites `prev`, which a fully accepted round left out of its cache. Returns the
  caches and per row `tokens` [k+1] (x_1..x_a, then the resampled or bonus token at index a), `accepted`
  (a), and with `logprobs` the target's temperature-1 log-probs of those tokens and its top 20.
  `greedy` (every row at temperature 0): the laws are one-hot argmaxes, without the per-row top-k/top-p
  sorts of the vocabulary (runs/tiny, 8 rows, k = 4, vocab 4096, shared 2-core CPU: 110 → 61 ms a step).
  """
  model, draft = nnx.merge(graphdef, state), nnx.merge(draft_graphdef, draft_state)
  batch, limit = tokens.shape[0], model.cfg.max_seq_len
  if greedy:
    probs = lambda x: jax.nn.one_hot(jnp.argmax(x, -1), x.shape[-1], dtype=jnp.float32)  # noqa: E731
  else:
    probs = functools.partial(_row_probs, temperature=temperature, top_k=top_k, top_p=top_p)
  rows, pos = jnp.arange(batch), positions[:, 1]
  at = lambda j: jnp.where((pos >= 0) & (pos + j < limit), pos + j, -1)  # noqa: E731
  keys = jax.vmap(lambda s, i: jax.random.split(jax.random.fold_in(jax.random.PRNGKey(s), i), k + 1))(
      seeds, steps)  # [B, k+1]: k draft draws, then the verification's.
  logits, draft_cache = draft.decode(tokens, positions=positions, cache=draft_cache, block_tables=tables,
                                     logits_at=jnp.ones(batch, jnp.int32))
  xs, qs = [], []
  for j in range(k):
    if j:
      logits, draft_cache = draft.decode(xs[-1][:, None], positions=at(j)[:, None], cache=draft_cache,
                                         block_tables=tables)
    qs.append(probs(logits)[:, 0])
    xs.append(jax.vmap(draw)(qs[-1], keys[:, j]))
  proposed, q = jnp.stack(xs, 1), jnp.stack(qs, 1)  # [B, k], [B, k, V]
  chunk = jnp.concatenate([tokens[:, 1:], proposed], axis=1)
  logits, cache = model.decode(chunk, positions=jnp.stack([at(j) for j in range(k + 1)], 1), cache=cache,
                               block_tables=tables)  # [B, k+1, V]: every position's logits.
  p = probs(logits)
  one = lambda p, q, x, key: [v[0] for v in verify(p[None], q[None], x[None], key, accept)]  # noqa: E731
  accepted, nxt = jax.vmap(one)(p, q, proposed, keys[:, k])  # per row: its own key, whatever the batch.
  emitted = jnp.concatenate([proposed, nxt[:, None]], axis=1).at[rows, accepted].set(nxt)
  out = dict(tokens=emitted, accepted=accepted)
  if logprobs:
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    out["logprobs"] = jnp.take_along_axis(lp, emitted[..., None], axis=-1)[..., 0]
    out["top_logprobs"], top_ids = jax.lax.top_k(lp, min(MAX_TOP_LOGPROBS, lp.shape[-1]))
    out["top_ids"] = top_ids.astype(jnp.int32)
  return cache, draft_cache, out


def _buckets(lo: int, hi: int) -> list[int]:
  out, b = [], max(1, lo)
  while b < hi:
    out.append(b)
    b *= 2
  return out + [hi]


def _table_buckets(lo: int, hi: int) -> list[int]:
  """Powers of two from `lo` and the midpoints 1.5× between them, up to `hi`. Chosen when the XLA paged
  read gathered the whole padded table (32 rows: 47 ms at 256 tokens, 110 ms at 512, 2-core CPU); the
  split-K `paged.attend` scores only the chunks rows reach, so the width now mostly sets the number of
  compiled programs and the size of the read's work list."""
  out = sorted({x for b in _buckets(lo, hi) for x in (b, b * 3 // 2) if x < hi and x >= lo})
  return out + [hi]


def _fit(buckets: list[int], n: int) -> int:
  return next(b for b in buckets if b >= n)


@dataclasses.dataclass(eq=False)
class _Seq:
  req: Request
  tokens: list[int]  # prompt + output so far.
  seed: int
  num_computed: int = 0  # tokens whose K/V are in the cache.

  @property
  def id(self) -> str:
    return self.req.request_id

  @property
  def pending(self) -> int:
    return len(self.tokens) - self.num_computed

  @property
  def num_output(self) -> int:
    return len(self.tokens) - len(self.req.prompt_ids)


class Engine:
  """Continuous-batching engine over a paged KV cache; single-threaded (drive it from one thread)."""

  def __init__(self, model, *, eos_id: int, block_size: int = 16, num_blocks: int | None = None,
               max_slots: int = 8, prefill_chunk: int = 256, max_step_tokens: int | None = None,
               prefix_caching: bool = True, kv_cache_bytes: int | None = None, cache_dtype=None,
               seed: int = 0, draft=None, spec_k: int = 4):
    """
    Args:
      model: a `model.transformer.Transformer` (its params are captured now).
      eos_id: ends every request (besides its own stop_token_ids).
      block_size: tokens per KV-cache page.
      num_blocks: pages in the cache (page 0, the null page, comes on top). Default: from
        `kv_cache_bytes` if given, else enough for every slot at full context (then nothing is ever
        preempted).
      max_slots: most sequences running at once (the decode batch).
      prefill_chunk: most prompt tokens of one sequence computed in one step.
      max_step_tokens: tokens computed per step, decodes + prefill chunks. Default prefill_chunk + max_slots.
      prefix_caching: reuse the K/V of full blocks of earlier prompts with the same prefix.
      kv_cache_bytes: memory budget of the cache, used when num_blocks is None.
      cache_dtype: K/V dtype; default the model's compute dtype (fp32 on CPU, where 16-bit scatters are slow).
      seed: draws the seeds of requests that bring none.
      draft: a smaller `Transformer` with the same vocabulary: speculative decoding (module docstring).
      spec_k: tokens the draft proposes per round.
    """
    cfg = model.cfg
    dtype = jnp.dtype(cache_dtype or cfg.compute_dtype)
    if cache_dtype is None and dtype.itemsize == 2 and jax.default_backend() == "cpu":
      # XLA:CPU emulates a 16-bit scatter by converting the whole buffer: writing 8 tokens into one layer's
      # [4, 1025, 16, 64] pages took 10 ms in bf16, 0.01 ms in fp32 (2-core CPU). Twice the memory, same
      # K/V values (bf16 → fp32 is exact), so the same outputs.
      dtype = jnp.dtype(jnp.float32)
    for name, value in dict(block_size=block_size, max_slots=max_slots, prefill_chunk=prefill_chunk).items():
      if value < 1:
        raise ValueError(f"{name} must be ≥ 1, got {value}")
    max_step_tokens = prefill_chunk + max_slots if max_step_tokens is None else max_step_tokens
    if max_step_tokens <= max_slots:
      raise ValueError(f"max_step_tokens ({max_step_tokens}) must exceed max_slots ({max_slots}), or a full "
                       "decode batch would leave no token for prefills")
    self.eos_id, self.block_size, self.max_slots = eos_id, block_size, max_slots
    self.prefill_chunk, self.max_step_tokens = prefill_chunk, max_step_tokens
    self.max_len, self.vocab_size = cfg.max_seq_len, cfg.vocab_size
    blocks_per_seq = -(-self.max_len // block_size)
    if num_blocks is None:
      if kv_cache_bytes is not None:  # K and V, every layer, one page.
        page_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * block_size * cfg.hd * dtype.itemsize
        num_blocks = kv_cache_bytes // page_bytes - 1
      else:
        num_blocks = max_slots * blocks_per_seq
    if num_blocks < 1:
      raise ValueError(f"the KV cache needs at least one block; got num_blocks={num_blocks} "
                       f"(kv_cache_bytes={kv_cache_bytes})")
    self._graphdef, self._state = nnx.split(model)
    self._cache = model.init_paged_cache(num_blocks + 1, block_size, dtype)
    self._blocks = BlockManager(num_blocks, block_size, prefix_caching=prefix_caching)
    self._draft, self.spec_k = None, spec_k
    self._accept = exact_accept  # the acceptance rule; tests swap in a wrong one to see it caught.
    if draft is not None:
      if draft.cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                         f"({cfg.vocab_size}); speculative decoding needs the same token ids")
      if draft.cfg.max_seq_len < cfg.max_seq_len:
        raise ValueError(f"the draft's context ({draft.cfg.max_seq_len}) is shorter than the target's "
                         f"({cfg.max_seq_len})")
      if spec_k < 1:
        raise ValueError(f"spec_k (draft tokens per round) must be ≥ 1, got {spec_k}")
      self._draft = nnx.split(draft)  # (graphdef, state); its pages share the target's page ids.
      self._draft_cache = draft.init_paged_cache(num_blocks + 1, block_size, dtype)
    self._batch_buckets = _buckets(1, max_slots)
    self._chunk_buckets = _buckets(min(16, prefill_chunk), prefill_chunk)
    # Table widths of ≥ 128 tokens: narrower ones would save little work and cost compiles.
    self._table_buckets = _table_buckets(min(blocks_per_seq, -(-128 // block_size)), blocks_per_seq)
    self._rng = np.random.default_rng(seed)
    self._ids = itertools.count()
    self._seqs: dict[str, _Seq] = {}
    self._waiting: collections.deque[_Seq] = collections.deque()
    self._running: list[_Seq] = []  # admission order: the last is preempted first.
    self._counters = collections.Counter()

  # ------------------------------------------------------------------ requests

  def add_request(self, req: Request) -> None:
    """Queues a request; ValueError (one line, naming it) when it cannot be served."""
    self._validate(req)
    seed = req.params.seed if req.params.seed is not None else int(self._rng.integers(2 ** 32))
    seq = _Seq(req, [int(t) for t in req.prompt_ids], seed % 2 ** 32)
    self._seqs[req.request_id] = seq
    self._waiting.append(seq)

  def _validate(self, req: Request) -> None:
    rid, n, p = req.request_id, len(req.prompt_ids), req.params
    if rid in self._seqs:
      raise ValueError(f"request {rid!r} is already in flight")
    if n == 0:
      raise ValueError(f"request {rid!r}: the prompt is empty; it needs at least one token (e.g. BOS)")
    if n + p.max_tokens > self.max_len:
      raise ValueError(f"request {rid!r}: prompt ({n} tokens) + max_tokens ({p.max_tokens}) exceeds the "
                       f"model's context ({self.max_len})")
    bad = next((t for t in req.prompt_ids if not 0 <= int(t) < self.vocab_size), None)
    if bad is not None:
      raise ValueError(f"request {rid!r}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
    need = self._blocks.blocks_for(n + p.max_tokens)
    if need > self._blocks.num_blocks:
      raise ValueError(f"request {rid!r}: needs {need} KV-cache blocks of {self.block_size} tokens but the "
                       f"cache has {self._blocks.num_blocks}; raise num_blocks or kv_cache_bytes")

  def abort(self, request_id: str) -> None:
    """Drops a request now, freeing its slot and blocks; unknown or finished ids are ignored."""
    seq = self._seqs.pop(request_id, None)
    if seq is None:
      return
    if seq in self._running:
      self._running.remove(seq)
    else:
      self._waiting.remove(seq)
    self._blocks.free(seq.id)

  def has_unfinished(self) -> bool:
    return bool(self._waiting or self._running)

  def generate(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[list[int]]:
    """Runs the prompts to completion; the generated ids of each, its stop token (EOS or stop id) included.

    Offline use only: it refuses to start while other requests are in flight, whose events it would eat.
    """
    if self.has_unfinished():
      raise RuntimeError("generate() needs an idle engine; other requests are in flight")
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(plist) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
    reqs = [Request(f"generate-{next(self._ids)}", tuple(p), sp) for p, sp in zip(prompts, plist)]
    for req in reqs:  # all or none: a bad prompt must not leave the others queued.
      self._validate(req)
    for req in reqs:
      self.add_request(req)
    out = {r.request_id: [] for r in reqs}
    while self.has_unfinished():
      for ev in self.step():
        out[ev.request_id].append(ev.token_id)
    return [out[r.request_id] for r in reqs]

  def stats(self) -> dict[str, int]:
    b = self._blocks
    return dict(requests_waiting=len(self._waiting), requests_running=len(self._running),
                blocks_total=b.num_blocks, blocks_used=b.num_used, blocks_free=b.num_free,
                blocks_cached=b.num_cached, block_size=self.block_size, evictions=b.evictions,
                prefix_hit_tokens=self._counters["prefix_hit_tokens"],
                prefix_query_tokens=self._counters["prefix_query_tokens"],
                preemptions=self._counters["preemptions"], steps=self._counters["steps"],
                computed_tokens=self._counters["computed_tokens"],
                generated_tokens=self._counters["generated_tokens"],
                **(self._spec_stats() if self._draft is not None else {}))

  def _spec_stats(self) -> dict[str, float]:
    """Proposed/accepted draft tokens (before cutting at stops) and tokens per row-round (1..k+1)."""
    c = self._counters
    return dict(spec_rounds=c["spec_rounds"], spec_proposed=c["spec_proposed"],
                spec_accepted=c["spec_accepted"],
                spec_acceptance_rate=c["spec_accepted"] / max(c["spec_proposed"], 1),
                spec_tokens_per_round=(c["spec_accepted"] + c["spec_rounds"]) / max(c["spec_rounds"], 1))

  # ------------------------------------------------------------------ one iteration

  def step(self) -> list[TokenEvent]:
    """One scheduler iteration: prefill chunks + one decode token per running sequence."""
    work = self._schedule()
    if not work:
      return []
    self._counters["steps"] += 1
    spec = [w for w in work if self._is_spec(*w)]
    launched = []  # the calls are dispatched before any result is fetched (host prep overlaps).
    if spec:
      launched.append((spec, self._run_spec(spec)))
    # One call for the one-token rows and one per chunk-length bucket of the prompt chunks: padded to one
    # shape, chunks of 200, 50 and 38 tokens would compute 3 × 256 (2.7× the work; with 32 decodes on a
    # 2-core CPU, 4.3M params, steps with chunks took 85 ms against 37 ms without).
    groups = collections.defaultdict(list)
    for w in work:
      if w[1] > 1 or not self._is_spec(*w):
        groups[_fit(self._chunk_buckets, w[1]) if w[1] > 1 else 1].append(w)
    for length, group in sorted(groups.items()):
      launched.append((group, self._run(group, [length])))
    results = {}
    for group, out in launched:
      out = jax.device_get(out)
      results.update({seq.id: {k: v[row] for k, v in out.items()} for row, (seq, _) in enumerate(group)})
    events = []
    for seq, n in work:
      if self._is_spec(seq, n):
        events.extend(self._emit_spec(seq, results[seq.id]))
        continue
      seq.num_computed += n
      self._counters["computed_tokens"] += n
      self._blocks.commit(seq.id, seq.tokens, seq.num_computed)
      if seq.pending == 0:  # the prompt (or recompute) is done: this row's sample is the next token.
        events.append(self._emit(seq, results[seq.id]))
    return events

  def _schedule(self) -> list[tuple[_Seq, int]]:
    """(sequence, tokens to compute) for this step; takes the KV pages, preempting when it must."""
    decodes = sum(1 for s in self._running if s.pending == 1)
    budget = self.max_step_tokens - decodes  # left for prefill chunks.
    work = []
    i = 0
    while i < len(self._running):
      seq = self._running[i]
      n = 1 if seq.pending == 1 else min(seq.pending, self.prefill_chunk, budget)
      if n == 0:
        i += 1
        continue
      while not self._blocks.grow(seq.id, self._need(seq, seq.num_computed, n)):
        victim = self._running[-1]  # victims come from the tail, never from work already scheduled.
        self._preempt(victim)
        if victim is seq:
          break
      if seq not in self._running:
        break
      if seq.pending > 1:
        budget -= n
      work.append((seq, n))
      i += 1
    while self._waiting and len(self._running) < self.max_slots and budget > 0:
      seq = self._waiting[0]
      hits = self._blocks.lookup(seq.tokens)
      cached = len(hits) * self.block_size
      n = min(len(seq.tokens) - cached, self.prefill_chunk, budget)
      if not self._blocks.admit(seq.id, hits, self._need(seq, cached, n), reserve=len(self._running)):
        break
      self._waiting.popleft()
      self._running.append(seq)
      seq.num_computed = cached
      self._counters["prefix_hit_tokens"] += cached
      self._counters["prefix_query_tokens"] += len(seq.tokens)
      budget -= n
      work.append((seq, n))
    return work

  def _is_spec(self, seq: _Seq, n: int) -> bool:
    """Whether this work item is a speculative round: a draft is set and only the last token is pending."""
    return self._draft is not None and n == 1 and seq.pending == 1

  def _need(self, seq: _Seq, computed: int, n: int) -> int:
    """Tokens the sequence's pages must hold to compute n more: a speculative round writes k more, up to
    the last position whose logits can still give a kept token (prompt + max_tokens)."""
    if self._draft is None or n != 1 or len(seq.tokens) - computed != 1:
      return computed + n
    return max(computed + 1, min(computed + 1 + self.spec_k, len(seq.req.prompt_ids) + seq.req.params.max_tokens))

  def _preempt(self, seq: _Seq) -> None:
    self._running.remove(seq)
    self._blocks.free(seq.id)  # its committed full blocks stay cached for the recompute.
    seq.num_computed = 0
    self._waiting.appendleft(seq)
    self._counters["preemptions"] += 1

  def _run(self, group: list[tuple[_Seq, int]], lengths: list[int]) -> dict[str, jax.Array]:
    """Pads the group to bucketed shapes and dispatches `_forward`; returns its (device) samples."""
    b = _fit(self._batch_buckets, len(group))
    t = _fit(lengths, max(n for _, n in group))
    m = _fit(self._table_buckets, max(self._blocks.blocks_for(s.num_computed + n) for s, n in group))
    tokens, positions = np.zeros((b, t), np.int32), np.full((b, t), -1, np.int32)
    tables, last = np.zeros((b, m), np.int32), np.zeros(b, np.int32)
    temperature, top_p = np.zeros(b, np.float32), np.ones(b, np.float32)
    top_k, steps, seeds = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.uint32)
    for r, (seq, n) in enumerate(group):
      c, p = seq.num_computed, seq.req.params
      tokens[r, :n] = seq.tokens[c:c + n]
      positions[r, :n] = np.arange(c, c + n)
      table = self._blocks.table(seq.id)
      tables[r, :len(table)] = table
      last[r] = n - 1
      temperature[r], top_k[r], top_p[r] = p.temperature, p.top_k, p.top_p
      seeds[r], steps[r] = seq.seed, seq.num_output
    greedy = all(s.req.params.temperature == 0 and s.req.params.logprobs is None for s, _ in group)
    self._cache, out = _forward(self._state, self._cache, tokens, positions, tables, last, temperature,
                                top_k, top_p, seeds, steps, graphdef=self._graphdef, greedy=greedy)
    if self._draft is not None:  # the draft's cache gets every computed token too.
      self._draft_cache = _draft_fill(self._draft[1], self._draft_cache, tokens, positions, tables,
                                      graphdef=self._draft[0])
    return out

  def _run_spec(self, group: list[tuple[_Seq, int]]) -> dict[str, jax.Array]:
    """Pads the decode rows and dispatches one `_speculate` round; returns its (device) outputs."""
    b = _fit(self._batch_buckets, len(group))
    m = _fit(self._table_buckets, max(len(self._blocks.table(s.id)) for s, _ in group))
    tokens, positions = np.zeros((b, 2), np.int32), np.full((b, 2), -1, np.int32)
    tables = np.zeros((b, m), np.int32)
    temperature, top_p = np.zeros(b, np.float32), np.ones(b, np.float32)
    top_k, steps, seeds = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.uint32)
    for r, (seq, _) in enumerate(group):
      c, p = seq.num_computed, seq.req.params
      tokens[r] = seq.tokens[max(c - 1, 0)], seq.tokens[c]
      positions[r] = c - 1, c  # c = 0 (a one-token prompt): prev is padding.
      table = self._blocks.table(seq.id)
      tables[r, :len(table)] = table
      temperature[r], top_k[r], top_p[r] = p.temperature, p.top_k, p.top_p
      seeds[r], steps[r] = seq.seed, seq.num_output
    logprobs = any(s.req.params.logprobs is not None for s, _ in group)
    greedy = all(s.req.params.temperature == 0 for s, _ in group)
    self._cache, self._draft_cache, out = _speculate(
        self._state, self._draft[1], self._cache, self._draft_cache, tokens, positions, tables, temperature,
        top_k, top_p, seeds, steps, graphdef=self._graphdef, draft_graphdef=self._draft[0], k=self.spec_k,
        logprobs=logprobs, accept=self._accept, greedy=greedy)
    return out

  def _emit_spec(self, seq: _Seq, out: dict[str, np.ndarray]) -> list[TokenEvent]:
    """The kept tokens of one round, one event each, cut at the first that finishes the request."""
    a, c, k = int(out["accepted"]), seq.num_computed, self.spec_k
    self._counters.update(spec_rounds=1, spec_proposed=k, spec_accepted=a)
    events = []
    for j in range(a + 1):
      token = {"tokens": out["tokens"][j]}
      if "logprobs" in out:
        token.update({name: out[name][j] for name in ("logprobs", "top_ids", "top_logprobs")})
      events.append(self._emit(seq, token))
      if events[-1].finished:
        break
    self._counters["computed_tokens"] += len(events)  # target K/V of positions c..c+len-1 are now valid.
    if not events[-1].finished:
      seq.num_computed = c + a + 1
      # The draft holds positions < c + k (x_k enters next round): commit no block it lacks.
      self._blocks.commit(seq.id, seq.tokens, min(seq.num_computed, c + k))
    return events

  def _emit(self, seq: _Seq, out: dict[str, np.ndarray]) -> TokenEvent:
    token, p = int(out["tokens"]), seq.req.params
    seq.tokens.append(token)
    self._counters["generated_tokens"] += 1
    reason = None
    if token == self.eos_id or token in p.stop_token_ids:
      reason = "stop"
    elif seq.num_output >= p.max_tokens or len(seq.tokens) >= self.max_len:
      reason = "length"
    top = None
    if p.logprobs:
      top = tuple((int(i), float(lp)) for i, lp in zip(out["top_ids"][:p.logprobs],
                                                       out["top_logprobs"][:p.logprobs]))
    if reason is not None:  # leaves at once: slot and blocks go to the next request this step.
      self._running.remove(seq)
      self._blocks.free(seq.id)
      del self._seqs[seq.id]
    return TokenEvent(seq.id, token, logprob=None if p.logprobs is None else float(out["logprobs"]),
                      top_logprobs=top, finished=reason is not None, finish_reason=reason)
