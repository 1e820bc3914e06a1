"""Feed-forward block: gated (SwiGLU, GeGLU; Shazeer 2020) or plain (GELU, ReLU)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.axes import constrain, param
from model.config import ModelConfig
from model.quantize import weight

_ACT = {"swiglu": jax.nn.silu, "geglu": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu": lambda x: jax.nn.gelu(x, approximate=True), "relu": jax.nn.relu}


class Mlp(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f = cfg.d_model, cfg.ff
    pdt = jnp.dtype(cfg.param_dtype)
    init = jax.nn.initializers.truncated_normal(stddev=cfg.hidden_init_std)  # / sqrt(m) under μP.
    out_std = cfg.out_init_std
    self.w_in = param(init, rngs.params(), (d, f), ("embed", "mlp"), pdt)
    if cfg.gated:
      self.w_gate = param(init, rngs.params(), (d, f), ("embed", "mlp"), pdt)
    self.w_out = param(jax.nn.initializers.truncated_normal(stddev=out_std), rngs.params(), (f, d),
                       ("mlp", "embed"), pdt)
    if cfg.use_bias:
      zeros = jax.nn.initializers.zeros
      self.b_in = param(zeros, rngs.params(), (f,), ("mlp",), pdt)
      if cfg.gated:
        self.b_gate = param(zeros, rngs.params(), (f,), ("mlp",), pdt)
      self.b_out = param(zeros, rngs.params(), (d,), ("embed",), pdt)

  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, dt = self.cfg, x.dtype
    w = lambda name: weight(self, name, dt)  # dequantizes int8/int4 weights (model/quantize.py).
    h = x @ w("w_in")
    if cfg.use_bias:
      h = h + w("b_in")
    if cfg.gated:
      g = x @ w("w_gate")
      if cfg.use_bias:
        g = g + w("b_gate")
      h = _ACT[cfg.activation](g) * h
    else:
      h = _ACT[cfg.activation](h)
    h = constrain(h, ("batch", "length", "mlp"))
    y = h @ w("w_out")
    return y + w("b_out") if cfg.use_bias else y
