"""Evaluation harness: held-out BPB against a direct computation, MC aggregation, GSM8K/HumanEval wiring
(with an oracle standing in for the model), stability, the CLI, and evaluation inside the training loop."""
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, require, shared_data
from train import evaluate as ev
from train.scoring import LanguageModel

ARTICLES = (" = First Article = \n\n The quick brown fox jumps over the lazy dog . \n\n"
            " = = Section = = \n\n It was the best of times , it was the worst of times . \n\n"
            " = Second Article = \n\n To be , or not to be : that is the question . \n")


@pytest.fixture(scope="module")
def lm(tiny_run):
  # max_len 256 (the model's max_seq_len, beyond the run's seq_len 64) so each test article fits one
  # window and the reference is a single plain forward.
  return LanguageModel.from_checkpoint(tiny_run, batch_size=4, max_len=256)


def _direct_logprob(lm, ids):
  """Σ log p(ids[1:] | prefix) by one plain forward of the whole sequence, no harness code."""
  logits = lm.model(jnp.asarray([ids])).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
  return float(jnp.sum(jnp.take_along_axis(logp, jnp.asarray(ids[1:])[:, None], axis=-1)))


def test_heldout_bits_per_byte_matches_direct_computation(lm, tmp_path):
  path = tmp_path / "wiki.txt"
  path.write_text(ARTICLES)
  res = ev.evaluate(lm, [f"heldout:{path}"])[f"heldout:{path}"]
  from data.tasks import heldout
  docs = heldout.documents(ARTICLES)
  assert res["documents"] == len(docs) == 2
  tok = lm.tokenizer
  assert all(len(tok.encode(d)) < 255 for d in docs)
  logp = sum(_direct_logprob(lm, [tok.bos_id] + tok.encode(d)) for d in docs)
  nbytes = sum(len(d.encode()) for d in docs)
  assert res["tokens"] == sum(len(tok.encode(d)) for d in docs) and res["bytes"] == nbytes
  assert res["bits_per_byte"] == pytest.approx(-logp / math.log(2) / nbytes, rel=1e-5)
  assert res["perplexity"] == pytest.approx(math.exp(-logp / res["tokens"]), rel=1e-5)
  again = ev.evaluate(lm, [f"heldout:{path}"])[f"heldout:{path}"]
  assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in res.items() if k != "seconds"}


def test_wikitext2_runs_on_shared_data(lm):
  require((shared_data() / "text" / "wikitext2_test.txt").is_file(), "WikiText-2 not in shared data")
  res = ev.evaluate(lm, ["wikitext2"], limit=2)["wikitext2"]
  assert res["documents"] == 2 and res["tokens"] > 1000
  # A 20-step model is far from good but far better than uniform over 4096 tokens (12 bits/token).
  assert 0.5 < res["bits_per_byte"] < 12 * res["tokens"] / res["bytes"]


def test_multiple_choice_acc_and_acc_norm_follow_the_loglikelihoods(lm, tmp_path):
  from data.tasks.multiple_choice import MCExample, write_jsonl
  rng = np.random.default_rng(0)
  words = ["the king", "a horse", "my lord", "sweet love", "thee", "of Rome and all the world", "night"]
  examples = [MCExample(id=str(i), context=f"ROMEO:\nI would give {w1} for", gold=int(rng.integers(3)),
                        choices=[" " + w for w in rng.choice(words, 3, replace=False)])
              for i, w1 in enumerate(words)]
  path = tmp_path / "mc.jsonl"
  write_jsonl(examples, path)
  res = ev.evaluate(lm, [f"mc:{path}"])[f"mc:{path}"]
  tok = lm.tokenizer
  acc = acc_norm = 0
  for ex in examples:
    ctx = [tok.bos_id] + tok.encode(ex.context)
    lls = [_direct_logprob(lm, ctx + tok.encode(c)) - _direct_logprob(lm, ctx) for c in ex.choices]
    acc += int(np.argmax(lls)) == ex.gold
    acc_norm += int(np.argmax([ll / len(c.encode()) for ll, c in zip(lls, ex.choices)])) == ex.gold
  assert res["examples"] == len(examples)
  assert res["acc"] == acc / len(examples) and res["acc_norm"] == acc_norm / len(examples)


class _Oracle:
  """Stands in for a model: answers generate_until from a prompt → completion function."""

  def __init__(self, answer):
    self.answer, self.prompts = answer, []

  def generate_until(self, requests):
    self.prompts += [p for p, _ in requests]
    return [self.answer(p) for p, _ in requests]


