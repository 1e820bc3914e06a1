"""Hugging Face `config.json` ↔ `ModelConfig` for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3).

Library module; `python -m model.hf` is the CLI. Each family is the same pre-norm RMSNorm + RoPE +
SwiGLU decoder; they differ only in switches this project's config already has:

| HF field                                  | ModelConfig                        |
|-------------------------------------------|------------------------------------|
| attention_bias + mlp_bias (llama)         | use_bias                           |
| q/k/v biases, none on o_proj (qwen2)      | qkv_bias                           |
| per-head RMSNorm on q and k (qwen3)       | qk_norm                            |
| sliding_window (mistral; qwen with        | sliding_window (all layers)        |
|   use_sliding_window)                     |                                    |
| rope_parameters / rope_scaling            | rope_theta, rope_scaling (linear,  |
|   (transformers 5 / 4 spellings)          |   llama3, yarn), rope_factor, ...  |

Anything that does not map exactly (another activation, per-layer sliding windows, YaRN with a custom
attention factor, ...) is refused with a message naming the field, rather than imported approximately.
"""
from __future__ import annotations

from typing import Any

from model.config import ModelConfig

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM"}


class HFConfigError(ValueError):
  """A config.json this project can't represent exactly (or can't export to)."""


def _rope(hf: dict) -> dict[str, Any]:
  # transformers 5 writes `rope_parameters` (theta inside); 4.x checkpoints (most of the Hub) write
  # `rope_theta` beside an optional `rope_scaling` dict whose kind is `rope_type` (or older `type`).
  params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  out: dict[str, Any] = dict(rope_theta=theta)
  if kind == "default":
    return out
  factor = float(params["factor"])
  if kind == "linear":
    return dict(out, rope_scaling="linear", rope_factor=factor)
  if kind == "llama3":
    return dict(out, rope_scaling="llama3", rope_factor=factor,
                rope_original_max_len=int(params["original_max_position_embeddings"]),
                rope_low_freq_factor=float(params["low_freq_factor"]),
                rope_high_freq_factor=float(params["high_freq_factor"]))
  if kind == "yarn":
    custom = {k: params[k] for k in ("attention_factor", "mscale", "mscale_all_dim")
              if params.get(k) is not None}
    if custom:
      raise HFConfigError(f"config.json: yarn {custom} is not supported (only the default "
                          "0.1·ln(factor)+1 attention scale)")
    if params.get("truncate", True) is not True:
      raise HFConfigError("config.json: yarn truncate=false is not supported")
    original = params.get("original_max_position_embeddings") or hf["max_position_embeddings"]
    return dict(out, rope_scaling="yarn", rope_factor=factor, rope_original_max_len=int(original),
                yarn_beta_fast=float(params.get("beta_fast", 32.0)),
                yarn_beta_slow=float(params.get("beta_slow", 1.0)))
  raise HFConfigError(f"config.json: rope type {kind!r} is not supported (default, linear, llama3, yarn)")


def _check_partial_rotary(hf: dict) -> None:
  params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise HFConfigError(f"config.json: partial_rotary_factor={partial} is not supported (RoPE on all dims)")


def _sliding_window(hf: dict, family: str) -> int:
  window = hf.get("sliding_window") or 0
  if family == "mistral":
    return int(window)
  if family in ("qwen2", "qwen3"):
    layer_types = hf.get("layer_types")
    if layer_types is not None:
      kinds = set(layer_types)
      if kinds == {"full_attention"}:
        return 0
      if kinds == {"sliding_attention"}:
        return int(window)
      raise HFConfigError(f"config.json: layer_types mixes {sorted(kinds)}; a sliding window on only "
                          "some layers is not supported")
    if not hf.get("use_sliding_window", False) or not window:
      return 0
    # transformers: layer i slides iff i >= max_window_layers.
    first_sliding = int(hf.get("max_window_layers", 0))
    if first_sliding >= int(hf["num_hidden_layers"]):
      return 0
    if first_sliding > 0:
      raise HFConfigError(f"config.json: max_window_layers={first_sliding} puts a sliding window on "
                          "only some layers; not supported")
    return int(window)
  return 0


