"""Position encodings: RoPE (with linear, llama3 and YaRN context scaling), ALiBi, sinusoidal.

All take explicit integer `positions` [batch, length] rather than assuming arange(length), so packed
sequences (positions restart at every document) and KV-cache decoding (position = cache slot) work
unchanged. Learned absolute positions are a param of the transformer (`model/transformer.py`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies [head_dim/2] and the attention (cos/sin) scale, per the scaling rule.

  Formulas follow the published methods as implemented in Hugging Face `transformers`
  (`modeling_rope_utils`): linear (Chen et al. 2023), llama3 (Meta Llama 3.1), YaRN (Peng et al. 2023).
  """
  dim, base, factor = cfg.hd, cfg.rope_theta, cfg.rope_factor
  inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if cfg.rope_scaling == "none":
    return inv_freq, 1.0
  if cfg.rope_scaling == "linear":
    return inv_freq / factor, 1.0
  if cfg.rope_scaling == "llama3":
    old_len = cfg.rope_original_max_len
    low_wavelen = old_len / cfg.rope_low_freq_factor
    high_wavelen = old_len / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = ((old_len / wavelen - cfg.rope_low_freq_factor)
              / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled), 1.0
  if cfg.rope_scaling == "yarn":
    old_len = cfg.rope_original_max_len

    def correction_dim(rotations: float) -> float:
      return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
    if low == high:
      high += 0.001  # avoid a zero-width ramp.
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency (high-frequency dims).
    freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return freq, mscale
  raise ValueError(f"unknown rope_scaling {cfg.rope_scaling!r}")


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Rotates x [batch, length, heads, head_dim] by its positions, rotate-half layout (as LLaMA/HF)."""
  inv_freq, mscale = rope_inv_freq(cfg)
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  cos = (jnp.cos(angles) * mscale)[:, :, None, :]
  sin = (jnp.sin(angles) * mscale)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def alibi_slopes(n_heads: int) -> np.ndarray:
  """Per-head ALiBi slopes (Press et al. 2022), incl. their rule for non-power-of-two head counts."""

  def power_of_two(n: int) -> list[float]:
    start = 2 ** (-8 / n)
    return [start ** (i + 1) for i in range(n)]

  if math.log2(n_heads).is_integer():
    return np.asarray(power_of_two(n_heads), np.float32)
  closest = 2 ** math.floor(math.log2(n_heads))
  extra = power_of_two(2 * closest)[0::2][: n_heads - closest]
  return np.asarray(power_of_two(closest) + extra, np.float32)


def alibi_bias(q_positions: jax.Array, kv_positions: jax.Array, n_heads: int) -> jax.Array:
  """Additive bias [batch, heads, q_len, kv_len] = -slope * distance (masked entries don't matter)."""
  distance = (q_positions[:, :, None] - kv_positions[:, None, :]).astype(jnp.float32)
  return -jnp.asarray(alibi_slopes(n_heads))[None, :, None, None] * jnp.abs(distance)[:, None]


def sinusoidal(positions: jax.Array, dim: int) -> jax.Array:
  """Fixed sin/cos table of Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos."""
  inv = 1.0 / (10_000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv, jnp.float32)
  out = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return out.reshape(*positions.shape, -1)[..., :dim]