def test_gsm8k_scores_exact_match_of_the_final_number():
  from data.tasks import gsm8k
  problems = {p["question"]: p for p in gsm8k.load("test", limit=4)}

  def right(prompt):
    question = prompt.rsplit("Question: ", 1)[1].rsplit("\nAnswer:", 1)[0]
    return " " + problems[question]["answer"]

  oracle = _Oracle(right)
  res = ev.evaluate(oracle, ["gsm8k"], limit=4, gsm8k_shots=2)["gsm8k"]
  assert res["exact_match"] == 1.0 and res["shots"] == 2 and len(oracle.prompts) == 4
  assert oracle.prompts[0].count("Question: ") == 3 and oracle.prompts[0].endswith("\nAnswer:")
  wrong = ev.evaluate(_Oracle(lambda p: " The answer is 3.14159."), ["gsm8k"], limit=4)["gsm8k"]
  assert wrong["exact_match"] == 0.0


def test_humaneval_pass_at_k_with_sandboxed_checks():
  from data.tasks import humaneval
  problems = {p["prompt"]: p for p in humaneval.load(limit=3)}
  good = ev.evaluate(_Oracle(lambda p: problems[p]["canonical_solution"] + "\ndef unused():\n  pass\n"),
                     ["humaneval"], limit=3)["humaneval"]
  assert good["pass@1"] == 1.0 and good["statuses"] == {"passed": 3}
  bad = ev.evaluate(_Oracle(lambda p: "    raise NotImplementedError\n"), ["humaneval"], limit=3)["humaneval"]
  assert bad["pass@1"] == 0.0 and bad["statuses"] == {"failed": 3}
  # n = 4 samples, every other one right: pass@1 = 0.5 and pass@2 = 1 - C(2,2)/C(4,2) = 5/6 (Chen et al.).
  calls = iter(range(1000))
  mixed = ev.evaluate(_Oracle(lambda p: problems[p]["canonical_solution"] if next(calls) % 2 else "  x = (\n"),
                      ["humaneval"], limit=3, humaneval_samples=4)["humaneval"]
  assert mixed["samples_per_problem"] == 4 and mixed["pass@1"] == pytest.approx(0.5)
  assert "pass@10" not in mixed


def test_cli_writes_json_and_table(tiny_run, tmp_path):
  path = tmp_path / "wiki.txt"
  path.write_text(ARTICLES)
  out = tmp_path / "res.json"
  r = subprocess.run([sys.executable, "-m", "train.evaluate", f"--checkpoint={tiny_run}",
                      f"--tasks=heldout:{path},gsm8k", "--limit=2", "--gsm8k_shots=1", "--max_gen_toks=16",
                      f"--out={out}"], cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  record = json.loads(out.read_text())
  assert set(record["tasks"]) == {f"heldout:{path}", "gsm8k"} and record["step"] == 100
  assert "bits_per_byte" in r.stdout and "exact_match" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--tasks=nope"], "unknown task 'nope'"),
    (["--tasks=mc:"], "unknown task 'mc:'"),
    (["--tasks=wikitext2", "--limit=0"], "--limit=0 must be"),
    (["--tasks=mc:/does/not/exist.jsonl"], "exist.jsonl"),
])
def test_cli_bad_input_is_one_line(tiny_run, args, message):
  r = subprocess.run([sys.executable, "-m", "train.evaluate", f"--checkpoint={tiny_run}", *args],
                     cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_bad_checkpoint(tmp_path):
  r = subprocess.run([sys.executable, "-m", "train.evaluate", f"--checkpoint={tmp_path / 'none'}",
                      "--tasks=wikitext2"], cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 2 and "checkpoint not found" in r.stderr


def test_training_loop_evaluates_at_intervals(tiny_run, tmp_path):
  """Continue the fixture's run for 10 steps with evaluation every 5: rows in metrics.jsonl + JSON files."""
  import shutil

  from train.config import parse_args
  from train.loop import run
  from train.metrics import read_metrics
  run_dir = tmp_path / "run"
  shutil.copytree(tiny_run, run_dir)
  text = tmp_path / "wiki.txt"
  text.write_text(ARTICLES)
  config = json.loads((run_dir / "config.json").read_text())
  sources = ",".join(f"{k}={v}" for k, v in config["data"]["sources"].items()) if isinstance(
      config["data"]["sources"], dict) else config["data"]["sources"]
  cfg, _ = parse_args(["--config=configs/lm.py:tiny,smoke", f"--config.data.sources={sources}",
                       f"--config.run.dir={run_dir}", "--config.train.progress=false",
                       "--config.checkpoint.async_save=false", "--config.train.steps=110",
                       f"--config.eval.tasks=('heldout:{text}',)", "--config.eval.every=5"])
  run(cfg)
  rows = [r for r in read_metrics(run_dir) if f"eval/heldout:{text}/bits_per_byte" in r]
  assert [r["step"] for r in rows] == [105, 110]
  assert (run_dir / "eval" / "step_110.json").is_file()
