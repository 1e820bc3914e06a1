"""Evaluation harness: held-out perplexity / bits per byte, multiple choice, GSM8K, HumanEval pass@k.

    python -m train.evaluate --checkpoint=runs/tiny --tasks=wikitext2,gsm8k,humaneval [--limit=100]
        [--out=eval.json] [--batch_size=16] [--max_len=N] [--gsm8k_shots=8] [--humaneval_samples=1]
    python -m train.evaluate --checkpoint=runs/tiny --tasks=mc:path/to/questions.jsonl,heldout:notes.txt

Tasks (registered names; task data and answer checkers live in `data/tasks/`, shared with alignment):
- `wikitext2` (test; `wikitext2_valid`, `tinyshakespeare` too) or `heldout:<file>`: per-article rolling
  log-likelihood → loss (nats/token), perplexity, bits per byte = −Σ log p / (ln 2 · UTF-8 bytes). BPB is
  tokenizer-independent, so models with different vocabularies compare; the WikiText-2 files here are the
  tokenized release, so BPB is not comparable with figures on the raw text.
- `mc:<jsonl>`: the generic multiple-choice format (`data/tasks/multiple_choice.py`), scored by
  log-likelihood of each choice given the context: `acc` (raw sum) and `acc_norm` (divided by the
  choice's length in bytes, lm-eval's acc_norm).
- `gsm8k`: k-shot prompts from the train split, greedy generation until the next "Question:", exact match
  of the extracted final number (`data.tasks.gsm8k.is_correct`).
- `humaneval`: n samples per problem (greedy when n == 1), cut at the Codex stop sequences, each run
  against the problem's tests in the sandbox (`data/tasks/sandbox.py`), pass@k by the unbiased estimator.

Results: one JSON (per-task metrics, settings, checkpoint, commit) at `--out` (default
`<run>/eval/step_<step>.json`) and a table on stdout. `evaluate(lm, tasks, ...)` is the function the
training loop calls at intervals (`--config.eval.tasks=wikitext2 --config.eval.every=200`).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

from configs.loader import ConfigError, main_guard
from train.scoring import LanguageModel


def _heldout(lm: LanguageModel, source: str, *, limit: int | None, **_) -> dict[str, Any]:
  from data.tasks import heldout
  docs = [d for d in heldout.documents(heldout.load_text(source)) if d.strip()]
  docs = docs[:limit] if limit else docs
  scored = lm.rolling_tokens(docs)
  logp = sum(lp for lp, _ in scored)
  tokens = sum(n for _, n in scored)
  nbytes = sum(len(d.encode("utf-8")) for d in docs)
  loss = -logp / max(tokens, 1)
  return dict(documents=len(docs), tokens=tokens, bytes=nbytes, loss=loss, perplexity=math.exp(loss),
              bits_per_byte=-logp / math.log(2) / max(nbytes, 1))


def _multiple_choice(lm: LanguageModel, path: str, *, limit: int | None, **_) -> dict[str, Any]:
  from data.tasks import multiple_choice
  examples = multiple_choice.load_jsonl(path, limit=limit)
  requests = [(ex.context, choice) for ex in examples for choice in ex.choices]
  scores = iter(lm.loglikelihood(requests))
  correct = correct_norm = 0
  for ex in examples:
    lls = [next(scores)[0] for _ in ex.choices]
    norm = [ll / max(len(c.encode("utf-8")), 1) for ll, c in zip(lls, ex.choices)]
    correct += max(range(len(lls)), key=lls.__getitem__) == ex.gold
    correct_norm += max(range(len(norm)), key=norm.__getitem__) == ex.gold
  n = max(len(examples), 1)
  return dict(examples=len(examples), acc=correct / n, acc_norm=correct_norm / n)


def _gen_kw(**kw) -> dict[str, Any]:
  """Generation kwargs; no max_gen_toks → the LanguageModel's default (min(256, max_len // 2))."""
  return {k: v for k, v in kw.items() if not (k == "max_gen_toks" and not v)}


def _gsm8k(lm: LanguageModel, _: str, *, limit: int | None, gsm8k_shots: int = 8,
           max_gen_toks: int | None = None, **__) -> dict[str, Any]:
  from data.tasks import gsm8k
  problems = gsm8k.load("test", limit=limit)
  shots = gsm8k.default_shots(gsm8k_shots) if gsm8k_shots else []
  kw = _gen_kw(until=list(gsm8k.STOP), max_gen_toks=max_gen_toks, temperature=0.0)
  outs = lm.generate_until([(gsm8k.fewshot_prompt(p["question"], shots), kw) for p in problems])
  hits = [gsm8k.is_correct(o, p["target"]) for o, p in zip(outs, problems)]
  return dict(examples=len(problems), shots=len(shots), exact_match=sum(hits) / max(len(hits), 1),
              samples=[dict(target=p["target"], completion=o, correct=h)
                       for p, o, h in list(zip(problems, outs, hits))[:5]])


