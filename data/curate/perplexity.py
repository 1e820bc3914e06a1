"""Perplexity filter: scores documents with one of the project's language models, drops the worst tail.

CCNet (Wenzek et al. 2019) scores each document with a language model trained on reference text
(Wikipedia) and splits the corpus into head/middle/tail by perplexity; text the reference model
finds very surprising (boilerplate, spam, garbled extraction, other languages) lands in the tail.
Here the model is any run directory of `python -m train` (or one of its step directories), loaded
with `model.load.load_model`; its tokenizer travels in the checkpoint. Pipeline config:

  stages: ..., "perplexity"   with  --config.stages.perplexity.checkpoint=runs/tiny
                                    --config.stages.perplexity.drop_percentile=90

The score is bits per byte (BPB) of the document's first `max_tokens` tokens: the summed token
cross-entropy divided by ln 2 and by the UTF-8 bytes those tokens decode to. Unlike perplexity per
token it does not depend on the tokenizer (a model with a larger vocabulary has fewer, harder tokens
per byte), so scores from different scoring models can be compared; perplexity per token is
2^(BPB * bytes/token) when wanted. Scoring only the beginning bounds the cost per document (and
SentencePiece only sees the first ~16 chars per token of a 50 MB line). With the tiny preset's
tokenizer (4,096 pieces trained on the stdlib corpus) the Common Crawl samples run 2.5 bytes/token,
so 512 tokens is ~1.3 KB, about half their median page (2.8 KB).

As a `GlobalStage`: `summarize` scores one shard's documents (model loaded once per worker by
`setup`); `decide` ranks the alive documents of the whole corpus and drops the ones above the
`drop_percentile`-th percentile of BPB (90: the highest-BPB 10%, exactly floor(n * 10 / 100) of n
scored documents; equal scores are dropped in corpus order), reason "high_perplexity"; `apply`
writes the kept documents' score into `meta["perplexity_bpb"]`. Documents with no tokens (empty
text) get no score and are kept.

Batching: a document longer than the model's training context (`data.seq_len` of the run) is scored
in consecutive windows of that length, the way packed training sees a long document continue; each
window is padded to the next power of two (>= 16) and windows of the same padded length go through
one jitted forward in batches of `batch_size` rows, so at most ~log2(context) shapes are compiled.
Padding sits after the real tokens, which causal attention never lets the real tokens see. The same
shard gives the same scores whatever the worker count: the batches depend only on the shard's docs.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from data.curate.base import Doc, GlobalStage, register
from data.errors import DataError

_MIN_BUCKET = 16
# Characters encoded per wanted token before giving up on the prefix and encoding the whole text:
# tokens of English average ~4 chars, runs of whitespace in code reach ~16.
_CHARS_PER_TOKEN = 16
# Tokens the prefix must produce beyond `max_tokens`, so the cut (which may split a word) is far
# from the tokens that are scored.
_CUT_MARGIN = 8


class LMScorer:
  """Bits per byte of texts under a trained run's model: `LMScorer("runs/tiny").score(texts, 512, 8)`."""

  def __init__(self, checkpoint: str):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top

    from data.tokenizer import tokenizer_from_meta  # pylint: disable=g-import-not-at-top
    from model.load import load_model  # pylint: disable=g-import-not-at-top

    try:
      model, meta = load_model(checkpoint)
      self.tokenizer = tokenizer_from_meta(meta)
    except (FileNotFoundError, KeyError, ValueError) as e:
      raise DataError(f"perplexity: cannot load a model from checkpoint {checkpoint!r}: {e}") from None
    if self.tokenizer.vocab_size > model.cfg.vocab_size:
      raise DataError(f"perplexity: checkpoint {checkpoint!r}: tokenizer vocabulary "
                      f"({self.tokenizer.vocab_size}) exceeds the model's ({model.cfg.vocab_size})")
    # Positions beyond the trained length were never seen (learned tables stop at max_seq_len, RoPE
    # extrapolates poorly), so windows are at most the training sequence length.
    self.context = int(meta["config"]["data"]["seq_len"])
    self.token_bytes = self.tokenizer.token_bytes().astype(np.int64)
    graphdef, state = nnx.split(model)
    self._state = state

    @jax.jit
    def nats(state, tokens, targets, mask):
      logits = nnx.merge(graphdef, state)(tokens).astype(jnp.float32)
      log_z = jax.nn.logsumexp(logits, axis=-1)
      target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
      return ((log_z - target_logit) * mask).sum(axis=-1)

    self._nats = nats

  def token_ids(self, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """The first `max_tokens` ids of each text, encoding only a prefix of long texts."""
    cut = max_tokens * _CHARS_PER_TOKEN
    out = self.tokenizer.encode_batch([t[:cut] for t in texts], num_threads=1)
    for i, t in enumerate(texts):
      if len(t) > cut and len(out[i]) < max_tokens + _CUT_MARGIN:
        out[i] = self.tokenizer.encode(t)  # tokens longer than the budget: take no risk at the cut
    return [ids[:max_tokens] for ids in out]

  def score(self, texts: Sequence[str], max_tokens: int, batch_size: int) -> dict[str, np.ndarray]:
    """{"bpb": float64 [n] (nan for texts without tokens), "tokens": int32 [n] scored tokens}."""
    ids = self.token_ids(texts, max_tokens)
    bos = self.tokenizer.bos_id
    window = min(max_tokens, self.context)
    # Rows: (doc, inputs, targets); a document's windows continue one another, the first after bos.
    by_bucket: dict[int, list[tuple[int, list[int], list[int]]]] = {}
    for d, doc_ids in enumerate(ids):
      seq = [bos] + doc_ids
      for start in range(0, len(doc_ids), window):
        targets = seq[start + 1:start + 1 + window]
        bucket = max(_MIN_BUCKET, 1 << (len(targets) - 1).bit_length())
        by_bucket.setdefault(min(bucket, window), []).append((d, seq[start:start + len(targets)], targets))
    nats = np.zeros(len(texts), np.float64)
    nbytes = np.zeros(len(texts), np.int64)
    for length in sorted(by_bucket):
      rows = by_bucket[length]
      for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size]
        tokens = np.zeros((batch_size, length), np.int32)  # fixed shape: the last batch is padded too
        targets = np.zeros((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length), np.float32)
        for r, (_, inp, tgt) in enumerate(batch):
          tokens[r, :len(inp)], targets[r, :len(tgt)], mask[r, :len(tgt)] = inp, tgt, 1.0
        row_nats = np.asarray(self._nats(self._state, tokens, targets, mask), np.float64)
        for r, (d, _, tgt) in enumerate(batch):
          nats[d] += row_nats[r]
          nbytes[d] += int(self.token_bytes[tgt].sum())
    with np.errstate(invalid="ignore", divide="ignore"):
      bpb = np.where(nbytes > 0, nats / (math.log(2) * nbytes), np.nan)
    return {"bpb": bpb, "tokens": np.array([len(x) for x in ids], np.int32)}


