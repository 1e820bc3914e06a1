"""End-to-end runs of the post-training stages on the tiny pretrained run (`tiny_run`, seq 64, max_seq_len
256, the project tokenizer): SFT (loss falls, run dir loads for inference, resume == uninterrupted),
LoRA SFT (only adapters train), DPO (cached == online reference, every registered loss, step-0 tie),
reward model (held-out accuracy, `score` == training rewards) and bad input (one error line, exit 2).

Runs are a few steps at batch 8 (one row per fake device) with checkpoints off where a test doesn't
read them. Compilation dominates (~5-10 s per train step on 2 cores), so each module-scoped fixture runs
a stage once for several tests, and JAX's persistent compilation cache (in a temporary directory, for
this module only) lets a run reuse what an earlier one compiled: the resumed SFT run, every DPO run's
log-prob passes, evaluation functions.
"""
import json
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO
from align import dpo, losses, ppo, reward, sft
from align import lora as lora_lib
from align.trainer import Trainer
from configs.loader import ConfigError, parse_args
from data import preference
from data import sft as sft_data
from model.load import find_step_dir, load_model
from train.metrics import read_metrics
from train.sample import load_for_inference

# SFT: 80 GSM8K conversations, 16 of the 72 training ones fit 256 tokens with the tiny run's 512-piece
# tokenizer (16 packed rows = 2 batches of 8). A constant LR (no warmup, no decay) so a run stopped at
# step 2 and continued to 4 follows the same schedule as one run to 4.
SFT = ("--config.align.limit=80", "--config.align.val_examples=8", "--config.align.sample_replies=2",
       "--config.align.max_new_tokens=8", "--config.train.batch_size=8", "--config.train.log_every=1",
       "--config.optim.schedule=constant", "--config.optim.warmup_steps=0", "--config.optim.peak_lr=3e-3")
# Preference stages: the first 40 / 64 HH-RLHF harmless pairs (38 / 58 fit 256 tokens).
DPO = ("--config.align.limit=40", "--config.align.val_pairs=8", "--config.train.batch_size=8",
       "--config.train.log_every=1", "--config.train.eval_every=0", "--config.checkpoint.every=0",
       "--config.optim.peak_lr=1e-3", "--config.optim.warmup_steps=0")
REWARD = ("--config.align.limit=64", "--config.align.val_pairs=16", "--config.train.batch_size=8",
          "--config.train.log_every=1", "--config.optim.peak_lr=1e-3", "--config.optim.warmup_steps=0")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  from jax.experimental.compilation_cache import compilation_cache as cc
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  before = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  cc.reset_cache()  # the cache is set up once per process, at the first compile: redo it now.
  yield
  for n, v in before.items():
    jax.config.update(n, v)
  cc.reset_cache()


def config(stage: str, run_dir, init, *overrides):
  cfg, rest = parse_args([f"--config=configs/align.py:{stage},smoke", f"--config.init={init}",
                          f"--config.run.dir={run_dir}", "--config.train.progress=false", *overrides],
                         "configs/align.py:sft")
  assert not rest
  return cfg


def read_state(run_dir, step: int | None = None) -> dict:
  """A checkpoint's whole `state` item as NumPy arrays."""
  path = (pathlib.Path(run_dir) / "checkpoints" / str(step) if step is not None
          else find_step_dir(run_dir)).absolute() / "state"
  handler = ocp.PyTreeCheckpointHandler()
  tree = handler.metadata(path).tree
  with ocp.Checkpointer(handler) as ckptr:
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                        is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def by_step(rows, key):
  return {r["step"]: r[key] for r in rows if key in r}


def max_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)),
                                                                     initial=0.0)), a, b)))


def size(tree) -> int:
  return sum(np.size(x) for x in jax.tree.leaves(tree))


