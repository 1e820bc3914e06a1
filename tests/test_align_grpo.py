"""GRPO (align/grpo.py): bad config → ConfigError; rollout rows mask exactly the reply tokens and <|end|>;
equal-reward groups get zero advantage and then only the KL term has a gradient; the sampler's
completions are masked correctly; the verifier's reward; three end-to-end steps (two rollouts,
inner_steps=2) log reward/accuracy, reuse old log-probs within a rollout, evaluate and save."""
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from align import grpo, losses
from configs.loader import ConfigError, parse_args
from data import chat
from model.config import ModelConfig
from model.transformer import Transformer
from train.state import abstract_model


def config(init="", *overrides):
  cfg, _ = parse_args(["--config=configs/align.py:grpo,smoke", f"--config.init={init}",
                       "--config.train.progress=false", *overrides], "configs/align.py:grpo")
  return cfg


# ------------------------------------------------------------------ config

@pytest.mark.parametrize("override,match", [
    ("--config.align.group_size=1", "group_size"),
    ("--config.align.task=mmlu", "align.task"),
    ("--config.align.aggregation=sum", "aggregation"),
    ("--config.align.advantage_scale=mad", "advantage_scale"),
    ("--config.align.temperature=0.0", "temperature"),
])
def test_bad_config(override, match):
  with pytest.raises(ConfigError, match=match):
    grpo.run(config("/nonexistent", override))  # validated before the init checkpoint is read


def test_bad_config_cli(capsys):
  with pytest.raises(SystemExit) as e:
    grpo.main(["--config=configs/align.py:grpo,smoke", "--config.align.group_size=1", "--config.init=x"])
  assert e.value.code == 2
  assert "error: align.group_size=1" in capsys.readouterr().err


# ------------------------------------------------------------------ rows, advantages

def test_rollout_arrays_mask():
  end, pad = 7, 0
  prompts = [[1, 5, 20, 21, 7, 6], [1, 5, 30, 7, 6]]
  replies = [[40, 41, 42], [50, 51, 52, 53]]
  ended = [True, False]  # row 1 ran out of tokens: no <|end|> to train on
  b = grpo.rollout_arrays(prompts, replies, ended, row_len=12, pad_id=pad, end_id=end)
  ids0 = prompts[0] + replies[0] + [end]
  np.testing.assert_array_equal(b["inputs"][0, :9], ids0[:-1])
  np.testing.assert_array_equal(b["targets"][0, :9], ids0[1:])
  np.testing.assert_array_equal(b["loss_mask"][0], [0] * 5 + [1] * 4 + [0] * 3)
  np.testing.assert_array_equal(b["targets"][0][b["loss_mask"][0] > 0], [40, 41, 42, end])
  np.testing.assert_array_equal(b["targets"][1][b["loss_mask"][1] > 0], [50, 51, 52, 53])
  np.testing.assert_array_equal(b["loss_mask"][1], [0] * 4 + [1] * 4 + [0] * 4)
  np.testing.assert_array_equal(b["segment_ids"][1], [1] * 8 + [0] * 4)
  np.testing.assert_array_equal(b["positions"][0, :9], np.arange(9))
  assert (b["inputs"][:, 9:] == pad).all()
  with pytest.raises(ValueError, match="row_len"):
    grpo.rollout_arrays(prompts, replies, ended, row_len=8, pad_id=pad, end_id=end)


@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_stats(scale):
  rewards = np.array([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0], np.float32)
  adv, zero = grpo.group_stats(rewards, 4, scale)
  assert (adv[:4] == 0).all() and (adv[8:] == 0).all()  # exactly 0, not eps noise
  np.testing.assert_array_equal(zero, [1] * 4 + [0] * 4 + [1] * 4)
  assert adv[5] > 0 > adv[4] and abs(adv[4:8].sum()) < 1e-6
  if scale == "std":
    np.testing.assert_allclose(adv[4:8].std(ddof=1), 1.0, rtol=1e-4)
  else:
    np.testing.assert_allclose(adv[4:8], [-0.25, 0.75, -0.25, -0.25])


# ------------------------------------------------------------------ zero advantage → only KL gradient

TINY = ModelConfig(vocab_size=61, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=32,
                   compute_dtype="float32")


