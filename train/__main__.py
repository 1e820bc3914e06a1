"""`python -m train [--config=configs/lm.py:tiny] [--config.key=value ...]`: pretrain a language model.

With no arguments, trains the tiny preset on the embedded Python-stdlib corpus on CPU (~10 min on
2 cores) and writes runs/tiny/{config.json,metrics.jsonl,tensorboard/,checkpoints/,report.md,loss.png}.
"""
import sys

from train.config import main_guard, parse_args


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if any(a in ("-h", "--help") for a in argv):
    print(__doc__)
    return 0

  def go():
    cfg, rest = parse_args(argv)
    if rest:
      from train.config import ConfigError
      raise ConfigError(f"unknown arguments: {' '.join(rest)} (config keys are --config.section.key=value)")
    from train import distributed
    distributed.initialize(cfg.get("dist"))  # before anything touches a device; no-op for one process.
    from train.loop import run
    run(cfg)
    return 0

  return main_guard(go)


if __name__ == "__main__":
  sys.exit(main())