def from_hf(hf: dict, **overrides) -> ModelConfig:
  """ModelConfig of a Hugging Face config.json dict; `overrides` (e.g. compute_dtype) win."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise HFConfigError(f"config.json: model_type={family!r} is not supported; supported: {FAMILIES}")
  _check_partial_rotary(hf)
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise HFConfigError(f"config.json: hidden_act={act!r} is not supported (SwiGLU uses silu)")
  d, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
  if family == "qwen2":
    use_bias, qkv_bias = False, True  # Qwen2Attention: q/k/v_proj bias=True, o_proj bias=False.
  elif attn_bias != mlp_bias:
    raise HFConfigError(f"config.json: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not "
                        "supported (both or neither)")
  else:
    use_bias, qkv_bias = attn_bias, False
  kw = dict(
      vocab_size=int(hf["vocab_size"]), d_model=d, n_layers=int(hf["num_hidden_layers"]), n_heads=n,
      n_kv_heads=int(hf.get("num_key_value_heads") or n),
      head_dim=int(hf.get("head_dim") or d // n), d_ff=int(hf["intermediate_size"]),
      activation="swiglu", norm="rmsnorm", norm_placement="pre", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      use_bias=use_bias, qkv_bias=qkv_bias, qk_norm=family == "qwen3", positions="rope",
      max_seq_len=int(hf.get("max_position_embeddings", 2048)),
      sliding_window=_sliding_window(hf, family),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # every family's default is False.
      init_std=float(hf.get("initializer_range", 0.02)), scan_layers=True,
      **_rope(hf))
  kw.update(overrides)
  return ModelConfig(**kw)


def family_of(cfg: ModelConfig) -> str:
  """The HF family that represents `cfg` exactly, or HFConfigError naming what doesn't map."""
  bad = [f"{name}={getattr(cfg, name)!r} (needs {want!r})" for name, want in
         (("activation", "swiglu"), ("norm", "rmsnorm"), ("norm_placement", "pre"), ("positions", "rope"),
          ("mup_base_width", 0), ("dropout", 0.0), ("n_experts", 0))
         if getattr(cfg, name) != want]
  if bad:
    raise HFConfigError("cannot export to a Llama-family checkpoint: " + ", ".join(bad))
  if cfg.qk_norm:
    if cfg.use_bias or cfg.qkv_bias:
      raise HFConfigError("cannot export: qk_norm (Qwen3) together with biases has no HF family")
    return "qwen3"
  if cfg.qkv_bias and not cfg.use_bias:
    return "qwen2"
  if cfg.sliding_window:
    if cfg.use_bias:
      raise HFConfigError("cannot export: a sliding window together with biases has no HF family")
    return "mistral"
  return "llama"


def to_hf(cfg: ModelConfig, *, dtype: str = "float32", bos_token_id: int | None = None,
          eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> dict[str, Any]:
  """config.json dict for `cfg` in the family `family_of` picks (rope in transformers 5 `rope_parameters`
  form plus the 4.x `rope_theta`/`rope_scaling` keys, so both library generations read it)."""
  family = family_of(cfg)
  rope: dict[str, Any] = dict(rope_type="default", rope_theta=cfg.rope_theta)
  if cfg.rope_scaling == "linear":
    rope.update(rope_type="linear", factor=cfg.rope_factor)
  elif cfg.rope_scaling == "llama3":
    rope.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  elif cfg.rope_scaling == "yarn":
    rope.update(rope_type="yarn", factor=cfg.rope_factor, beta_fast=cfg.yarn_beta_fast,
                beta_slow=cfg.yarn_beta_slow, original_max_position_embeddings=cfg.rope_original_max_len)
  scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_scaling != "none" else None
  hf: dict[str, Any] = dict(
      architectures=[_ARCH[family]], model_type=family, vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.ff, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.hd,
      hidden_act="silu", max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std,
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope,
      rope_theta=cfg.rope_theta, rope_scaling=scaling, attention_dropout=0.0, use_cache=True,
      bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
      torch_dtype=dtype, dtype=dtype)
  if family == "llama":
    hf.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
  elif family == "mistral":
    hf.update(sliding_window=cfg.sliding_window)
  else:
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if family == "qwen3":
      hf.update(attention_bias=False)
  return hf
