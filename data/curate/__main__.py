"""`python -m data.curate`: raw WARC / JSONL / Parquet / text -> curated, deduplicated, tokenized shards.

  python -m data.curate --config=configs/curate.py:web_samples
  python -m data.curate --config.sources="web=/cc/*.warc.gz,wiki=/data/wiki/*.jsonl.zst" \
      --config.out=runs/curate/v1 --config.mix.epochs=wiki=3 [--runner=ray]

Rerunning with the same `out` resumes: finished input files are not redone. Prints one line at the
end; the details are in <out>/report.md and <out>/stats.json. Bad input files are counted and
skipped; bad options exit 2 with one line naming them.
"""
from __future__ import annotations

import logging
import sys

from configs.loader import ConfigError, main_guard, parse_args

DEFAULT_CONFIG = "configs/curate.py"


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

  def go() -> int:
    cfg, rest = parse_args(argv, DEFAULT_CONFIG)
    runner = ""
    for arg in rest:
      if arg.startswith("--runner="):
        runner = arg.split("=", 1)[1]
      else:
        raise ConfigError(f"unknown argument {arg!r} (options are --config=..., --config.<key>=..., "
                          f"--runner=local|ray)")
    from data.curate.runner import run
    run(cfg, runner=runner)
    return 0

  return main_guard(go)


if __name__ == "__main__":
  sys.exit(main())