# --- SFT ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_runs(tiny_run, tmp_path_factory):
  """`full`: 4 steps uninterrupted; `resumed`: 2 steps, then the same command with steps=4."""
  root = tmp_path_factory.mktemp("sft")
  common = (*SFT, "--config.train.eval_every=2", "--config.checkpoint.every=2", "--config.checkpoint.keep=0")
  sft.run(config("sft", root / "full", tiny_run, *common, "--config.train.steps=4"))
  sft.run(config("sft", root / "resumed", tiny_run, *common, "--config.train.steps=2"))
  more = config("sft", root / "resumed", tiny_run, *common, "--config.train.steps=4")
  trainer = Trainer(more)  # what the rerun will see: the step-2 checkpoint.
  start = trainer.start
  trainer.ckpt.close()
  sft.run(more)
  return dict(full=root / "full", resumed=root / "resumed", resumed_start=start)


def test_sft_loss_falls_and_logs_evals(sft_runs):
  rows = read_metrics(sft_runs["full"])
  loss, val = by_step(rows, "loss"), by_step(rows, "val_loss")
  assert sorted(loss) == [1, 2, 3, 4] and sorted(val) == [0, 2, 4], rows
  assert all(math.isfinite(v) for v in loss.values())
  # Same held-out conversations at every eval: 4 steps at lr 3e-3 take 6.41 → 5.18 nats here.
  assert val[4] < val[0] - 0.5, val
  assert loss[4] < loss[1], loss
  for step, ended in by_step(rows, "ends_with_end").items():
    assert 0.0 <= ended <= 1.0 and step in val


def test_sft_run_dir_loads_for_inference(sft_runs, tiny_run):
  state = read_state(sft_runs["full"], 4)
  assert int(state["step"]) == 4 and "lora" not in state
  model, meta = load_model(sft_runs["full"])
  from flax import nnx
  loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert max_diff(loaded, state["params"]) == 0.0
  assert meta["config"]["align"]["data"] == "gsm8k" and meta["init"].startswith(str(tiny_run))
  model2, tok, _ = load_for_inference(sft_runs["full"])
  _, tiny_tok, _ = load_for_inference(tiny_run)
  text = "Natalia sold clips to 48 of her friends."
  assert tok.encode(text) == tiny_tok.encode(text) and model2.cfg == model.cfg
  # The trained weights differ from the pretrained ones they started from.
  base, _ = load_model(tiny_run)
  assert max_diff(nnx.to_pure_dict(nnx.state(base, nnx.Param)), loaded) > 1e-3


def test_sft_resume_matches_uninterrupted_run(sft_runs):
  assert sft_runs["resumed_start"] == 2
  full, resumed = read_metrics(sft_runs["full"]), read_metrics(sft_runs["resumed"])
  # Metrics continue from the checkpoint: same rows (no repeated step-0 eval), same numbers.
  assert [(r["step"], sorted(r)) for r in resumed] == [(r["step"], sorted(r)) for r in full]
  for a, b in zip(full, resumed):
    for k in a:
      assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
  assert max_diff(read_state(sft_runs["full"], 4)["params"], read_state(sft_runs["resumed"], 4)["params"]) <= 1e-6


def test_trainer_step_compiles_once(sft_runs, tiny_run, tmp_path):
  """The state keeps its shardings from step to step, so the step is compiled and dispatched once (its
  scalars used to move from one device onto the mesh after step 1: a second ~7 s compile)."""
  del sft_runs  # runs first: its compiled step is in the persistent cache.
  trainer = Trainer(config("sft", tmp_path / "t", tiny_run, *SFT))
  step = trainer.make_step(sft.sft_loss)
  rows = np.arange(8 * 256, dtype=np.int32).reshape(8, 256) % 300
  batch = dict(inputs=rows, targets=rows, positions=np.tile(np.arange(256, dtype=np.int32), (8, 1)),
               segment_ids=np.ones((8, 256), np.int32), loss_mask=np.ones((8, 256), np.float32))
  state = trainer.state
  for _ in range(3):
    state, _ = step(state, {}, trainer.put_batch(batch))
  trainer.ckpt.close()
  assert step._cache_size() == 1  # pylint: disable=protected-access