@functools.cache
def tiny_model():
  graphdef, _, _ = abstract_model(TINY)
  with nnx.use_eager_sharding(False):  # built under jit: eager init op by op takes ~5 s on 2 cores.
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Transformer(TINY, rngs=nnx.Rngs(0)), nnx.Param)))()
  return graphdef, params


def test_zero_advantage_leaves_only_the_kl_gradient():
  graphdef, ref = tiny_model()
  fake = types.SimpleNamespace(model=lambda p: nnx.merge(graphdef, p), params=lambda t, f: t["params"])
  rng = np.random.default_rng(0)
  # The policy moved away from the reference, so the k3 term has a non-zero gradient.
  policy = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(rng.normal(size=x.shape), x.dtype), ref)
  prompts = [[1, 2, 3], [1, 4]] * 2
  replies = [[9, 10], [11, 12, 13], [14], [15, 16]]
  batch = grpo.rollout_arrays(prompts, replies, [True, False, True, True], row_len=8, pad_id=0, end_id=7)
  adv, zero = grpo.group_stats(np.ones(4, np.float32), 2, "std")  # every reply scored the same
  assert (adv == 0).all() and (zero == 1).all()
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  batch["old_logp"] = jax.jit(lambda p, b: grpo.token_logps(fake, p, b, 1.0))(policy, batch)
  batch.update(reward=jnp.ones(4), accuracy=jnp.ones(4), ended=jnp.ones(4), zero_adv_groups=jnp.asarray(zero))

  def grad_fn(beta):  # jitted: eager autodiff through the model takes ~10 s per call on 2 cores.
    loss_fn = grpo.make_loss(config("", f"--config.align.beta_kl={beta}"))
    return jax.jit(jax.grad(lambda t, a: loss_fn(fake, t, dict(ref=ref), dict(batch, advantages=a), None)[0]))

  def kl_only(t):
    logp = grpo.token_logps(fake, t["params"], batch, 1.0)
    ref_logp = grpo.token_logps(fake, ref, batch, 1.0)
    return losses.aggregate(0.04 * losses.kl_penalty(logp, ref_logp, "k3"), batch["loss_mask"],
                            "seq_mean_token_mean")

  trainable = dict(params=policy)
  pg_only = grad_fn(0.0)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(pg_only(trainable, jnp.asarray(adv))))
  g_kl = grad_fn(0.04)(trainable, jnp.asarray(adv))
  expected = jax.jit(jax.grad(kl_only))(trainable)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_kl)) > 1e-6
  for a, b in zip(jax.tree.leaves(g_kl), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
  # Control: with a learning signal the policy-gradient term is non-zero.
  g_pg = pg_only(trainable, jnp.asarray([1.0, -1.0, 0.5, -0.5]))
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_pg)) > 1e-4


# ------------------------------------------------------------------ with a real checkpoint

def test_score(tiny_run):
  from data.tokenizer import Tokenizer
  tok = Tokenizer.load(tiny_run / "tokenizer.model")
  right, wrong = tok.encode("3 + 4 = 7\n#### 7"), tok.encode("3 + 4 = 8\n#### 8")
  user = tok.special_ids["<|user|>"]
  s = grpo.score([right, right, wrong, right + [user] + wrong], [True, False, True, True], ["7"] * 4, tok,
                 format_bonus=0.1)
  np.testing.assert_array_equal(s["correct"], [1, 1, 0, 1])  # text up to the first control token
  np.testing.assert_array_equal(s["ended"], [1, 0, 1, 0])  # ran out of tokens / stopped at <|user|>
  np.testing.assert_allclose(s["reward"], [1.1, 1.0, 0.1, 1.0])
  assert (grpo.score([right], [True], ["7"], tok)["reward"] == 1.0).all()  # no bonus by default


