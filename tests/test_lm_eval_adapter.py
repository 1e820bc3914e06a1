"""The lm-evaluation-harness adapter (`--model jaxlm`) and `python -m train.lm_eval`, offline.

Requests go through lm-eval's own `Instance` objects, tokenization and rolling windows are checked
against lm-eval's own code (TemplateLM._encode_pair, get_rolling_token_windows), and one real CLI run
evaluates three local tasks (multiple choice, rolling log-likelihood, generation) built from shared
GSM8K and WikiText-2 files, whose metrics must equal the same numbers computed in-process.
"""
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import get_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from configs.loader import ConfigError
from conftest import REPO, require, shared_data
from train.lm_eval_adapter import JaxLM
from train.scoring import LanguageModel

MAX_LEN = 64
CLI_ARGS = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}  # what lm-eval's CLI passes


@pytest.fixture(scope="module")
def run_dir(tiny_run):
  return tiny_run


@pytest.fixture(scope="module")
def adapter(run_dir):
  return JaxLM.create_from_arg_string(f"checkpoint={run_dir},batch_size=4,max_len={MAX_LEN}", CLI_ARGS)


def test_registered_and_built_from_model_args(run_dir, adapter):
  assert get_model("jaxlm") is JaxLM
  # model_args' batch_size wins over the CLI's default --batch_size 1; without one, the CLI's is used.
  assert (adapter.lm.batch_size, adapter.lm.max_len) == (4, MAX_LEN)
  lm = JaxLM.create_from_arg_obj({"checkpoint": str(run_dir)}, dict(CLI_ARGS, batch_size="auto")).lm
  assert (lm.batch_size, lm.max_len) == (16, 64)  # 64: the run's training seq_len (tiny,smoke)
  assert JaxLM.create_from_arg_obj({"checkpoint": str(run_dir)}, dict(CLI_ARGS, batch_size=2)).lm.batch_size == 2
  with pytest.raises(ConfigError, match=r"unknown model_args \['foo'\]"):
    JaxLM.create_from_arg_string(f"checkpoint={run_dir},foo=1", CLI_ARGS)
  with pytest.raises(ConfigError, match="needs --model_args checkpoint="):
    JaxLM.create_from_arg_string("batch_size=4", CLI_ARGS)
  with pytest.raises(ConfigError, match="checkpoint not found"):
    JaxLM.create_from_arg_string(f"checkpoint={run_dir}/nope", CLI_ARGS)
  with pytest.raises(ConfigError, match="max_len=4096 must be in"):
    JaxLM.create_from_arg_string(f"checkpoint={run_dir},max_len=4096", CLI_ARGS)


def _instances(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=0, metadata=("t", i, 1))
          for i, a in enumerate(args)]


PAIRS = [("ROMEO:", " I will"), ("", "First Citizen:\nBefore we proceed"), ("What say you, my ", "lord?"),
         ("To be, or not to be: " * 10, "that is the question")]


def test_each_request_type_through_instances(adapter):
  lm = adapter.lm
  got = adapter.loglikelihood(_instances("loglikelihood", PAIRS))
  assert got == lm.loglikelihood(PAIRS) and all(isinstance(g[1], bool) for g in got)
  texts = ["First Citizen:\nWe are accounted poor citizens.", "to be " * 60, ""]
  rolled = adapter.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]))
  assert rolled == lm.loglikelihood_rolling(texts) and rolled[2] == 0.0 and rolled[1] < rolled[0] < 0
  gens = [("ROMEO:", {"until": ["\n"], "max_gen_toks": 8}), ("", {"until": "xyz", "max_gen_toks": 8})]
  out = adapter.generate_until(_instances("generate_until", gens))
  assert out == lm.generate_until(gens) and "\n" not in out[0]


class _RecordingLM(TemplateLM):
  """lm-eval's own loglikelihood tokenization (TemplateLM) over the project tokenizer, as HFLM runs it
  for a BOS-prepending tokenizer; it records the token pairs instead of scoring them."""

  def __init__(self, tok):
    super().__init__()
    self.tok = tok

  @property
  def eot_token_id(self):
    return self.tok.bos_id  # prefix_token_id: what an empty context becomes

  def tok_encode(self, string, add_special_tokens=None, **kw):
    return ([] if add_special_tokens is False else [self.tok.bos_id]) + self.tok.encode(string)

  def _loglikelihood_tokens(self, requests, **kw):
    return [(ctx, cont) for _, ctx, cont in requests]

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    raise NotImplementedError

  def generate_until(self, requests, disable_tqdm=False):
    raise NotImplementedError


