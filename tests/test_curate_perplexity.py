"""Perplexity filter (`data.curate.perplexity`) with a smoke model trained here on Tiny Shakespeare.

The model (configs/lm.py:tiny,smoke, 40 steps, ~12 s on 2 CPU cores) never sees the last 10% of the
paragraphs; those are the in-domain held-out documents, scored against random-character junk.
"""
import json
import math
import pickle
import random

import numpy as np
import optax
import pytest
from flax import nnx

from conftest import require, shared_data
from data.curate.base import STAGES, Doc
from data.curate.perplexity import LMScorer, PerplexityFilter
from data.errors import DataError


@pytest.fixture(scope="module")
def paragraphs():
  src = shared_data() / "text" / "tinyshakespeare.txt"
  require(src.exists(), f"missing {src}")
  paras = [p for p in src.read_text().split("\n\n") if p.strip()]
  cut = len(paras) * 9 // 10
  return paras[:cut], paras[cut:]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, paragraphs):
  from train.config import parse_args
  from train.loop import run
  tmp = tmp_path_factory.mktemp("ppl")
  with open(tmp / "train.jsonl", "w") as f:
    for i, p in enumerate(paragraphs[0]):
      f.write(json.dumps({"id": f"p{i}", "text": p}) + "\n")
  cfg, _ = parse_args(["--config=configs/lm.py:tiny,smoke", f"--config.data.sources=text={tmp}/train.jsonl",
                       f"--config.run.dir={tmp}/run", f"--config.data.cache_dir={tmp}/cache",
                       "--config.train.progress=false",
                       "--config.checkpoint.async_save=false", "--config.train.steps=40",
                       "--config.checkpoint.every=40", "--config.train.eval_every=1000"])
  run(cfg)
  return tmp / "run"


@pytest.fixture(scope="module")
def scorer(run_dir):
  return LMScorer(str(run_dir))


def _junk(n, seed=0):
  rng = random.Random(seed)
  chars = "abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;!?"
  return ["".join(rng.choice(chars) for _ in range(rng.randint(100, 800))) for _ in range(n)]


@pytest.fixture(scope="module")
def model(run_dir):
  from model.load import load_model
  return load_model(run_dir)[0]


@nnx.jit
def _forward(model, tokens):  # jitted: one compile per window length instead of one per op
  return model(tokens)


def _by_hand(model, tok, context, text, max_tokens):
  """Bits per byte from a plain forward per window and optax's cross-entropy; bytes from decode."""
  ids = tok.encode(text)[:max_tokens]
  seq = [tok.bos_id] + ids
  nats = 0.0
  for start in range(0, len(ids), context):
    targets = seq[start + 1:start + 1 + context]
    inputs = seq[start:start + len(targets)]
    logits = np.asarray(_forward(model, np.asarray([inputs], np.int32)), np.float32)[0]
    nats += float(optax.softmax_cross_entropy_with_integer_labels(logits, np.asarray(targets)).sum())
  return nats / math.log(2) / len(tok.decode(ids).encode("utf-8"))


def test_score_matches_an_independent_computation(scorer, model, paragraphs):
  tok = scorer.tokenizer
  short = paragraphs[1][0]  # a few dozen tokens: one window, one row, no truncation
  assert len(tok.encode(short)) < scorer.context == 64
  got = scorer.score([short], 512, 8)["bpb"][0]
  assert got == pytest.approx(_by_hand(model, tok, 64, short, 512), rel=1e-4)
  # A long document, cut at max_tokens=150: windows of 64 + 64 + 22 tokens, padded, in one batch
  # with the other documents' rows.
  long_text = "\n\n".join(paragraphs[1][:12])
  batch = [paragraphs[1][3], long_text, _junk(1)[0]]
  got = scorer.score(batch, 150, 8)
  assert got["tokens"].tolist()[1] == 150
  for i in range(3):
    assert got["bpb"][i] == pytest.approx(_by_hand(model, tok, 64, batch[i], 150), rel=1e-4), i


