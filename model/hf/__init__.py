"""Hugging Face interop: Llama-family checkpoints (Llama 2/3, Mistral, Qwen2, Qwen3) in and out.

    python -m model.hf import --src=<hf dir> --out=runs/llama-import [--tokenizer=PATH] [--param_dtype=bfloat16]
    python -m model.hf export --checkpoint=runs/tiny --out=hf/tiny [--dtype=bfloat16] [--max_shard_gb=5]

    model, hf_config = model.hf.load_hf("path/to/hf_dir", compute_dtype="float32")   # in memory

`import` writes a run directory (params-only checkpoint step 0 + meta with the tokenizer), which
`train.sample`, `train.evaluate`, the serving engine and fine-tuning read like any trained run. The
tokenizer comes from the source directory (`tokenizer.json`, else `tokenizer.model`) or `--tokenizer`.
`export` writes `config.json`, `generation_config.json`, safetensors (sharded past 5 GiB, with the
index) and the tokenizer file, loadable by `transformers.AutoModelForCausalLM.from_pretrained`.
Parity with `transformers` is tested per family in tests/test_hf.py (logits within 1e-4 in fp32).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
from flax import nnx

from model.config import ModelConfig
from model.hf import config as hf_config
from model.hf import weights
from model.load import load_model, make_meta, save_model, tokenizer_bytes_from_meta
from model.transformer import Transformer

__all__ = ["load_hf", "import_hf", "export_hf", "read_hf_config"]


def read_hf_config(src: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(src) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"no config.json in {src}")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON: {e}") from None


def _model_from_params(cfg: ModelConfig, params: dict) -> Transformer:
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
  return nnx.merge(graphdef, state)


def load_hf(src: str | pathlib.Path, **overrides) -> tuple[Transformer, dict]:
  """(model, config.json dict) of an HF checkpoint directory; `overrides` go to ModelConfig."""
  hf = read_hf_config(src)
  cfg = hf_config.from_hf(hf, **overrides)
  reader = weights.SafetensorsReader(src)
  try:
    params = weights.params_from_hf(reader, cfg)
  finally:
    reader.close()
  return _model_from_params(cfg, params), hf


def _special_ids(src: pathlib.Path, hf: dict) -> dict[str, Any]:
  special = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
  gen = src / "generation_config.json"
  if gen.is_file():  # Instruct models list their end-of-turn ids here (Llama 3: eos is a list).
    special.update({k: v for k, v in json.loads(gen.read_text()).items() if k in special and v is not None})
  return {k: v for k, v in special.items() if v is not None}


def _find_tokenizer(src: pathlib.Path, explicit: str | None) -> tuple[bytes, str]:
  candidates = [pathlib.Path(explicit)] if explicit else [src / "tokenizer.json", src / "tokenizer.model"]
  for path in candidates:
    if path.is_file():
      kind = "hf_tokenizers" if path.suffix == ".json" else "sentencepiece"
      return path.read_bytes(), kind
  if explicit:
    raise FileNotFoundError(f"tokenizer file not found: {explicit}")
  raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {src}; pass --tokenizer=PATH")


def import_hf(src: str | pathlib.Path, out: str | pathlib.Path, *, tokenizer: str | None = None,
              **overrides) -> pathlib.Path:
  """Converts an HF checkpoint directory into a run directory at `out`; returns the step directory."""
  src = pathlib.Path(src)
  tok_bytes, tok_kind = _find_tokenizer(src, tokenizer)  # before the (slow) weights: fail fast.
  model, hf = load_hf(src, **overrides)
  cfg = model.cfg
  meta = make_meta(dict(model=cfg.to_dict()), tok_bytes, cfg.vocab_size, tokenizer_kind=tok_kind,
                   tokenizer_special=_special_ids(src, hf),
                   source=dict(format="huggingface", path=str(src.absolute()), model_type=hf["model_type"]))
  return save_model(out, model, meta)


def export_hf(checkpoint: str | pathlib.Path, out: str | pathlib.Path, *, dtype: str = "float32",
              max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
  """Writes a run's latest (or given step's) model as an HF checkpoint directory at `out`."""
  out = pathlib.Path(out)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} exists and is not empty; choose a new output directory")
  model, meta = load_model(checkpoint)
  cfg = model.cfg
  special = dict(meta.get("tokenizer_special") or {})
  if meta.get("tokenizer_kind", "sentencepiece") == "sentencepiece" and not special:
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # data/tokenizer.py's layout.
  hf = hf_config.to_hf(cfg, dtype=dtype, **{k: special.get(k) for k in
                                            ("bos_token_id", "eos_token_id", "pad_token_id")})
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params = jax.tree.map(np.asarray, params)
  out.mkdir(parents=True, exist_ok=True)
  weights.write_safetensors(weights.params_to_hf(params, cfg, dtype=dtype), out,
                            max_shard_bytes=max_shard_bytes)
  (out / "config.json").write_text(json.dumps(hf, indent=2))
  gen = {k: special[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in special}
  (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
  (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(meta), indent=2))
  name = "tokenizer.json" if meta.get("tokenizer_kind") == "hf_tokenizers" else "tokenizer.model"
  (out / name).write_bytes(tokenizer_bytes_from_meta(meta))
  return out


def _tokenizer_config(meta: dict) -> dict[str, Any]:
  if meta.get("tokenizer_kind") == "hf_tokenizers":
    return dict(tokenizer_class="PreTrainedTokenizerFast")
  # The project's SentencePiece model (data/tokenizer.py) has no dummy prefix and identity
  # normalization; transformers' LlamaTokenizer reproduces its ids exactly with add_prefix_space=false
  # and legacy=false (tested on Tiny Shakespeare), and adds <s> like our sampler and evaluator do.
  return dict(tokenizer_class="LlamaTokenizer", add_prefix_space=False, legacy=False, add_bos_token=True,
              add_eos_token=False, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
