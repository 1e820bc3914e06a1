"""Serving benchmark (serve/bench.py): figures from traces, every system's tokens, the JSON rows, the CLI.

One tiny random model (fp32, weights N(0, 0.3²) so greedy continuations vary) with the `chat_tokenizer`
fixture's vocabulary, 4 Tiny Shakespeare prompts, 8 output tokens, C = 1 and 2, all four systems.
"""
import json

import pytest

from conftest import require

try:
  import openai
  import torch
  import transformers
except ImportError:  # the `test` extra installs them; a user's machine may not have them.
  openai = torch = transformers = None

from model.config import ModelConfig
from serve import bench
from train.sample import generate_ids

OUT = 8
CFG = ModelConfig(vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                  compute_dtype="float32", init_std=0.3)


@pytest.fixture(scope="module")
def model():
  return bench.random_model(CFG)


@pytest.fixture(scope="module")
def prompts(chat_tokenizer):
  return bench.make_prompts(4, (8, 40), source="shakespeare", vocab_size=CFG.vocab_size,
                            tokenizer=chat_tokenizer, seed=1)


def test_summarize_matches_hand_computed_figures():
  traces = [bench.Trace(0.0, [1.0, 2.0, 3.0], [5, 6, 7]),  # ttft 1, tpot 1, latency 3
            bench.Trace(1.0, [3.0, 5.0], [8, 9])]  # ttft 2, tpot 2, latency 4
  s = bench.summarize(traces, wall=5.0)
  assert s["request_throughput"] == 0.4 and s["output_tokens"] == 5 and s["output_tokens_per_s"] == 1.0
  assert s["ttft_p50_ms"] == 1500.0 and s["ttft_p99_ms"] == pytest.approx(1990.0)
  assert s["tpot_p50_ms"] == 1500.0 and s["latency_p50_s"] == 3.5 and s["wall_s"] == 5.0


def test_prompts_are_real_text_of_the_asked_lengths(prompts, chat_tokenizer):
  assert [len(p) for p in prompts] == [len(p) for p in bench.make_prompts(
      4, (8, 40), source="random", vocab_size=CFG.vocab_size, seed=1)]  # same length draws.
  assert all(8 <= len(p) <= 40 and p[0] == chat_tokenizer.bos_id for p in prompts)
  assert all(chat_tokenizer.decode(p[1:]).strip() for p in prompts)
  with pytest.raises(bench.ConfigError, match="needs a tokenizer"):
    bench.make_prompts(2, (8, 9), source="shakespeare", vocab_size=CFG.vocab_size)


def test_static_and_engine_systems_give_the_reference_greedy_tokens(model, prompts):
  """Both JAX systems against the project's dense KV-cache sampler (eos -1: EOS never stops a row)."""
  ref = generate_ids(model, prompts, eos_id=-1, max_new_tokens=OUT, temperature=0.0)
  for system in (bench.NaiveSystem(model), bench.EngineSystem(model, max_slots=2, max_len=48)):
    traces, wall = system.run(prompts, [OUT] * len(prompts), 2)
    assert [t.tokens for t in traces] == ref
    assert all(t.sent <= t.times[0] and t.times == sorted(t.times) for t in traces) and wall > 0


def test_per_request_output_lengths(model, prompts):
  """`--output_len=LO:HI`: each request gets its own count; a static batch runs to its longest (the
  shorter rows' tokens are its prefix), continuous batching stops each at its own."""
  require(transformers is not None, "torch/transformers not installed (pip install -e '.[test]')")
  lens = [OUT, 2, 1, OUT - 1]
  ref = generate_ids(model, prompts, eos_id=-1, max_new_tokens=OUT, temperature=0.0)
  systems = [bench.NaiveSystem(model), bench.EngineSystem(model, max_slots=2, max_len=48),
             bench.HFSystem(model, threads=1)]
  for system in systems:
    traces, _ = system.run(prompts, lens, 2)
    assert [t.tokens for t in traces] == [r[:n] for r, n in zip(ref, lens)], type(system).__name__
    assert [len(t.times) for t in traces] == lens
  with pytest.raises(bench.ConfigError, match="4 prompts but 3 output lengths"):
    bench.run_bench(model, prompts, output_len=lens[:3], concurrency=(2,), systems=("naive",))


