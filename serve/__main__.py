"""Serve a checkpoint over an OpenAI-compatible HTTP API, with a chat page at /.

    python -m serve --checkpoint=runs/tiny-sft [--host=127.0.0.1] [--port=8000] [--api_key=KEY]
        [--max_slots=8] [--block_size=16] [--max_queue=64] [--model_name=NAME] [--quantize=int8|int4]
        [--draft=runs/tiny-draft] [--spec_k=4]

`--checkpoint` is a run directory (latest step) or one step directory; the tokenizer travels in it.
Binds 127.0.0.1 unless `--host` says otherwise (`--host=0.0.0.0` exposes it: set an API key). The key
comes from `--api_key` or the environment variable JAXLM_API_KEY; when set, /v1/* needs the header
`Authorization: Bearer <key>`. Ctrl-C stops admitting requests and finishes the running ones first.
`--quantize` stores the matmul weights as int8 (per channel) or int4 (groups of 128), `model/quantize.py`.
`--draft` (a smaller model trained with the same tokenizer, loaded like the checkpoint) turns on speculative
decoding with `--spec_k` draft tokens per round (`serve/engine.py`); its vocabulary must match.
A missing or unreadable checkpoint is `error: ...` on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Sequence

from configs.loader import ConfigError, main_guard


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="run directory or checkpoint step directory")
  p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' (env JAXLM_API_KEY)")
  p.add_argument("--max_slots", type=int, default=8, help="sequences decoded together")
  p.add_argument("--block_size", type=int, default=16, help="tokens per KV-cache block")
  p.add_argument("--max_queue", type=int, default=64,
                 help="requests waiting for a slot beyond max_slots; more get HTTP 429")
  p.add_argument("--model_name", default=None, help="the model id clients send (default: run name)")
  p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                 help="weight-only quantization applied at load (model/quantize.py)")
  p.add_argument("--draft", default=None, help="draft checkpoint for speculative decoding")
  p.add_argument("--spec_k", type=int, default=4, help="tokens the draft proposes per round")
  p.add_argument("--drain_timeout", type=float, default=60.0,
                 help="seconds to let running requests finish at shutdown before aborting them")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)

  def go() -> int:
    for name in ("max_slots", "block_size", "spec_k"):
      if getattr(args, name) < 1:
        raise ConfigError(f"--{name} must be ≥ 1, got {getattr(args, name)}")
    if args.max_queue < 0:
      raise ConfigError(f"--max_queue must be ≥ 0, got {args.max_queue}")
    if not 0 <= args.port < 65536:
      raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    import uvicorn  # pylint: disable=g-import-not-at-top

    from serve.async_engine import AsyncEngine  # pylint: disable=g-import-not-at-top
    from serve.engine import Engine  # pylint: disable=g-import-not-at-top
    from serve.server import create_app  # pylint: disable=g-import-not-at-top
    from train.sample import load_for_inference  # pylint: disable=g-import-not-at-top
    try:
      model, tokenizer, _ = load_for_inference(args.checkpoint, quantize=args.quantize)
    except (FileNotFoundError, ValueError, OSError) as e:
      raise ConfigError(f"cannot load --checkpoint={args.checkpoint}: {e}") from None
    draft = None
    if args.draft is not None:
      try:
        draft, draft_tokenizer, _ = load_for_inference(args.draft, quantize=args.quantize)
      except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"cannot load --draft={args.draft}: {e}") from None
      if draft.cfg.vocab_size != model.cfg.vocab_size:
        raise ConfigError(f"--draft={args.draft} has a vocabulary of {draft.cfg.vocab_size} tokens, the "
                          f"checkpoint {model.cfg.vocab_size}: the draft needs the checkpoint's tokenizer")
      # Same size, other ids: every draft token would be rejected.
      if getattr(draft_tokenizer, "sha256", None) != getattr(tokenizer, "sha256", None):
        raise ConfigError(f"--draft={args.draft} was trained with another tokenizer than --checkpoint")
    path = pathlib.Path(args.checkpoint).resolve()
    name = args.model_name or (path.parents[1].name if path.parent.name == "checkpoints" else path.name)
    try:
      engine = Engine(model, eos_id=tokenizer.eos_id, block_size=args.block_size, max_slots=args.max_slots,
                      draft=draft, spec_k=args.spec_k)
    except ValueError as e:  # e.g. a draft with a shorter context.
      raise ConfigError(str(e)) from None
    driver = AsyncEngine(engine, max_queue=args.max_queue, max_slots=args.max_slots)
    api_key = args.api_key or os.environ.get("JAXLM_API_KEY") or None
    app = create_app(driver, tokenizer, model_name=name, context_len=model.cfg.max_seq_len,
                     api_key=api_key, drain_timeout_s=args.drain_timeout)
    print(f"serving {name} from {args.checkpoint} on http://{args.host}:{args.port} "
          f"(chat page at /, API at /v1{', API key required' if api_key else ''})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=args.drain_timeout)
    return 0

  return main_guard(go)


if __name__ == "__main__":
  sys.exit(main())
