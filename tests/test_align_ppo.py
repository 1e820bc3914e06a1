"""PPO (align/ppo.py): bad config → ConfigError; per-token rewards and GAE against a plain-Python
reference; two rollouts × two epochs end to end on the tiny run (old log-probs and values reused within a
rollout, value head trained and saved, evaluation rows). The reward-model path runs in
tests/test_align_stages.py, next to the reward model it uses."""
import json

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from align import grpo, ppo
from configs.loader import ConfigError, parse_args
from data import chat
from train.metrics import read_metrics


def config(init="", *overrides):
  cfg, _ = parse_args(["--config=configs/align.py:ppo,smoke", f"--config.init={init}",
                       "--config.train.progress=false", *overrides], "configs/align.py:ppo")
  return cfg


@pytest.mark.parametrize("override,match", [
    ("--config.align.task=hh_rlhf", "reward_model"),  # no verifier for HH prompts
    ("--config.align.task=mmlu", "align.task"),
    ("--config.align.clip=1.5", "align.clip"),
    ("--config.align.ppo_epochs=0", "ppo_epochs"),
    ("--config.align.lam=1.5", "align.lam"),
    ("--config.align.temperature=0.0", "temperature"),
])
def test_bad_config(override, match):
  with pytest.raises(ConfigError, match=match):
    ppo.run(config("/nonexistent", override))  # validated before the init checkpoint is read


def test_bad_reward_model_path(tiny_run):
  with pytest.raises(ConfigError, match="align.reward_model=/nonexistent"):
    ppo.run(config(str(tiny_run), "--config.align.reward_model=/nonexistent"))


def reference_advantages(old_logp, ref_logp, values, score, mask, kl_coef, gamma, lam):
  """Per-token rewards and GAE written out with Python loops over each row's reply tokens only."""
  adv = np.zeros_like(old_logp)
  ret = np.zeros_like(old_logp)
  for b in range(len(mask)):
    idx = [t for t in range(mask.shape[1]) if mask[b, t] > 0]
    rewards = [-kl_coef * (old_logp[b, t] - ref_logp[b, t]) for t in idx]
    if idx:
      rewards[-1] += score[b]
    next_v, gae = 0.0, 0.0
    for j in reversed(range(len(idx))):
      t = idx[j]
      delta = rewards[j] + gamma * next_v - values[b, t]
      gae = delta + gamma * lam * gae
      adv[b, t], ret[b, t] = gae, gae + values[b, t]
      next_v = values[b, t]
  return adv, ret


def test_rewards_and_gae_match_a_loop_reference():
  rng = np.random.default_rng(0)
  b, t = 3, 7
  old = -rng.exponential(2.0, (b, t)).astype(np.float32)
  ref = (old + rng.normal(0, 0.3, (b, t))).astype(np.float32)
  values = rng.normal(0, 1, (b, t)).astype(np.float32)
  score = np.array([1.0, 0.0, -0.5], np.float32)
  mask = np.array([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], np.float32)
  cfg = config("", "--config.align.kl_coef=0.1", "--config.align.gamma=0.9", "--config.align.lam=0.8",
               "--config.align.whiten=false")
  adv, ret, kl = ppo.advantages(cfg, *(jnp.asarray(x) for x in (old, ref, values, score, mask)))
  want_adv, want_ret = reference_advantages(old, ref, values, score, mask, 0.1, 0.9, 0.8)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kl, (old - ref) * mask, rtol=1e-6)
  assert not np.asarray(adv)[2].any()  # a row with no reply token gets nothing (and no score)
  # Whitened: zero mean, unit variance over the reply tokens; the same ordering.
  cfg = config("", "--config.align.kl_coef=0.1", "--config.align.gamma=0.9", "--config.align.lam=0.8")
  w = np.asarray(ppo.advantages(cfg, *(jnp.asarray(x) for x in (old, ref, values, score, mask)))[0])
  on = mask > 0
  assert abs(w[on].mean()) < 1e-5 and abs(w[on].std() - 1) < 1e-4 and not w[~on].any()
  assert (np.argsort(w[on]) == np.argsort(want_adv[on])).all()


