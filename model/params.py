"""Closed-form parameter counts of `Transformer`, used by presets' docs, FLOPs and tests.

`non_embedding` excludes the input embedding table and learned position table but includes the
output head — the params that take part in matmuls (Kaplan et al. 2020's N, plus the head), which is
what 6N of PaLM's MFU formula counts. With tied embeddings the shared table is counted once, as the head.
A mixture-of-experts layer counts all its experts (plus router, selection bias, shared experts);
`active_params` is the non-embedding count with only k of the E experts per MoE layer (what a token uses).
"""
from __future__ import annotations

import math

import jax
from flax import nnx

from model.config import ModelConfig


def count_params(cfg: ModelConfig) -> dict[str, int]:
  d, h, n, k, f, v = cfg.d_model, cfg.hd, cfg.n_heads, cfg.n_kv_heads, cfg.ff, cfg.vocab_size
  norm = d * (2 if cfg.norm == "layernorm" else 1)
  attn = d * n * h + 2 * d * k * h + n * h * d
  if cfg.use_bias or cfg.qkv_bias:
    attn += n * h + 2 * k * h
  if cfg.use_bias:
    attn += d
  if cfg.qk_norm:
    attn += 2 * h * (2 if cfg.norm == "layernorm" else 1)
  mlp = (3 if cfg.gated else 2) * d * f
  if cfg.use_bias:
    mlp += (2 * f if cfg.gated else f) + d
  layer = attn + mlp + 2 * norm
  n_moe = cfg.n_moe_layers
  moe_layer = attn + 2 * norm + _moe_ffn_params(cfg, cfg.n_experts)
  embed = v * d
  pos = cfg.max_seq_len * d if cfg.positions == "learned" else 0
  head = 0 if cfg.tie_embeddings else d * v
  total = embed + pos + (cfg.n_layers - n_moe) * layer + n_moe * moe_layer + norm + head
  non_embedding = total - embed - pos + (embed if cfg.tie_embeddings else 0)
  return dict(total=total, embedding=embed + pos, non_embedding=non_embedding,
              per_layer=moe_layer if n_moe == cfg.n_layers else layer)


def _moe_ffn_params(cfg: ModelConfig, experts: int) -> int:
  """Router [d, E] (+ sigmoid selection bias [E]) + `experts` expert MLPs + the shared-expert MLP."""
  d, f, m = cfg.d_model, cfg.moe_ff, (3 if cfg.gated else 2)
  router = d * cfg.n_experts + (cfg.n_experts if cfg.moe_router == "sigmoid" else 0)
  return router + experts * m * d * f + cfg.n_shared_experts * m * d * f


def active_params(cfg: ModelConfig) -> int:
  """Non-embedding params one token uses: MoE layers count k experts (+ shared), not all E."""
  inactive = cfg.n_moe_layers * (_moe_ffn_params(cfg, cfg.n_experts)
                                 - _moe_ffn_params(cfg, cfg.experts_per_token))
  return count_params(cfg)["non_embedding"] - inactive


def count_model_params(cfg: ModelConfig) -> int:
  """Counts params of the real module via eval_shape (no memory is allocated), for checking the formula."""
  from model.transformer import Transformer
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  return sum(math.prod(x.shape) for x in leaves)