# --- LoRA SFT -------------------------------------------------------------------------------------

def test_lora_sft_trains_only_adapters(tiny_run, tmp_path):
  run_dir = tmp_path / "lora"
  sft.run(config("sft", run_dir, tiny_run, *SFT, "--config.train.steps=2", "--config.train.eval_every=0",
                 "--config.checkpoint.every=2", "--config.lora.rank=4", "--config.align.sample_replies=0"))
  state = read_state(run_dir, 2)
  assert set(state) >= {"lora", "params", "opt_state", "step"} and "heads" not in state
  from flax import nnx
  base_model, _ = load_model(tiny_run)
  base = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(base_model, nnx.Param)))
  cfg = lora_lib.LoraConfig(rank=4, alpha=16.0, targets=("wq", "wk", "wv", "wo"))
  merged = lora_lib.merge(base, state["lora"], cfg)
  assert max_diff(merged, state["params"]) <= 1e-6  # saved params = base + (α/r)·A·B
  attn = state["params"]["blocks"]["attn"]
  for name in ("wq", "wk", "wv", "wo"):  # targeted weights moved...
    assert np.max(np.abs(attn[name] - base["blocks"]["attn"][name])) > 1e-6, name
  # ...everything else is the init checkpoint's, bit for bit.
  for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"]):
    keys = [p.key for p in path]
    if keys[-1] not in cfg.leaf_names:
      ref = base
      for k in keys:
        ref = ref[k]
      np.testing.assert_array_equal(leaf, ref, err_msg=str(keys))
  # Adam's two moments for the adapters and a few counters, nothing the size of the model.
  n_lora, n_opt = size(state["lora"]), size(state["opt_state"])
  assert 2 * n_lora <= n_opt <= 2 * n_lora + 16, (n_lora, n_opt)
  assert n_lora == lora_lib.count(state["lora"]) and n_lora < size(base) / 5


# --- DPO ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dpo_runs(tiny_run, tmp_path_factory):
  root = tmp_path_factory.mktemp("dpo")
  for ref in ("cached", "online"):
    dpo.run(config("dpo", root / ref, tiny_run, *DPO, "--config.train.steps=2", f"--config.align.reference={ref}"))
  return {ref: read_metrics(root / ref) for ref in ("cached", "online")}


def test_dpo_cached_and_online_reference_agree(dpo_runs):
  cached, online = (by_step(dpo_runs[r], "loss") for r in ("cached", "online"))
  # Step 1: policy == reference, so h = 0 and the loss is −log σ(0) = log 2 — whichever way the
  # reference log-probs were computed, as long as they belong to the batch's pairs.
  assert cached[1] == pytest.approx(math.log(2), abs=1e-6) and online[1] == pytest.approx(math.log(2), abs=1e-6)
  # Step 2: the policy moved; the (unchanged) reference must still match pair for pair.
  assert abs(cached[2] - math.log(2)) > 1e-5
  assert cached[2] == pytest.approx(online[2], abs=1e-5)
  for key in ("grad_norm", "rewards/margin", "rewards/accuracy"):
    for step in (1, 2):
      assert by_step(dpo_runs["cached"], key)[step] == pytest.approx(by_step(dpo_runs["online"], key)[step],
                                                                       abs=1e-5), (key, step)


def test_dpo_step0_accuracy_is_computed_and_exactly_tied(dpo_runs):
  for rows in dpo_runs.values():
    step0 = rows[0]
    assert step0["step"] == 0 and {"val_accuracy", "val_margin", "val_chosen_logp"} <= set(step0)
    # Policy == reference: every implicit reward is exactly 0, so no pair is "won" (strict >).
    assert step0["val_margin"] == 0.0 and step0["val_accuracy"] == 0.0
    assert step0["val_chosen_logp"] < 0