def test_tokenization_and_windows_match_lm_eval(adapter):
  lm, tok = adapter.lm, adapter.lm.tokenizer
  pairs = PAIRS + [("Question: 2+2?\nAnswer:", " 4"), ("Hello  ", "world"), ("KING:\n", "Speak.")]
  reference = _RecordingLM(tok).loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
  assert lm._encode_pairs(pairs) == reference
  # Rolling at the default stride (= max_len) is lm-eval's disjoint windows with context_len=1, each
  # window scored as a (context, continuation) request.
  text = (shared_data() / "text" / "tinyshakespeare.txt").read_text()[9000:9500]
  ids = tok.encode(text)
  assert len(ids) > 3 * MAX_LEN
  windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tok.bos_id, MAX_LEN, 1)]
  expected = sum(lp for lp, _ in lm.loglikelihood_tokens(windows))
  (total, n), = lm.rolling_tokens([text])
  assert n == len(ids)
  np.testing.assert_allclose(total, expected, rtol=1e-5)


def _write_tasks(root, gen_answer_0: str):
  """Three local task YAMLs reading JSONL files through lm-eval's `dataset_path: json`."""
  gsm = shared_data() / "math" / "gsm8k_test.jsonl"
  wiki = shared_data() / "text" / "wikitext2_valid.txt"
  require(gsm.exists() and wiki.exists(), f"missing {gsm} or {wiki}")
  rows = [json.loads(line) for line in gsm.read_text().splitlines()[:8]]
  answers = [r["answer"].split("####")[-1].strip() for r in rows]
  rng = random.Random(0)
  mc = []
  for r, a in zip(rows, answers):  # the true answer and three wrong numbers, shuffled
    n = int(a.replace(",", ""))
    choices = [str(n), str(n + 1), str(2 * n + 3), str(n + 10)]
    rng.shuffle(choices)
    mc.append({"question": r["question"], "choices": choices, "label": choices.index(str(n))})
  gen = [{"question": r["question"], "answer": a} for r, a in zip(rows, answers)]
  gen[0]["answer"] = gen_answer_0
  paragraphs = [p.strip() for p in wiki.read_text().splitlines()
                if len(p.strip()) > 300 and not p.strip().startswith("=")][:8]
  files = {"mc": mc, "gen": gen, "wiki": [{"text": p} for p in paragraphs]}
  for name, docs in files.items():
    (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))

  def head(name):
    return (f"task: jaxlm_test_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {root / f'{name}.jsonl'}\ntest_split: test\n")

  (root / "mc.yaml").write_text(head("mc") + """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
""")
  (root / "wiki.yaml").write_text(head("wiki") + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""")
  (root / "gen.yaml").write_text(head("gen") + """output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n\\n", "Question:"], do_sample: false, max_gen_toks: 32}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""")
  return files


def test_cli_evaluates_local_tasks_offline(run_dir, tmp_path):
  # In-process numbers with the CLI's settings (max_len = the model's 256, batch 8).
  lm = LanguageModel.from_checkpoint(run_dir, batch_size=8)
  gsm0 = json.loads((shared_data() / "math" / "gsm8k_test.jsonl").read_text().splitlines()[0])
  gen_kwargs = {"until": ["\n\n", "Question:"], "do_sample": False, "max_gen_toks": 32}
  greedy0, = lm.generate_until([(f"Question: {gsm0['question']}\nAnswer:", gen_kwargs)])
  # Doc 0's reference answer is the model's own greedy output: exact_match must be exactly 1/8.
  files = _write_tasks(tmp_path, greedy0)

  env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
             HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"), HF_HOME=str(tmp_path / "hf_home"))
  out = subprocess.run(
      [sys.executable, "-m", "train.lm_eval", "--model", "jaxlm", "--model_args",
       f"checkpoint={run_dir},batch_size=8", "--tasks", "jaxlm_test_mc,jaxlm_test_wiki,jaxlm_test_gen",
       "--include_path", str(tmp_path), "--limit", "8", "--output_path", str(tmp_path / "out")],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results_files = list((tmp_path / "out").rglob("results_*.json"))
  assert len(results_files) == 1, out.stderr[-2000:]
  results = json.loads(results_files[0].read_text())["results"]

  mc = results["jaxlm_test_mc"]
  lls = lm.loglikelihood([(f"Question: {d['question']}\nAnswer:", f" {c}")
                          for d in files["mc"] for c in d["choices"]])
  picks = np.asarray([lp for lp, _ in lls]).reshape(8, 4).argmax(1)
  assert mc["sample_len"] == 8
  assert mc["acc,none"] == pytest.approx(np.mean(picks == [d["label"] for d in files["mc"]]))

  wiki = results["jaxlm_test_wiki"]
  texts = [d["text"] for d in files["wiki"]]
  total = sum(lm.loglikelihood_rolling(texts))
  n_bytes = sum(len(t.encode("utf-8")) for t in texts)
  assert wiki["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-5)
  assert wiki["word_perplexity,none"] > 1

  assert results["jaxlm_test_gen"]["exact_match,none"] == pytest.approx(1 / 8)
