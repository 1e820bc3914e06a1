"""CLI: `python -m model.hf import|export ...` (see `model/hf/__init__.py` for what each writes).

    python -m model.hf import --src=path/to/Llama-3.2-1B --out=runs/llama3-1b [--tokenizer=PATH]
        [--param_dtype=float32|bfloat16] [--compute_dtype=bfloat16|float32] [--max_seq_len=N]
    python -m model.hf export --checkpoint=runs/tiny --out=hf/tiny [--dtype=float32|bfloat16|float16]
        [--max_shard_gb=5]
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from model.config import DTYPES


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m model.hf", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  imp = sub.add_parser("import", help="Hugging Face checkpoint dir → run directory")
  imp.add_argument("--src", required=True, help="directory with config.json and *.safetensors")
  imp.add_argument("--out", required=True, help="run directory to create")
  imp.add_argument("--tokenizer", help="tokenizer.json / *.model to use instead of the one in --src")
  imp.add_argument("--param_dtype", choices=DTYPES, default="float32")
  imp.add_argument("--compute_dtype", choices=DTYPES, default="bfloat16")
  imp.add_argument("--max_seq_len", type=int, help="override max_position_embeddings (context to use)")
  exp = sub.add_parser("export", help="run directory → Hugging Face checkpoint dir")
  exp.add_argument("--checkpoint", required=True, help="run directory or checkpoint step directory")
  exp.add_argument("--out", required=True, help="directory to create")
  exp.add_argument("--dtype", choices=DTYPES, default="float32")
  exp.add_argument("--max_shard_gb", type=float, default=5.0)
  args = parser.parse_args(argv)

  import model.hf as hf  # pylint: disable=g-import-not-at-top  (after argparse: --help stays fast)
  try:
    if args.cmd == "import":
      overrides = dict(param_dtype=args.param_dtype, compute_dtype=args.compute_dtype)
      if args.max_seq_len:
        overrides["max_seq_len"] = args.max_seq_len
      step_dir = hf.import_hf(args.src, args.out, tokenizer=args.tokenizer, **overrides)
      print(f"imported {args.src} → {step_dir}")
    else:
      out = hf.export_hf(args.checkpoint, args.out, dtype=args.dtype,
                         max_shard_bytes=int(args.max_shard_gb * 2**30))
      print(f"exported {args.checkpoint} → {out}")
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