@pytest.mark.parametrize("ref", ["cached", "online"])
def test_lora_dpo_trains_adapters_against_the_base_reference(ref, tiny_run, tmp_path):
  """LoRA + DPO: the reference is the frozen base (log 2 at step 1), only adapters train."""
  run_dir = tmp_path / ref
  dpo.run(config("dpo", run_dir, tiny_run, *DPO, "--config.train.steps=2", "--config.lora.rank=4",
                 "--config.optim.peak_lr=1e-3", "--config.checkpoint.every=2", f"--config.align.reference={ref}"))
  loss = by_step(read_metrics(run_dir), "loss")
  assert loss[1] == pytest.approx(math.log(2), abs=1e-6) and abs(loss[2] - math.log(2)) > 1e-6
  state = read_state(run_dir, 2)
  n_lora, n_opt = size(state["lora"]), size(state["opt_state"])
  assert 2 * n_lora <= n_opt <= 2 * n_lora + 16, (n_lora, n_opt)
  from flax import nnx
  base_model, _ = load_model(tiny_run)
  base = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(base_model, nnx.Param)))
  cfg = lora_lib.LoraConfig(rank=4, alpha=16.0, targets=("wq", "wk", "wv", "wo"))
  assert max_diff(lora_lib.merge(base, state["lora"], cfg), state["params"]) <= 1e-6


@pytest.mark.parametrize("name", [n for n in losses.PREFERENCE_LOSSES if n != "dpo"])  # dpo: above.
def test_each_registered_loss_runs_one_step(name, tiny_run, tmp_path):
  dpo.run(config("dpo", tmp_path / name, tiny_run, *DPO, "--config.train.steps=1", f"--config.align.loss={name}"))
  rows = read_metrics(tmp_path / name)
  assert [r["step"] for r in rows] == [0, 1]
  loss = rows[1]["loss"]
  assert math.isfinite(loss) and rows[1]["nonfinite"] == 0
  if name == "robust":  # label_smoothing 0 (the preset): rDPO is DPO, log 2 at policy == reference.
    assert loss == pytest.approx(math.log(2), abs=1e-6)
  elif name == "ipo":  # (h − 1/(2τ))² with h = 0, τ = 0.1.
    assert loss == pytest.approx(25.0, rel=1e-6)
  elif name == "kto":  # policy == reference: r = z0 = 0, so each example loses λ − λσ(0) = 0.5.
    assert loss == pytest.approx(0.5, abs=1e-6) and rows[1]["kto/kl_ref_point"] == 0.0
  else:  # reference-free: the step-0 accuracy is on length-normalized log-probs, not a tie.
    assert rows[0]["val_margin"] != 0.0 and 0.0 <= rows[0]["val_accuracy"] <= 1.0


# --- reward model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_run(tiny_run, tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("reward") / "rm"
  reward.run(config("reward", run_dir, tiny_run, *REWARD, "--config.train.steps=4", "--config.train.eval_every=4",
                    "--config.checkpoint.every=4"))
  return run_dir


def test_reward_reports_heldout_accuracy_and_trains(reward_run):
  rows = read_metrics(reward_run)
  acc, margin = by_step(rows, "val_accuracy"), by_step(rows, "val_margin")
  assert sorted(acc) == [0, 4] and all(0.0 <= a <= 1.0 for a in acc.values())
  # 16 held-out pairs: accuracy is a multiple of 1/16.
  assert all(float(a * 16).is_integer() for a in acc.values())
  assert abs(margin[4] - margin[0]) > 1e-4  # the head (and trunk) moved.
  loss = by_step(rows, "loss")
  assert sorted(loss) == [1, 2, 3, 4] and all(math.isfinite(v) for v in loss.values())
  assert abs(by_step(rows, "val_loss")[0] - math.log(2)) < 0.1  # a 0.02-std head: rewards near 0.