def test_run_bench_rows(model, prompts, chat_tokenizer):
  require(transformers is not None and openai is not None,
          "torch/transformers/openai not installed (pip install -e '.[test]')")
  rows = bench.run_bench(model, prompts, output_len=OUT, concurrency=(1, 2),
                         systems=("engine", "http", "naive", "hf"), tokenizer=chat_tokenizer,
                         parity_requests=2, hf_threads=(1,), setup="test")
  for row in rows:
    json.dumps(row)  # every row is one JSON line.
    assert {"bench", "setup", "device", "jax", "torch", "transformers", "commit"} <= set(row)
  parity = [r for r in rows if r["bench"] == "serve_parity"]
  assert len(parity) == 1 and parity[0]["parity"] is True
  assert parity[0]["systems"] == ["engine", "naive", "hf"]  # http streams text, not ids.
  runs = {(r["system"], r["concurrency"]): r for r in rows if r["bench"] == "serve"}
  assert set(runs) == {(s, c) for s in ("engine", "http", "naive", "hf") for c in (1, 2)}
  for (system, c), r in runs.items():
    assert r["requests"] == 4 and r["output_tokens"] == 4 * OUT
    assert r["prompt_tokens"] == sum(map(len, prompts))
    assert r["wall_s"] > 0 and r["warmup_s"] > 0
    assert r["output_tokens_per_s"] * r["wall_s"] == pytest.approx(4 * OUT, rel=0.01)
    assert r["request_throughput"] * r["wall_s"] == pytest.approx(4, rel=0.01)
    assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["tpot_p50_ms"] <= r["tpot_p99_ms"]
    # Every request's TTFT ≤ its latency ≤ the wall time, so their medians are ordered too.
    assert r["ttft_p50_ms"] <= 1e3 * r["latency_p50_s"] <= 1e3 * r["wall_s"] + 1
  for system in ("engine", "http"):
    prof = runs[system, 2]["profile"]
    assert prof["decode_steps"] >= OUT - 1 and prof["prefill_steps"] >= 1 and prof["schedule_s"] >= 0
  assert runs["hf", 1]["torch_threads"] == 1
  speed = {r["system"]: r for r in rows if r["bench"] == "serve_speedup"}
  assert set(speed) == {"engine", "http"} and set(speed["engine"]["throughput_ratio"]) == {"1", "2"}
  ratio = speed["engine"]["throughput_ratio"]["2"]
  want = runs["engine", 2]["output_tokens_per_s"] / runs["hf", 2]["output_tokens_per_s"]
  assert ratio == pytest.approx(want, rel=0.01)


def test_cli_preset_prints_json_lines(capsys):
  assert bench.main(["--preset=configs/lm.py:tiny,smoke", "--prompts=random", "--requests=2",
                     "--concurrency=2", "--prompt_len=8:16", "--output_len=4", "--systems=naive",
                     "--parity_requests=0", "--no_warmup"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["bench"], r["system"], r["concurrency"], r["output_tokens"]) for r in rows] == [
      ("serve", "naive", 2, 8)]
  assert bench.main(["--preset=configs/lm.py:tiny,smoke", "--prompts=random", "--requests=3",
                     "--concurrency=2", "--prompt_len=8", "--output_len=2:5", "--systems=naive",
                     "--parity_requests=0", "--no_warmup"]) == 0
  row = json.loads(capsys.readouterr().out)
  assert 3 * 2 <= row["output_tokens"] <= 3 * 5 and "out 2:5" in row["setup"]
  assert "configs/lm.py:tiny,smoke" in rows[0]["setup"] and "random 8-16" in rows[0]["setup"]


@pytest.mark.parametrize("args, message", [
    (["--checkpoint=/nonexistent/run"], "cannot load --checkpoint"),
    (["--preset=configs/lm.py:tiny,smoke", "--systems=engine,vllm"], "unknown ['vllm']"),
    (["--preset=configs/lm.py:tiny,smoke", "--prompt_len=50:10"], "LO:HI"),
    (["--preset=configs/lm.py:tiny,smoke", "--concurrency=0"], "must be ≥ 1"),
    (["--preset=configs/lm.py:tiny,smoke", "--output_len=9:3"], "LO:HI with LO ≤ HI"),
    (["--preset=configs/lm.py:tiny,smoke"], "needs a tokenizer"),
    (["--preset=configs/lm.py:tiny,smoke", "--prompts=random"], "exceeds the model's context (256)"),
    (["--preset=configs/lm.py:tiny,smoke", "--prompts=random", "--prompt_len=8", "--output_len=64",
      "--systems=http"],
     "needs a tokenizer"),
])
def test_cli_bad_input_is_one_error_line(args, message, capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(args)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err


def test_parity_reports_the_first_differing_token():
  class Fixed:
    def __init__(self, rows):
      self.rows = rows

    def run(self, prompts, output_lens, concurrency):
      return [bench.Trace(0.0, [1.0] * n, r) for r, n in zip(self.rows, output_lens)], 1.0

  out = bench.parity({"a": Fixed([[1, 2, 3], [4, 5, 6]]), "b": Fixed([[1, 2, 3], [4, 9, 6]])},
                     [[1], [1]], [3, 3])
  assert out["parity"] is False and out["first_mismatch"] == {"a": [None, None], "b": [None, 1]}
  assert out["reference"] == "a" and out["requests"] == 2
