"""Log-likelihood and generation on a trained model: the scoring core under every evaluation.

    lm = LanguageModel.from_checkpoint("runs/tiny", batch_size=16)
    lm.loglikelihood([("The cat sat on the", " mat")])        # [(sum log p, is_greedy)]
    lm.loglikelihood_rolling([document])                      # [sum log p]: perplexity, bits per byte
    lm.rolling_tokens([document])                             # [(sum log p, tokens predicted)]
    lm.generate_until([("Q: 2+2=?\\nA:", {"until": ["\\n"], "max_gen_toks": 32})])

Library module, no entry point: `train/evaluate.py` and the lm-evaluation-harness adapter
(`train/lm_eval_adapter.py`, run as `python -m train.lm_eval`) sit on top of it. Semantics follow
lm-eval's HFLM so numbers are comparable with harness results:
- loglikelihood: trailing spaces of the context move to the continuation, `encode(context +
  continuation)` is split at `len(encode(context))` (separate encodes when that split doesn't reproduce
  the context's tokens), BOS is prepended (the project trains with BOS), and a sequence longer than
  `max_len` + 1 loses tokens from the left (the continuation and the most recent context stay).
- rolling: every token of the text is predicted exactly once; the first window is conditioned on BOS
  alone, each later window predicts the next `rolling_stride` tokens with the `max_len` tokens before
  them as input. `rolling_stride == max_len` (the default) is lm-eval's `get_rolling_token_windows(...,
  context_len=1)` + `make_disjoint_window`; a smaller stride gives every token at least
  `max_len - stride` tokens of context, at `max_len / stride` times the compute.
- generate_until: lm-eval's gen kwargs; `do_sample=False` forces greedy; the prompt is left-truncated to
  `max_len - max_gen_toks`; the text is cut at the first stop string; EOS stops. Without `max_gen_toks`
  a request gets the constructor's `max_gen_toks` (256, lm-eval's default; max_len // 2 if smaller).

Batching: requests are sorted by length (longest first, as lm-eval does, so the first batch shows the
peak memory), padded to power-of-two lengths ≥ 32 capped at `max_len` and to `batch_size` rows (a
power of two for calls smaller than one batch), so jit compiles a handful of shapes. One jitted forward
per batch returns only the [B, T] target log-probs (log-softmax in fp32) and argmax hits; batches are
dispatched a few ahead of the one being read back, so host-side padding overlaps device compute.
Results come back in request order. Generation reuses `train.sample`'s jitted KV-cache sampler.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_MIN_BUCKET = 32  # shortest padded length: below it a forward is all overhead and compiles add up.
_IN_FLIGHT = 4  # batches dispatched ahead of the one being read back.
# lm-eval's generation keys. Lengths have aliases (HF, vLLM/OpenAI), first given wins, as in
# lm_eval.models.utils.normalize_gen_kwargs.
_MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
_GEN_KEYS = frozenset(("until", "temperature", "top_k", "top_p", "do_sample", "seed") + _MAX_TOKEN_KEYS)


def _pow2_at_least(n: int, floor: int = 1) -> int:
  return max(floor, 1 << max(0, n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _target_logprobs(params, tokens, targets, *, graphdef):
  """tokens, targets [B, T] → (log p(target) fp32 [B, T], target is the argmax [B, T])."""
  model = nnx.merge(graphdef, params)
  logits = model(tokens).astype(jnp.float32)
  # take - logsumexp == log_softmax gathered at the target, without a second [B, T, V] array.
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logp = picked - jax.nn.logsumexp(logits, axis=-1)
  return logp, jnp.argmax(logits, axis=-1) == targets


class LanguageModel:
  """A model + tokenizer answering lm-eval's three request types, batched and jitted."""

  def __init__(self, model, tokenizer, *, batch_size: int = 16, max_len: int | None = None,
               rolling_stride: int | None = None, max_gen_toks: int = 256):
    cfg = model.cfg
    max_len = cfg.max_seq_len if max_len is None else int(max_len)
    if not 2 <= max_len <= cfg.max_seq_len:
      raise ValueError(f"max_len={max_len} must be in [2, {cfg.max_seq_len}] (the model's max_seq_len)")
    if int(batch_size) < 1:
      raise ValueError(f"batch_size={batch_size} must be ≥ 1")
    if tokenizer.vocab_size > cfg.vocab_size:
      raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds the model's ({cfg.vocab_size})")
    self.model, self.tokenizer = model, tokenizer
    self.batch_size, self.max_len = int(batch_size), max_len
    self.rolling_stride = self._check_stride(max_len if rolling_stride is None else rolling_stride)
    # lm-eval's default of 256 new tokens can't fit a short context: then half of it is the default.
    self.max_gen_toks = min(int(max_gen_toks), max_len // 2)
    self.meta: dict | None = None  # the checkpoint's meta (run config) when built by from_checkpoint.
    graphdef, params = nnx.split(model, nnx.Param)
    self._graphdef, self._params = graphdef, nnx.to_pure_dict(params)

  @classmethod
  def from_checkpoint(cls, path, **kw) -> "LanguageModel":
    """From a run directory (latest step) or one step directory; `kw` go to `__init__`.

    `max_len` defaults to the sequence length the run trained at (`data.seq_len`), not the model's
    `max_seq_len`: positions beyond the trained length were never seen and RoPE extrapolates poorly."""
    from train.sample import load_for_inference
    model, tokenizer, meta = load_for_inference(path)
    if kw.get("max_len") is None:
      trained = (meta.get("config", {}).get("data") or {}).get("seq_len")
      kw["max_len"] = min(int(trained), model.cfg.max_seq_len) if trained else None
    lm = cls(model, tokenizer, **kw)
    lm.meta = meta
    return lm

  # --- tokenization ---------------------------------------------------------------------------------

  def _encode_all(self, texts: Sequence[str]) -> list[list[int]]:
    batch = getattr(self.tokenizer, "encode_batch", None)  # the project tokenizer's C++-threaded path.
    return batch(list(texts)) if batch else [self.tokenizer.encode(t) for t in texts]

  def _encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) → (BOS + context ids, continuation ids), as HFLM's `_encode_pair`."""
    moved = []
    for ctx, cont in pairs:
      # "Q: x\nA: " + "42": the space belongs to the continuation's first word piece.
      n = len(ctx) - len(ctx.rstrip())
      moved.append((ctx[:len(ctx) - n], ctx[len(ctx) - n:] + cont) if n else (ctx, cont))
    wholes = self._encode_all([c + k for c, k in moved])
    ctxs = self._encode_all([c for c, _ in moved])
    out = []
    for (_, cont), whole, ctx_ids in zip(moved, wholes, ctxs):
      n = len(ctx_ids)
      if whole[:n] == ctx_ids and (len(whole) > n or not cont):
        cont_ids = whole[n:]
      else:  # a merge across the boundary ("wor" + "ld"): score the continuation's own tokens.
        cont_ids = self.tokenizer.encode(cont)
      out.append(([self.tokenizer.bos_id] + ctx_ids, cont_ids))
    return out

  # --- the batched forward --------------------------------------------------------------------------

  def _rows(self, n_requests: int) -> int:
    """Rows of every batch of a call: batch_size (one shape; only the last batch carries spare rows),
    or the next power of two when the whole call is smaller, so a lone request costs one row."""
    return min(self.batch_size, _pow2_at_least(n_requests))

  def _score(self, seqs: Sequence[list[int]], n_scored: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Sum of log p over the last n_scored[i] tokens of seqs[i] (each ≤ max_len + 1 long), and whether
    all of them are the argmax. Inputs are seq[:-1], targets seq[1:]."""
    n = len(seqs)
    sums, greedy = np.zeros(n, np.float64), np.ones(n, bool)
    order = sorted(range(n), key=lambda i: -len(seqs[i]))
    pad = self.tokenizer.pad_id
    pending: list = []

    def collect(idx, logp, hit):
      logp, hit = np.asarray(logp, np.float64), np.asarray(hit)  # sums in float64 on the host.
      for r, i in enumerate(idx):
        end = len(seqs[i]) - 1
        sums[i] = logp[r, end - n_scored[i]:end].sum()
        greedy[i] = bool(hit[r, end - n_scored[i]:end].all())

    for start in range(0, n, self.batch_size):
      idx = order[start:start + self.batch_size]
      width = min(_pow2_at_least(len(seqs[idx[0]]) - 1, _MIN_BUCKET), self.max_len)
      rows = self._rows(n)
      tokens = np.full((rows, width), pad, np.int32)
      targets = np.full((rows, width), pad, np.int32)
      for r, i in enumerate(idx):
        s = seqs[i]
        tokens[r, :len(s) - 1] = s[:-1]
        targets[r, :len(s) - 1] = s[1:]
      # Dispatch only: the device computes while the host pads the next batches; a few batches in
      # flight keep it busy without holding every result on the device.
      pending.append((idx, *_target_logprobs(self._params, tokens, targets, graphdef=self._graphdef)))
      if len(pending) > _IN_FLIGHT:
        collect(*pending.pop(0))
    for item in pending:
      collect(*item)
    return sums, greedy

  # --- loglikelihood --------------------------------------------------------------------------------

  def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(context, continuation) → (sum log p(continuation | context), every token is the argmax)."""
    pairs = []
    for i, r in enumerate(requests):
      if not (isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(x, str) for x in r)):
        raise ValueError(f"loglikelihood request {i} must be a (context, continuation) pair of "
                         f"strings, got {_brief(r)}")
      pairs.append((r[0], r[1]))
    return self._loglikelihood_ids(self._encode_pairs(pairs))

  def loglikelihood_tokens(self, requests: Sequence[tuple[list[int], list[int]]]
                           ) -> list[tuple[float, bool]]:
    """(context ids, continuation ids) → as `loglikelihood`. The context should start with BOS; an
    empty one means [BOS]. Left-truncated to max_len + 1 tokens (max_len inputs)."""
    vocab = self.model.cfg.vocab_size
    for i, r in enumerate(requests):
      if not (isinstance(r, (tuple, list)) and len(r) == 2
              and all(isinstance(x, (list, tuple)) for x in r)):
        raise ValueError(f"loglikelihood_tokens request {i} must be a (context ids, continuation ids) "
                         f"pair of lists, got {_brief(r)}")
      ids = np.asarray(list(r[0]) + list(r[1]))
      if ids.size and not (np.issubdtype(ids.dtype, np.integer) and 0 <= ids.min() and ids.max() < vocab):
        raise ValueError(f"loglikelihood_tokens request {i}: token ids must be integers in [0, {vocab})")
    return self._loglikelihood_ids(requests)

  def _loglikelihood_ids(self, requests) -> list[tuple[float, bool]]:
    seqs, n_scored, live = [], [], []
    for i, (ctx, cont) in enumerate(requests):
      ctx, cont = list(ctx) or [self.tokenizer.bos_id], list(cont)
      if len(cont) > self.max_len:
        raise ValueError(f"loglikelihood request {i}: continuation of {len(cont)} tokens exceeds "
                         f"max_len={self.max_len}")
      if cont:  # an empty continuation has log p = 0 and is trivially greedy.
        seqs.append((ctx + cont)[-(self.max_len + 1):])
        n_scored.append(len(cont))
        live.append(i)
    results = [(0.0, True)] * len(requests)
    if seqs:
      sums, greedy = self._score(seqs, n_scored)
      for j, i in enumerate(live):
        results[i] = (float(sums[j]), bool(greedy[j]))
    return results

  # --- rolling (perplexity) -------------------------------------------------------------------------

  def _check_stride(self, stride) -> int:
    stride = int(stride)
    if not 1 <= stride <= self.max_len:
      raise ValueError(f"rolling_stride={stride} must be in [1, max_len={self.max_len}]")
    return stride

  def rolling_windows(self, ids: list[int], stride: int | None = None) -> list[tuple[list[int], int]]:
    """(sequence, n scored at its end) windows covering BOS + ids: each id predicted exactly once."""
    stride = self.rolling_stride if stride is None else self._check_stride(stride)
    toks, n, width = [self.tokenizer.bos_id] + list(ids), len(ids), self.max_len
    if n == 0:
      return []
    done = min(width, n)  # toks[1:done + 1] are predicted by the first window, from BOS on.
    windows = [(toks[:done + 1], done)]
    while done < n:
      end = min(done + stride, n)
      windows.append((toks[end - width:end + 1], end - done))  # max_len inputs, last few scored.
      done = end
    return windows

  def rolling_tokens(self, texts: Sequence[str], *, stride: int | None = None) -> list[tuple[float, int]]:
    """Each text → (sum of log p of all its tokens, number of tokens predicted = len(encode(text)))."""
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise ValueError(f"rolling request {i} must be a string, got {_brief(t)}")
    seqs, n_scored, owner = [], [], []
    encoded = self._encode_all(texts)
    for i, ids in enumerate(encoded):
      for seq, k in self.rolling_windows(ids, stride):
        seqs.append(seq)
        n_scored.append(k)
        owner.append(i)
    totals = np.zeros(len(texts), np.float64)
    if seqs:
      sums, _ = self._score(seqs, n_scored)
      np.add.at(totals, np.asarray(owner), sums)
    return [(float(t), len(ids)) for t, ids in zip(totals, encoded)]

  def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
    return [s for s, _ in self.rolling_tokens(texts)]

  # --- generation -----------------------------------------------------------------------------------

  def _gen_options(self, kw: dict, i: int) -> tuple[tuple[str, ...], dict]:
    unknown = sorted(set(kw) - _GEN_KEYS)
    if unknown:
      raise ValueError(f"generate_until request {i}: unsupported gen kwargs {unknown}; "
                       f"known: {sorted(_GEN_KEYS)}")
    until = kw.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    if not all(isinstance(u, str) for u in until):
      raise ValueError(f"generate_until request {i}: 'until' must be a string or a list of strings")
    max_gen = next((kw[k] for k in _MAX_TOKEN_KEYS if kw.get(k) is not None), self.max_gen_toks)
    max_gen = int(max_gen)
    if not 1 <= max_gen < self.max_len:
      raise ValueError(f"generate_until request {i}: max_gen_toks={max_gen} must be in "
                       f"[1, max_len={self.max_len})")
    temperature = float(kw.get("temperature") or 0.0)
    do_sample = kw.get("do_sample")
    if do_sample is False:
      temperature = 0.0  # lm-eval: do_sample=False means greedy whatever the temperature.
    elif do_sample and temperature <= 0.0:
      temperature = 1.0  # sampling asked for without a temperature: HF generate's default.
    top_p = 1.0 if kw.get("top_p") is None else float(kw["top_p"])
    opts = dict(max_new_tokens=max_gen, temperature=temperature, top_k=int(kw.get("top_k") or 0),
                top_p=top_p, seed=int(kw.get("seed") or 0))
    if temperature <= 0.0:  # greedy ignores these: one batch and one compiled sampler for all of it.
      opts.update(top_k=0, top_p=1.0, seed=0)
    return tuple(u for u in until if u), opts

  def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
    """(prompt, gen kwargs) → the generated text, cut before the first stop string or EOS."""
    from train.sample import _generate  # the KV-cache sampler behind train.sample.generate
    parsed = []
    for i, r in enumerate(requests):
      if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)
              and isinstance(r[1], dict)):
        raise ValueError(f"generate_until request {i} must be a (prompt, gen kwargs dict) pair, "
                         f"got {_brief(r)}")
      parsed.append(self._gen_options(r[1], i))
    prompts = self._encode_all([r[0] for r in requests])
    tok = self.tokenizer
    groups: dict[tuple, list[int]] = {}  # same sampler settings → same batch.
    for i, (_, opts) in enumerate(parsed):
      groups.setdefault(tuple(sorted(opts.items())), []).append(i)
    out = [""] * len(requests)
    for key, members in groups.items():
      opts = dict(key)
      max_new = opts["max_new_tokens"]
      keep = self.max_len - max_new
      ids = {i: self._truncate_prompt(prompts[i], max_new) for i in members}
      members = sorted(members, key=lambda i: -len(ids[i]))
      for chunk_no, start in enumerate(range(0, len(members), self.batch_size)):
        idx = members[start:start + self.batch_size]
        width = min(_pow2_at_least(len(ids[idx[0]]), _MIN_BUCKET), keep)
        rows = self._rows(len(members))
        padded = np.full((rows, width), tok.pad_id, np.int32)
        lengths = np.ones(rows, np.int32)  # spare rows: a lone BOS.
        padded[:, 0] = tok.bos_id
        for r, i in enumerate(idx):
          padded[r, :len(ids[i])] = ids[i]
          lengths[r] = len(ids[i])
        # Right padding is safe: a token's cache slot is its position, so decoding overwrites the pad
        # slots before any query can attend to them.
        gen = _generate(self._params, jnp.asarray(padded), jnp.asarray(lengths),
                        jax.random.fold_in(jax.random.PRNGKey(opts["seed"]), chunk_no),
                        graphdef=self._graphdef, max_new_tokens=max_new,
                        temperature=opts["temperature"], top_k=opts["top_k"], top_p=opts["top_p"],
                        eos_id=tok.eos_id, cache_len=width + max_new)
        gen = np.asarray(gen)
        for r, i in enumerate(idx):
          out[i] = self._finish(gen[r], parsed[i][0])
    return out

  def _truncate_prompt(self, ids: list[int], max_new: int) -> list[int]:
    """BOS + ids, keeping the most recent max_len - max_new: the cache holds prompt + generation."""
    return ([self.tokenizer.bos_id] + list(ids))[-(self.max_len - max_new):]

  def _finish(self, ids: np.ndarray, until: tuple[str, ...]) -> str:
    ids = ids.tolist()
    if self.tokenizer.eos_id in ids:
      ids = ids[:ids.index(self.tokenizer.eos_id)]
    # Ids past the tokenizer's vocabulary (the model's is rounded up to a multiple of 128) have no text.
    text = self.tokenizer.decode([t for t in ids if t < self.tokenizer.vocab_size])
    cut = min((p for p in (text.find(u) for u in until) if p >= 0), default=len(text))
    return text[:cut]


def _brief(x: Any) -> str:
  r = repr(x)
  return r if len(r) <= 80 else r[:77] + "..."