def test_reward_score_matches_training(reward_run, tiny_run):
  state = read_state(reward_run, 4)
  d_model = load_model(tiny_run)[0].cfg.d_model
  assert state["heads"]["reward"]["w"].shape == (d_model,)
  assert float(state["heads"]["reward"]["b"]) == 0.0  # Bradley-Terry sees differences only: b is not trained.
  rm = reward.load_reward_model(reward_run)
  assert rm.seq_len == 256
  np.testing.assert_array_equal(np.asarray(rm.head["w"]), state["heads"]["reward"]["w"])
  # The run's held-out pairs: the last 16 of those pair_arrays kept.
  pairs, _ = sft_data.hh_rlhf_pairs(limit=64)
  kept = [p for p in pairs if preference.pair_arrays([p], rm.tokenizer, rm.seq_len)[1]["kept"]]
  val = kept[-16:]
  prompts = [p["prompt"] for p in val]
  r_c, r_r = rm(prompts, [p["chosen"] for p in val]), rm(prompts, [p["rejected"] for p in val])
  assert r_c.shape == (16,) and r_c.dtype == np.float32
  final = by_step(read_metrics(reward_run), "val_margin")[4]
  # The training eval ran on the 8-device mesh, `score` on one device: equal up to fp32 reduction order.
  assert float(np.mean(r_c.astype(np.float64) - r_r)) == pytest.approx(final, abs=1e-5)
  assert float(np.mean(r_c > r_r)) == by_step(read_metrics(reward_run), "val_accuracy")[4]
  # One pair alone scores as in the batch (padding rows don't leak); a str prompt is one user turn.
  one = reward.score(reward_run, [prompts[0]], [val[0]["chosen"]])
  assert one[0] == pytest.approx(r_c[0], abs=1e-5)
  question, replies = "Is the sea salty?", ["Yes.", "No."]
  as_text, as_turn = rm([question] * 2, replies), rm([[dict(role="user", content=question)]] * 2, replies)
  np.testing.assert_array_equal(as_text, as_turn)
  assert as_text[0] != as_text[1]
  with pytest.raises(ValueError, match="2 prompts but 1 replies"):
    rm(["a", "b"], ["c"])


def test_ppo_scores_rollouts_with_the_reward_model(reward_run, tiny_run, tmp_path, monkeypatch):
  """PPO on HH-RLHF prompts: each rollout reply is scored by the trained reward model (minus the
  missing-<|end|> penalty), the held-out evaluation reports its mean reward."""
  calls = []
  make_scorer = ppo.make_scorer

  def spy(cfg, tokenizer):
    scorer = make_scorer(cfg, tokenizer)
    def wrapped(convs, replies, stopped, targets):
      out = scorer(convs, replies, stopped, targets)
      calls.append((convs, replies, stopped, out))
      return out
    return wrapped

  monkeypatch.setattr(ppo, "make_scorer", spy)
  run_dir = tmp_path / "ppo"
  summary = ppo.run(config("ppo", run_dir, tiny_run, "--config.align.task=hh_rlhf",
                           f"--config.align.reward_model={reward_run}", "--config.align.train_examples=40",
                           "--config.align.eval_examples=4", "--config.align.missing_end_penalty=0.5",
                           "--config.train.steps=2", "--config.train.eval_every=2", "--config.checkpoint.every=0",
                           "--config.train.log_every=1"))
  assert summary["steps"] == 2
  rm = reward.load_reward_model(reward_run)
  _, tok, _ = load_for_inference(tiny_run)
  end = tok.special_ids["<|end|>"]
  assert len(calls) == 3  # eval at step 0, one rollout (2 epochs), eval at step 2
  for convs, replies, stopped, out in calls:
    assert all(c[-1]["role"] == "user" for c in convs)
    texts = [tok.decode([t for t in r]) for r in replies]
    ended = np.array([s and not set(r) & set(tok.special_ids.values()) for r, s in zip(replies, stopped)])
    np.testing.assert_array_equal(out["ended"], ended.astype(np.float32))
    np.testing.assert_allclose(out["score"], rm(convs, texts) - 0.5 * (1 - ended), rtol=1e-5, atol=1e-6)
    assert end not in [t for r in replies for t in r]
  rows = read_metrics(run_dir)
  assert sorted(by_step(rows, "eval_reward")) == [0, 2]
  assert by_step(rows, "eval_reward")[0] == pytest.approx(float(calls[0][3]["score"].mean()))
  assert by_step(rows, "score")[1] == pytest.approx(float(calls[1][3]["score"].mean()))


