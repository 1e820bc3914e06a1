"""RMSNorm and LayerNorm with logical param axes; statistics in fp32 whatever the compute dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.axes import param


class Norm(nnx.Module):
  """`kind` is 'rmsnorm' (scale only) or 'layernorm' (scale and bias) over the last axis."""

  def __init__(self, dim: int, *, kind: str, eps: float, axis_name: str | None, param_dtype,
               rngs: nnx.Rngs):
    key = rngs.params()
    self.kind, self.eps = kind, eps
    self.scale = param(jax.nn.initializers.ones, key, (dim,), (axis_name,), param_dtype)
    self.bias = (param(jax.nn.initializers.zeros, key, (dim,), (axis_name,), param_dtype)
                 if kind == "layernorm" else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    y = y * self.scale.get_value().astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias.get_value().astype(jnp.float32)
    return y.astype(dtype)