def _humaneval(lm: LanguageModel, _: str, *, limit: int | None, humaneval_samples: int = 1,
               temperature: float = 0.8, max_gen_toks: int | None = None, timeout_s: float = 10.0,
               seed: int = 0, **__) -> dict[str, Any]:
  from data.tasks import humaneval
  problems = humaneval.load(limit=limit)
  n = int(humaneval_samples)
  kw = _gen_kw(until=list(humaneval.STOP), max_gen_toks=max_gen_toks,
            temperature=0.0 if n == 1 else temperature)
  requests = [(p["prompt"], dict(kw, seed=seed + s)) for p in problems for s in range(n)]
  completions = [humaneval.truncate(c) for c in lm.generate_until(requests)]
  results = humaneval.check_many([p for p in problems for _ in range(n)], completions, timeout_s=timeout_s)
  passed = [sum(r.passed for r in results[i * n:(i + 1) * n]) for i in range(len(problems))]
  out: dict[str, Any] = dict(problems=len(problems), samples_per_problem=n)
  for k in (1, 10, 100):
    if k <= n:
      out[f"pass@{k}"] = sum(humaneval.pass_at_k(n, c, k) for c in passed) / max(len(problems), 1)
  statuses: dict[str, int] = {}
  for r in results:
    statuses[r.status] = statuses.get(r.status, 0) + 1
  out["statuses"] = statuses
  out["isolation"] = results[0].isolation if results else ""
  return out


# name → (function, argument). `prefix:arg` names take the argument from the task string.
TASKS: dict[str, tuple[Callable[..., dict], str]] = {
    "wikitext2": (_heldout, "wikitext2_test"),
    "wikitext2_valid": (_heldout, "wikitext2_valid"),
    "tinyshakespeare": (_heldout, "tinyshakespeare"),
    "gsm8k": (_gsm8k, ""),
    "humaneval": (_humaneval, ""),
}
PREFIXES: dict[str, Callable[..., dict]] = {"heldout": _heldout, "mc": _multiple_choice}


def resolve(task: str) -> tuple[Callable[..., dict], str]:
  if task in TASKS:
    return TASKS[task]
  prefix, sep, arg = task.partition(":")
  if sep and prefix in PREFIXES and arg:
    return PREFIXES[prefix], arg
  raise ConfigError(f"unknown task {task!r}; known: {sorted(TASKS)} or "
                    f"{[p + ':<path>' for p in PREFIXES]}")


def evaluate(lm: LanguageModel, tasks: Sequence[str], *, limit: int | None = None,
             **options) -> dict[str, dict[str, Any]]:
  """{task: metrics} for each task name; `options` (gsm8k_shots, humaneval_samples, ...) go to tasks."""
  fns = [(t, *resolve(t)) for t in tasks]  # every name checked before any work.
  results = {}
  for task, fn, arg in fns:
    start = time.time()
    results[task] = dict(fn(lm, arg, limit=limit, **options), seconds=round(time.time() - start, 2))
  return results


HEADLINE = ("bits_per_byte", "perplexity", "acc", "acc_norm", "exact_match", "pass@1", "pass@10")


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
  """{"eval/<task>/<metric>": value} of the headline numbers, for metrics.jsonl rows."""
  return {f"eval/{t}/{k}": float(v) for t, m in results.items() for k, v in m.items() if k in HEADLINE}


def format_table(results: dict[str, dict[str, Any]]) -> str:
  rows = [("task", "metric", "value", "n")]
  for task, m in results.items():
    n = m.get("examples", m.get("problems", m.get("documents", "")))
    for k in HEADLINE:
      if k in m:
        rows.append((task, k, f"{m[k]:.4f}", str(n)))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint step directory")
  parser.add_argument("--tasks", required=True, help="comma-separated task names (see module docstring)")
  parser.add_argument("--limit", type=int, help="first N examples / documents / problems of each task")
  parser.add_argument("--out", help="results JSON (default <run>/eval/step_<step>.json)")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--max_len", type=int, help="context for scoring (default: the run's training seq_len)")
  parser.add_argument("--gsm8k_shots", type=int, default=8)
  parser.add_argument("--humaneval_samples", type=int, default=1, help="n samples per problem (pass@k ≤ n)")
  parser.add_argument("--temperature", type=float, default=0.8, help="HumanEval sampling when n > 1")
  parser.add_argument("--max_gen_toks", type=int, help="new tokens per answer (default min(256, max_len / 2))")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  def run() -> int:
    from model.load import find_step_dir
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
      raise ConfigError("--tasks is empty")
    for t in tasks:
      resolve(t)
    if args.limit is not None and args.limit < 1:
      raise ConfigError(f"--limit={args.limit} must be ≥ 1")
    try:
      step_dir = find_step_dir(args.checkpoint)
      lm = LanguageModel.from_checkpoint(step_dir, batch_size=args.batch_size, max_len=args.max_len)
    except (FileNotFoundError, ValueError) as e:  # missing/corrupt checkpoint, tokenizer/model mismatch.
      raise ConfigError(f"--checkpoint={args.checkpoint}: {e}") from None
    results = evaluate(lm, tasks, limit=args.limit, gsm8k_shots=args.gsm8k_shots,
                       humaneval_samples=args.humaneval_samples, temperature=args.temperature,
                       max_gen_toks=args.max_gen_toks, seed=args.seed)
    from train.loop import provenance
    record = dict(checkpoint=str(step_dir), step=int(step_dir.name), tasks=results,
                  settings=dict(vars(args)), provenance=provenance())
    out = pathlib.Path(args.out) if args.out else step_dir.parents[1] / "eval" / f"step_{step_dir.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(format_table(results))
    print(f"wrote {out}", file=sys.stderr)
    return 0

  return main_guard(run)


if __name__ == "__main__":
  sys.exit(main())