def test_held_out_shakespeare_scores_far_below_junk(scorer, paragraphs):
  held, junk = paragraphs[1][:30], _junk(10)
  s = scorer.score(held + junk, 512, 8)["bpb"]
  # Measured: Shakespeare 3.4-4.7 bpb, junk 8.4-8.9 (a 40-step model; random characters cost ~9 bits
  # each since most fall back to single-byte tokens).
  assert s[:30].max() < s[30:].min() and s[30:].min() - s[:30].max() > 2.0, s


def test_scores_do_not_depend_on_batching(scorer, paragraphs):
  # Every document fills whole 64-token windows, so one padded shape per batch size is compiled.
  texts = ["\n\n".join(paragraphs[1][i:i + 6]) for i in range(0, 54, 6)] + _junk(3)
  a = scorer.score(texts, 128, 8)["bpb"]
  assert (scorer.score(texts, 128, 8)["tokens"] == 128).all()
  np.testing.assert_array_equal(a, scorer.score(texts, 128, 8)["bpb"])  # same call, same bits
  np.testing.assert_allclose(scorer.score(texts, 128, 3)["bpb"], a, rtol=1e-5)
  np.testing.assert_allclose(scorer.score(texts[::-1], 128, 8)["bpb"][::-1], a, rtol=1e-5)


def test_percentile_cut_drops_the_worst_alive_documents(run_dir, paragraphs):
  stage = STAGES["perplexity"](checkpoint=str(run_dir), drop_percentile=75.0)
  assert isinstance(stage, PerplexityFilter)
  stage.setup()
  shk, junk = paragraphs[1][:30], _junk(12, seed=1)
  # Two shards; the last two junk docs were dropped by an earlier stage (not alive) and one doc is
  # empty (no score): 40 candidates, 75th percentile -> exactly 10 dropped, the 10 live junk docs.
  shards = [[Doc(id=f"s{i}", text=t, domain="web") for i, t in enumerate(shk[:20] + junk[:4])],
            [Doc(id=f"t{i}", text=t, domain="web") for i, t in enumerate(shk[20:] + junk[4:] + [""])]]
  # The second shard is scored by a copy shipped as Ray ships stages (pickled, model reloaded).
  summaries = [stage.summarize(shards[0]), pickle.loads(pickle.dumps(stage)).summarize(shards[1])]
  assert np.isnan(summaries[1]["bpb"][-1])
  alive = [np.ones(24, bool), np.array([True] * 16 + [False, False] + [True])]
  decisions = stage.decide(summaries, alive, work_dir=None)
  assert [len(d) for d in decisions] == [24, 19]
  dropped = [(k, i) for k, d in enumerate(decisions) for i, x in enumerate(d) if x == "high_perplexity"]
  assert dropped == [(0, i) for i in range(20, 24)] + [(1, i) for i in range(10, 16)]
  assert decisions[1][16] is None and decisions[1][17] is None and decisions[1][18] is None
  kept = stage.apply(shards[0][0], decisions[0][0])
  assert kept.meta["perplexity_bpb"] == round(float(summaries[0]["bpb"][0]), 4)
  assert stage.apply(shards[0][20], decisions[0][20]) == "high_perplexity"
  # The cut is a count: floor(n * (100 - p) / 100) of the n scored alive documents.
  for p, n_drop in ((100.0, 0), (90.0, 4), (99.9, 0), (0.0, 40)):
    stage.config["drop_percentile"] = p
    flat = [x for d in stage.decide(summaries, alive, None) for x in d]
    assert flat.count("high_perplexity") == n_drop, p


def test_config_errors(tmp_path):
  with pytest.raises(DataError, match="'checkpoint' is empty"):
    PerplexityFilter().setup()
  with pytest.raises(DataError, match="cannot load a model"):
    PerplexityFilter(checkpoint=str(tmp_path / "none")).setup()
  with pytest.raises(DataError, match="drop_percentile"):
    PerplexityFilter(checkpoint="x", drop_percentile=150.0)
  with pytest.raises(DataError, match="max_tokens"):
    PerplexityFilter(checkpoint="x", max_tokens=0)
  assert PerplexityFilter.defaults == {"checkpoint": "", "max_tokens": 512, "batch_size": 8,
                                       "drop_percentile": 90.0}
