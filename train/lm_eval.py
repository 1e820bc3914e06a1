"""`python -m train.lm_eval <lm-eval CLI args>`: lm-evaluation-harness with this project's models.

    python -m train.lm_eval --model jaxlm --model_args checkpoint=runs/tiny,batch_size=32 \\
        --tasks arc_easy,wikitext --output_path out/
    python -m train.lm_eval --model jaxlm --model_args checkpoint=runs/tiny \\
        --tasks my_task --include_path my_tasks/ --limit 8     # local task YAMLs

lm-eval 0.4.x does not discover external model classes, so this entry point imports
`train.lm_eval_adapter` (registering `jaxlm`) and hands the command line to lm-eval's own CLI; every
lm-eval flag works as documented. Needs the `eval` extra: pip install -e '.[eval]'.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Sequence

from configs.loader import main_guard


def main(argv: Sequence[str] | None = None) -> int:
  if importlib.util.find_spec("lm_eval") is None:
    print("error: lm-evaluation-harness is not installed: pip install -e '.[eval]'", file=sys.stderr)
    return 2

  def go():
    import train.lm_eval_adapter  # noqa: F401  (registers --model jaxlm)
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:  # lm-eval's CLI reads sys.argv itself.
      sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0

  return main_guard(go)


if __name__ == "__main__":
  sys.exit(main())