def check_rows(b: dict, prompts: list, end: int, group_size: int, max_new: int) -> None:
  """The loss mask of a rollout batch covers each reply and its <|end|>, never prompt or padding."""
  row_prompts = []
  for i in range(len(b["inputs"])):
    mask, targets, seg = b["loss_mask"][i], b["targets"][i], b["segment_ids"][i]
    span = np.flatnonzero(mask)
    n_prompt = int(seg.sum()) + 1 - len(span)  # row tokens = prompt + reply (+ <|end|>)
    prompt = [int(t) for t in b["inputs"][i, :n_prompt]]
    assert prompt in prompts  # what precedes the mask is exactly a pool prompt
    row_prompts.append(prompt)
    assert span[0] == n_prompt - 1 and (np.diff(span) == 1).all()  # contiguous, right after the prompt
    assert (seg[span] == 1).all() and not mask[int(seg.sum()):].any()  # never on padding
    reply = targets[span]
    stopped = reply[-1] == end
    assert len(reply) <= max_new and (stopped or len(reply) == max_new)  # cut by <|end|> or the budget
    assert end not in reply[:-1]
    assert np.all(np.isfinite(b["old_logp"][i][span])) and np.all(b["old_logp"][i][span] <= 0)
  for k in range(0, len(row_prompts), group_size):  # a group is G replies to one prompt
    assert all(row_prompts[k + j] == row_prompts[k] for j in range(group_size))
  np.testing.assert_allclose(b["advantages"].reshape(-1, group_size).sum(1), 0, atol=1e-5)
  assert set(np.unique(b["accuracy"])) <= {0.0, 1.0}


def test_end_to_end(tiny_run, tmp_path, monkeypatch):
  """3 steps with inner_steps=2: rollout 0 feeds steps 1-2 (same old log-probs), rollout 1 step 3."""
  seen = []
  rollouts = grpo.rollouts

  def spy(trainer, cfg, prompts, *args):
    seen.append((trainer, prompts))
    for batch in rollouts(trainer, cfg, prompts, *args):
      seen.append(batch)
      yield batch

  monkeypatch.setattr(grpo, "rollouts", spy)
  # A text-pretrained model never answers arithmetic (all rewards 0: no learning signal); add a reward
  # for replies whose token ids sum to an odd number so groups disagree and the update is real.
  score = grpo.score
  def parity_score(replies, *args, **kw):
    s = score(replies, *args, **kw)
    return dict(s, reward=s["reward"] + np.array([sum(r) % 2 for r in replies], np.float32))
  monkeypatch.setattr(grpo, "score", parity_score)
  run_dir = tmp_path / "grpo"
  cfg = config(str(tiny_run), f"--config.run.dir={run_dir}", "--config.train.steps=3",
               "--config.train.log_every=1", "--config.train.eval_every=3", "--config.checkpoint.every=3",
               "--config.align.train_examples=50", "--config.align.inner_steps=2",
               "--config.optim.peak_lr=3e-3")
  summary = grpo.run(cfg)
  assert summary["steps"] == 3

  (trainer, prompts), batches = seen[0], seen[1:]
  assert len(batches) == 3 and batches[0] is batches[1] and batches[2] is not batches[0]
  for b in (batches[0], batches[2]):
    assert b["inputs"].shape[0] == 8
    check_rows(b, prompts, chat.end_id(trainer.tokenizer), cfg.align.group_size, cfg.align.max_new_tokens)

  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "eval_accuracy" in r]
  assert [r["step"] for r in evals] == [0, 3]
  assert all(0.0 <= r["eval_accuracy"] <= 1.0 and 0.0 <= r["eval_ended"] <= 1.0 for r in evals)
  steps = [r for r in rows if "reward" in r]
  assert [r["step"] for r in steps] == [1, 2, 3]
  for r, b in zip(steps, batches):
    assert r["reward"] == pytest.approx(float(b["reward"].mean()))
    assert r["accuracy"] == pytest.approx(float(b["accuracy"].mean()))
    assert r["completion_len"] == pytest.approx(float(b["loss_mask"].sum(1).mean()))
    assert 1.0 <= r["completion_len"] <= cfg.align.max_new_tokens
    assert 0.0 <= r["zero_adv_groups"] <= 1.0 and np.isfinite(r["loss"]) and r["kl"] >= 0.0
  # Old log-probs are the sampling policy's: ratio 1 on a rollout's first step, not on its second.
  assert abs(steps[0]["policy/approx_kl"]) < 1e-7 and abs(steps[2]["policy/approx_kl"]) < 1e-7
  assert steps[0]["zero_adv_groups"] < 1.0  # there was something to learn
  assert steps[1]["policy/approx_kl"] > 1e-7
  assert steps[0]["kl"] < 1e-7 < steps[2]["kl"]  # the first step's policy is the reference
  assert (run_dir / "checkpoints" / "3").is_dir()
  assert json.loads((run_dir / "config.json").read_text())["train"]["batch_size"] == 8