@register
class PerplexityFilter(GlobalStage):
  """Drops the documents above the `drop_percentile`-th percentile of bits per byte; see module doc."""
  name = "perplexity"
  # drop_percentile 90: drop the worst 10%, a conservative cut; CCNet's tail tercile (the worst 33%)
  # is what it set aside as lowest quality, so 67 reproduces that.
  defaults = {"checkpoint": "", "max_tokens": 512, "batch_size": 8, "drop_percentile": 90.0}

  def __init__(self, **config: Any):
    super().__init__(**config)
    c = self.config
    for key in ("max_tokens", "batch_size"):
      if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] < 1:
        raise DataError(f"stage 'perplexity': {key} must be an integer >= 1, got {c[key]!r}")
    p = c["drop_percentile"]
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 100.0:
      raise DataError(f"stage 'perplexity': drop_percentile must be in [0, 100], got {p!r}")
    self._scorer: LMScorer | None = None

  def __getstate__(self) -> dict:  # picklable for Ray: jitted functions and device arrays stay behind
    return {**self.__dict__, "_scorer": None}

  def setup(self) -> None:
    if not self.config["checkpoint"]:
      raise DataError("stage 'perplexity': option 'checkpoint' is empty; give a run directory of "
                      "`python -m train`, e.g. --config.stages.perplexity.checkpoint=runs/tiny")
    self._scorer = LMScorer(self.config["checkpoint"])

  def summarize(self, docs: list[Doc]) -> dict[str, np.ndarray]:
    if self._scorer is None:
      self.setup()
    return self._scorer.score([d.text for d in docs], self.config["max_tokens"],
                              self.config["batch_size"])

  def decide(self, summaries, alive, work_dir) -> list[list[Any]]:
    # Per document one float64 here plus the decision object the contract returns (~40 bytes in all:
    # 10^7 documents = 0.4 GB), so nothing is spilled to work_dir.
    scores = [np.asarray(s["bpb"], np.float64) for s in summaries]
    flat = np.concatenate(scores) if scores else np.zeros(0)
    live = np.concatenate([np.asarray(a, bool) for a in alive]) if alive else np.zeros(0, bool)
    candidates = np.flatnonzero(live & np.isfinite(flat))
    # floor(n * (100 - p) / 100), rounded first so float error (100 - 99.9 = 0.09999999999999432)
    # does not floor 1000 documents at p=99.9 to 0 drops instead of 1.
    n_drop = math.floor(round(len(candidates) * (100.0 - self.config["drop_percentile"]) / 100.0, 6))
    worst = candidates[np.argsort(-flat[candidates], kind="stable")[:n_drop]]
    decisions: list[Any] = [None if not (ok and math.isfinite(s)) else float(s)
                            for s, ok in zip(flat.tolist(), live.tolist())]
    for i in worst.tolist():
      decisions[i] = "high_perplexity"
    out, start = [], 0
    for s in scores:
      out.append(decisions[start:start + len(s)])
      start += len(s)
    return out

  def apply(self, doc: Doc, decision: Any) -> Doc | str:
    if isinstance(decision, float):
      doc.meta["perplexity_bpb"] = round(decision, 4)
      return doc
    return super().apply(doc, decision)