def test_end_to_end(tiny_run, tmp_path, monkeypatch):
  """3 steps with ppo_epochs=2: rollout 0 feeds steps 1-2 (same old log-probs/values), rollout 1 step 3."""
  seen = []
  rollouts = ppo.rollouts

  def spy(trainer, cfg, convs, prompts, *args):
    seen.append((trainer, prompts))
    for batch in rollouts(trainer, cfg, convs, prompts, *args):
      seen.append(batch)
      yield batch

  monkeypatch.setattr(ppo, "rollouts", spy)
  # A text-pretrained model never answers arithmetic: score replies by the parity of their token ids so
  # rewards differ and the update is real (as tests/test_align_grpo.py does).
  score = grpo.score
  monkeypatch.setattr(grpo, "score", lambda replies, *a, **k: dict(
      score(replies, *a, **k), correct=np.array([sum(r) % 2 for r in replies], np.float32)))
  run_dir = tmp_path / "ppo"
  cfg = config(str(tiny_run), f"--config.run.dir={run_dir}", "--config.train.steps=3",
               "--config.train.log_every=1", "--config.train.eval_every=3", "--config.checkpoint.every=3",
               "--config.align.train_examples=50", "--config.optim.peak_lr=3e-3")
  assert ppo.run(cfg)["steps"] == 3

  (trainer, prompts), batches = seen[0], seen[1:]
  assert len(batches) == 3 and batches[0] is batches[1] and batches[2] is not batches[0]
  end = chat.end_id(trainer.tokenizer)
  for b in (batches[0], batches[2]):
    assert b["inputs"].shape[0] == cfg.align.prompts_per_step
    mask = b["loss_mask"] > 0
    for i in range(len(mask)):  # reply (+ <|end|>) after a pool prompt, nothing else masked
      span = np.flatnonzero(mask[i])
      assert [int(x) for x in b["inputs"][i, :span[0] + 1]] in prompts
      assert (np.diff(span) == 1).all() and (b["targets"][i, span[:-1]] != end).all()
    np.testing.assert_array_equal(b["score"], b["accuracy"])  # verifier score, no end penalty
    assert np.all(b["old_logp"][mask] <= 0) and np.isfinite(b["old_values"][mask]).all()
    assert abs(b["advantages"][mask].mean()) < 1e-4 and not b["advantages"][~mask].any()  # whitened

  rows = read_metrics(run_dir)
  evals = [r for r in rows if "eval_accuracy" in r]
  assert [r["step"] for r in evals] == [0, 3]
  steps = [r for r in rows if "score" in r]
  assert [r["step"] for r in steps] == [1, 2, 3]
  for r, b in zip(steps, batches):
    assert r["score"] == pytest.approx(float(b["score"].mean()))
    assert r["completion_len"] == pytest.approx(float(b["loss_mask"].sum(1).mean()))
    assert np.isfinite(r["value/loss"]) and r["value/loss"] > 0
  # Old log-probs are the rollout policy's: ratio 1 on a rollout's first epoch, not on its second.
  assert abs(steps[0]["policy/approx_kl"]) < 1e-7 and abs(steps[2]["policy/approx_kl"]) < 1e-7
  assert steps[1]["policy/approx_kl"] > 1e-7
  assert steps[0]["kl"] == 0.0 and steps[2]["kl"] != 0.0  # the first rollout's policy is the reference
  state = json.loads((run_dir / "config.json").read_text())
  assert state["train"]["batch_size"] == cfg.align.prompts_per_step
  saved = ocp.PyTreeCheckpointHandler().metadata((run_dir / "checkpoints" / "3" / "state").absolute()).tree
  assert saved["heads"]["value"]["w"].shape == (trainer.model_cfg.d_model,)