def test_score_needs_a_reward_head(tiny_run):
  with pytest.raises(ValueError, match="no reward head"):
    reward.load_head(tiny_run)


# --- bad input ------------------------------------------------------------------------------------

def cli(module: str, *args):
  r = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)
  return r.returncode, r.stderr.strip()


def test_cli_missing_init_is_one_error_line():
  code, err = cli("align.reward", "--config=configs/align.py:reward,smoke")
  assert code == 2 and err.splitlines() == [err] and err.startswith("error: --config.init is required"), err


def run_main(main, capsys, *args) -> str:
  """A stage's CLI in-process: exit 2 and the `error: ...` line it printed."""
  with pytest.raises(SystemExit) as e:
    main(list(args))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err and err[-1].startswith("error: ")
  return err[-1]


def test_unknown_loss(tiny_run, tmp_path, capsys):
  err = run_main(dpo.main, capsys, "--config=configs/align.py:dpo,smoke", f"--config.init={tiny_run}",
                 f"--config.run.dir={tmp_path / 'out'}", "--config.align.loss=nope")
  assert "align.loss='nope' unknown" in err and "simpo" in err, err


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_seq_len_beyond_the_model(stage, tiny_run, tmp_path, capsys):
  main = {"dpo": dpo.main, "reward": reward.main}[stage]
  err = run_main(main, capsys, f"--config=configs/align.py:{stage},smoke", f"--config.init={tiny_run}",
                 f"--config.run.dir={tmp_path / 'out'}", "--config.align.seq_len=512")
  assert "align.seq_len=512 exceeds the model's max_seq_len=256" in err, err


def test_init_that_does_not_exist(tmp_path, capsys):
  missing = tmp_path / "no-such-run"
  err = run_main(sft.main, capsys, "--config=configs/align.py:sft,smoke", f"--config.init={missing}",
                 f"--config.run.dir={tmp_path / 'out'}")
  assert str(missing) in err and "not found" in err
  with pytest.raises(ConfigError, match="no-such-run"):
    reward.run(config("reward", tmp_path / "out", missing))
  assert not (tmp_path / "out").exists()  # nothing written for a run that never started


def test_preference_file_with_missing_field(tiny_run, tmp_path, capsys):
  path = tmp_path / "prefs.jsonl"
  good = dict(prompt="Is the sea salty?", chosen="Yes, about 3.5% salt.", rejected="No.")
  path.write_text(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "rejected"}) + "\n")
  err = run_main(reward.main, capsys, "--config=configs/align.py:reward,smoke", f"--config.init={tiny_run}",
                 f"--config.run.dir={tmp_path / 'out'}", f"--config.align.data={path}")
  assert f"{path}:2" in err and "'rejected'" in err, err


def test_conversation_file_without_assistant_turn(tiny_run, tmp_path, capsys):
  path = tmp_path / "convs.jsonl"
  path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi there"}]}) + "\n")
  err = run_main(sft.main, capsys, "--config=configs/align.py:sft,smoke", f"--config.init={tiny_run}",
                 f"--config.run.dir={tmp_path / 'out'}", f"--config.align.data={path}")
  assert f"{path}:1" in err and "no assistant turn" in err, err
