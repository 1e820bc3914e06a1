"""lm-evaluation-harness model class `jaxlm`: a checkpoint answering the harness's requests.

    python -m train.lm_eval --model jaxlm --model_args checkpoint=runs/tiny,batch_size=32 \\
        --tasks hellaswag --output_path out/

lm-eval 0.4.x only knows the model classes registered in its own process, so `train/lm_eval.py`
imports this module (which registers `jaxlm`) and then runs lm-eval's CLI. model_args: `checkpoint`
(run or step directory; required), `batch_size`, `max_len`, `rolling_stride`, `max_gen_toks`.
`--batch_size` on the command line is used when model_args has none. Every request type is
delegated to `train.scoring.LanguageModel`; see there for tokenization and truncation rules.
"""
from __future__ import annotations

from typing import Any

try:
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
except ImportError as e:  # the `eval` extra is optional.
  raise ImportError("lm-evaluation-harness is not installed: pip install -e '.[eval]'") from e

from configs.loader import ConfigError
from train.scoring import LanguageModel

_DEFAULT_BATCH = 16  # what `--batch_size auto` means here: JAX has no OOM probe to size it.


def _batch_size(value) -> int:
  if value is None or str(value).startswith("auto"):
    return _DEFAULT_BATCH
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"jaxlm: batch_size={value!r} is not an integer or 'auto'") from None


@register_model("jaxlm")
class JaxLM(LM):
  """`--model jaxlm --model_args checkpoint=<run dir>[,batch_size=N,max_len=N,rolling_stride=N]`."""

  def __init__(self, checkpoint: str | None = None, batch_size: Any = None, max_len: Any = None,
               rolling_stride: Any = None, max_gen_toks: Any = 256, *, lm: LanguageModel | None = None,
               device: str | None = None, max_batch_size: Any = None):
    # `device` and `max_batch_size` are lm-eval's torch-side arguments, passed to every model class;
    # JAX places the params itself.
    del device, max_batch_size
    super().__init__()
    if lm is None:
      if not checkpoint:
        raise ConfigError("jaxlm needs --model_args checkpoint=<run or step directory>")
      try:
        lm = LanguageModel.from_checkpoint(
            checkpoint, batch_size=_batch_size(batch_size),
            max_len=None if max_len is None else int(max_len),
            rolling_stride=None if rolling_stride is None else int(rolling_stride),
            max_gen_toks=int(max_gen_toks))
      except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"jaxlm: {e}") from None
    self.lm = lm

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "JaxLM":
    known = {"checkpoint", "batch_size", "max_len", "rolling_stride", "max_gen_toks"}
    unknown = sorted(set(arg_dict) - known)
    if unknown:
      raise ConfigError(f"jaxlm: unknown model_args {unknown}; known: {sorted(known)}")
    # lm-eval always passes its --batch_size (default 1) here; a batch_size in model_args wins.
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls(**{**extra, **arg_dict})

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "JaxLM":
    from lm_eval.utils import simple_parse_args_string
    return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    args = [req.args for req in requests]
    out = self.lm.loglikelihood(args)
    for a, r in zip(args, out):
      self.cache_hook.add_partial("loglikelihood", a, r)  # feeds `--use_cache`.
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    texts = [req.args[0] for req in requests]
    out = self.lm.loglikelihood_rolling(texts)
    for t, r in zip(texts, out):
      self.cache_hook.add_partial("loglikelihood_rolling", (t,), r)
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    args = [req.args for req in requests]
    out = self.lm.generate_until(args)
    for a, r in zip(args, out):
      self.cache_hook.add_partial("generate_until", a, r)
    return out
