"""Multi-head attention (MHA/GQA/MQA) with one kernel interface chosen by registered name.

A kernel is `fn(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window,
bias) -> out` with q [B, T, N, H], k/v [B, S, K, H] (N % K == 0, K/V never repeated in memory), int32
positions [B, T] / [B, S], optional segment ids of the same shapes and an optional additive fp32 bias
[B, N, T, S] (ALiBi). A kernel gets the mask's ingredients, not a [B, 1, T, S] mask, so a flash kernel never
materializes T×S; `make_mask` below is the rule every kernel implements. Picked with `model.attention=`:
  xla     the reference: `make_mask` + `jax.nn.dot_product_attention(implementation="xla")`, fp32 softmax;
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only; bf16/fp16, head_dim <= 128);
  pallas  the flash kernels of `model/kernels/` (Triton on GPU, Mosaic on TPU, Triton-interpret on CPU);
          no additive bias (ALiBi is xla/cudnn only: ModelConfig rejects pallas + alibi);
  auto    cudnn on GPU where it supports the case, else pallas; pallas on TPU; xla on CPU or with a bias.

The mask is built from positions and segment ids, not from array indices, so the same code serves
packed training rows (segment ids isolate documents, positions restart at 0) and KV-cache decoding
(the cache slot of a token is its position). The cache is dense (`dict(k, v)`, slot = position) or paged
(`dict(k_pages, v_pages, block_tables)`, see `model/layers/paged.py`; the serving engine's).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model.axes import constrain, param
from model.config import ModelConfig
from model.layers import paged
from model.layers.norm import Norm
from model.layers.positions import alibi_bias, alibi_slopes, apply_rope
from model.quantize import weight

AttentionFn = Callable[..., jax.Array]
ATTENTION: dict[str, AttentionFn] = {}


def register_attention(name: str):
  def deco(fn: AttentionFn) -> AttentionFn:
    ATTENTION[name] = fn
    return fn
  return deco


def get_attention(name: str) -> AttentionFn:
  if name not in ATTENTION:
    raise ValueError(f"model.attention={name!r} is not registered; known: {sorted(ATTENTION)}")
  return ATTENTION[name]


@register_attention("xla")
def xla_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                  sliding_window: int = 0, bias=None):
  mask = make_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window=sliding_window)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="xla")


def _cudnn_supports(q) -> bool:
  # cuDNN's fused attention (9.x) takes fp16/bf16 only and head_dim <= 128 in multiples of 8.
  return q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0


@register_attention("cudnn")
def cudnn_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                    sliding_window: int = 0, bias=None):
  if jax.default_backend() != "gpu":
    raise ValueError(f"model.attention=cudnn needs a GPU, this backend is {jax.default_backend()!r}; "
                     "use xla, pallas or auto")
  if not _cudnn_supports(q):
    raise ValueError(f"model.attention=cudnn: cuDNN takes bf16/fp16 with head_dim <= 128 (multiple of 8), "
                     f"got {q.dtype} head_dim {q.shape[-1]}; use pallas or auto")
  mask = make_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window=sliding_window)
  # Self-attention over a training row (the same positions array on both sides): the data pipeline lays
  # tokens out in position order within each segment, so the position mask implies the index-causal one
  # and cuDNN may skip the upper triangle (half the FLOPs); the mask still applies segments and windows.
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=q_positions is kv_positions,
                                      implementation="cudnn")


@register_attention("pallas")
def pallas_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                     sliding_window: int = 0, bias=None):
  if bias is not None:
    raise ValueError("model.attention=pallas takes no additive bias (ALiBi); use xla, cudnn or auto")
  # Imported lazily: model.kernels pulls in the backend's Pallas lowering, needed only when picked.
  from model.kernels import flash_attention
  return flash_attention(q, k, v, q_positions=q_positions, kv_positions=kv_positions,
                         q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                         sliding_window=sliding_window, causal=True)


@register_attention("auto")
def auto_attention(q, k, v, **kw):
  backend = jax.default_backend()
  if backend == "gpu" and _cudnn_supports(q):
    return cudnn_attention(q, k, v, **kw)
  if backend in ("gpu", "tpu") and kw.get("bias") is None:
    return pallas_attention(q, k, v, **kw)
  return xla_attention(q, k, v, **kw)


def make_mask(q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None, *,
              sliding_window: int = 0) -> jax.Array:
  """[B, 1, T, S] causal (by position) ∧ same segment ∧ inside the sliding window."""
  qp, kp = q_positions[:, :, None], kv_positions[:, None, :]
  mask = kp <= qp
  if sliding_window:
    mask &= kp > qp - sliding_window  # window w: the query and the w-1 keys before it.
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return mask[:, None]


def _dense_init(std: float):
  # Truncated at ±2σ like T5/MaxText, so no outlier weights at init.
  return jax.nn.initializers.truncated_normal(stddev=std)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd
    pdt = jnp.dtype(cfg.param_dtype)
    std = cfg.hidden_init_std  # init_std, or init_std / sqrt(m) under μP.
    self.wq = param(_dense_init(std), rngs.params(), (d, n, h), ("embed", "q_heads", "head_dim"), pdt)
    self.wk = param(_dense_init(std), rngs.params(), (d, k, h), ("embed", "kv_heads", "head_dim"), pdt)
    self.wv = param(_dense_init(std), rngs.params(), (d, k, h), ("embed", "kv_heads", "head_dim"), pdt)
    self.wo = param(_dense_init(cfg.out_init_std), rngs.params(), (n, h, d), ("q_heads", "head_dim", "embed"),
                    pdt)
    zeros = jax.nn.initializers.zeros
    if cfg.use_bias or cfg.qkv_bias:
      self.bq = param(zeros, rngs.params(), (n, h), ("q_heads", "head_dim"), pdt)
      self.bk = param(zeros, rngs.params(), (k, h), ("kv_heads", "head_dim"), pdt)
      self.bv = param(zeros, rngs.params(), (k, h), ("kv_heads", "head_dim"), pdt)
    if cfg.use_bias:
      self.bo = param(zeros, rngs.params(), (d,), ("embed",), pdt)
    if cfg.qk_norm:
      norm = dict(kind=cfg.norm, eps=cfg.norm_eps, axis_name="head_dim", param_dtype=pdt, rngs=rngs)
      self.q_norm = Norm(h, **norm)
      self.k_norm = Norm(h, **norm)

  def _w(self, name: str, dtype):
    return weight(self, name, dtype)  # dequantizes int8/int4 weights (model/quantize.py).

  def __call__(self, x, *, positions, segment_ids=None, cache=None):
    """x [B, T, D] → ([B, T, D], cache). `cache` = dict(k, v) [B, S, K, H], written at `positions`, or a
    paged dict(k_pages, v_pages, block_tables[, layer]) (returned as dict(k_pages, v_pages))."""
    cfg = self.cfg
    dt = x.dtype
    q = jnp.einsum("btd,dnh->btnh", x, self._w("wq", dt))
    k = jnp.einsum("btd,dkh->btkh", x, self._w("wk", dt))
    v = jnp.einsum("btd,dkh->btkh", x, self._w("wv", dt))
    if cfg.use_bias or cfg.qkv_bias:
      q, k, v = q + self._w("bq", dt), k + self._w("bk", dt), v + self._w("bv", dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if cfg.positions == "rope":
      q, k = apply_rope(q, positions, cfg), apply_rope(k, positions, cfg)
    if cfg.attn_q_mult != 1.0:
      # μP: q·k grows ∝ head_dim once q and k align in training, so scale logits by 1/head_dim
      # (Tensor Programs V, §4); scaling q keeps the kernel interface (which applies 1/sqrt(hd)) unchanged.
      q = q * jnp.asarray(cfg.attn_q_mult, dt)
    q = constrain(q, ("batch", "length", "heads", None))
    # `kv_length`, not `length`: under sequence parallelism every query shard needs all keys, so the
    # rules leave K/V whole along the sequence (all-gathered) while Q stays split; the mask is built
    # from positions, so causality holds across shards.
    k = constrain(k, ("batch", "kv_length", "heads", None))
    v = constrain(v, ("batch", "kv_length", "heads", None))

    if cache is not None and "k_pages" in cache:
      out, cache = self._paged(q, k, v, positions, cache)
      return self._out(out, dt), cache
    if cache is None:
      kv_positions, q_seg, kv_seg = positions, segment_ids, segment_ids
    else:
      rows = jnp.arange(x.shape[0])[:, None]
      k = cache["k"].at[rows, positions].set(k.astype(cache["k"].dtype), mode="drop")
      v = cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype), mode="drop")
      cache = dict(k=k, v=v)
      k, v = k.astype(dt), v.astype(dt)
      # Slot s holds position s; slots past the query position are unwritten and masked out.
      kv_positions = jnp.broadcast_to(jnp.arange(k.shape[1]), (x.shape[0], k.shape[1]))
      q_seg = kv_seg = None
    bias = alibi_bias(positions, kv_positions, cfg.n_heads) if cfg.positions == "alibi" else None
    out = get_attention(cfg.attention)(q, k, v, q_positions=positions, kv_positions=kv_positions,
                                       q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                       sliding_window=cfg.sliding_window, bias=bias)
    return self._out(out, dt), cache

  def _paged(self, q, k, v, positions, cache):
    """Paged cache: scatter this chunk's k/v into its pages, then attend over the row's pages."""
    cfg = self.cfg
    tables, layer = cache["block_tables"], cache.get("layer")  # layer: index into stacked pages.
    k_pages, v_pages = paged.write(cache["k_pages"], cache["v_pages"], k, v, positions, tables, layer)
    kernel = paged.PAGED_ATTENTION.get(cfg.attention)
    if kernel is not None and cfg.positions != "alibi":
      out = kernel(q, k_pages, v_pages, tables, positions, layer=layer, sliding_window=cfg.sliding_window)
    else:  # XLA fallback: chunks of pages with an online softmax (paged.attend).
      slopes = alibi_slopes(cfg.n_heads) if cfg.positions == "alibi" else None
      out = paged.attend(q, k_pages, v_pages, tables, positions, layer=layer,
                         sliding_window=cfg.sliding_window, alibi_slopes=slopes)
    return out, dict(k_pages=k_pages, v_pages=v_pages)

  def _out(self, out, dt):
    """Attention output [B, T, N, H] → [B, T, D] (dtype dt) through wo (and bo)."""
    out = constrain(out, ("batch", "length", "heads", None))
    y = jnp.einsum("btnh,nhd->btd", out, self._w("wo", dt))
    if self.cfg.use_bias:
      y = y + self._w("bo", dt)
    return y
