"""Weight-only quantization report: parameter bytes and held-out bits per byte, full precision vs int8/int4.

    python -m serve.quant_report --checkpoint=runs/tiny --modes=none,int8,int4 --task=wikitext2 \
        [--limit=20] [--group_size=128] [--embeddings=true] [--compute_dtype=bfloat16] [--batch_size=16]

Prints one JSON object per mode: {"mode", "embeddings", "group_size", "compute_dtype", "param_bytes",
"bytes_ratio", "task", "documents", "tokens", "bits_per_byte", "perplexity", "delta_bpb", "seconds"}.
`bytes_ratio` and `delta_bpb` are relative to the first mode (put `none` first). Quantization itself is
`model/quantize.py` (applied at load, `load_model(path, quantize=...)`); this entry point lives in `serve/`
because scoring held-out text needs the tokenizer (`data/`) and the evaluation harness (`train/`).
The context is the run's training `seq_len` with disjoint windows, as `python -m train.evaluate`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from configs.loader import ConfigError, main_guard

MODES = ("none", "int8", "int4")


def quantization_report(checkpoint: str, *, modes: Sequence[str] = MODES, task: str = "wikitext2",
                        limit: int | None = None, group_size: int = 128, embeddings: bool = True,
                        compute_dtype: str | None = None, batch_size: int = 16) -> list[dict]:
  """One row per mode (see the module docstring); also printed as JSON lines as each finishes."""
  from data.tokenizer import tokenizer_from_meta
  from model.load import load_model
  from model.quantize import param_bytes, quantize_model
  from train.evaluate import evaluate, resolve
  from train.scoring import LanguageModel

  from model.config import DTYPES
  resolve(task)  # bad arguments fail before any loading.
  for mode in modes:
    if mode not in MODES:
      raise ConfigError(f"--modes: {mode!r} not in {MODES}")
  if compute_dtype and compute_dtype not in DTYPES:
    raise ConfigError(f"--compute_dtype={compute_dtype!r} not in {DTYPES}")
  rows: list[dict] = []
  for mode in modes:
    overrides = {"compute_dtype": compute_dtype} if compute_dtype else {}
    try:
      model, meta = load_model(checkpoint, **overrides)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f"--checkpoint={checkpoint}: {e}") from None
    if mode != "none":
      quantize_model(model, mode, group_size=group_size, embeddings=embeddings)
    trained = (meta.get("config", {}).get("data") or {}).get("seq_len")
    max_len = min(int(trained), model.cfg.max_seq_len) if trained else None
    lm = LanguageModel(model, tokenizer_from_meta(meta), batch_size=batch_size, max_len=max_len)
    start = time.time()
    metrics = evaluate(lm, [task], limit=limit)[task]
    row = dict(mode=mode, embeddings=embeddings, group_size=group_size if mode == "int4" else None,
               compute_dtype=model.cfg.compute_dtype, param_bytes=param_bytes(model), task=task,
               documents=metrics["documents"], tokens=metrics["tokens"],
               bits_per_byte=round(metrics["bits_per_byte"], 5), perplexity=round(metrics["perplexity"], 3),
               seconds=round(time.time() - start, 1))
    base = rows[0] if rows else row
    row["bytes_ratio"] = round(row["param_bytes"] / base["param_bytes"], 4)
    row["delta_bpb"] = round(row["bits_per_byte"] - base["bits_per_byte"], 5)
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def _bool(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m serve.quant_report", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint step directory")
  parser.add_argument("--modes", default="none,int8,int4", help=f"comma-separated, from {MODES}")
  parser.add_argument("--task", default="wikitext2", help="held-out task of train.evaluate "
                      "(wikitext2, wikitext2_valid, tinyshakespeare, heldout:<file>)")
  parser.add_argument("--limit", type=int, help="first N documents")
  parser.add_argument("--group_size", type=int, default=128, help="int4 input rows per scale")
  parser.add_argument("--embeddings", type=_bool, default=True, help="quantize the token embedding too")
  parser.add_argument("--compute_dtype", help="override the run's compute dtype (e.g. float32)")
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args(argv)

  def run() -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
      raise ConfigError("--modes is empty")
    if args.limit is not None and args.limit < 1:
      raise ConfigError(f"--limit={args.limit} must be ≥ 1")
    if args.group_size < 1:
      raise ConfigError(f"--group_size={args.group_size} must be ≥ 1")
    quantization_report(args.checkpoint, modes=modes, task=args.task, limit=args.limit,
                        group_size=args.group_size, embeddings=args.embeddings,
                        compute_dtype=args.compute_dtype, batch_size=args.batch_size)
    return 0

  return main_guard(run)


if __name__ == "__main__":
  sys.exit(main())
