"""Decoder-only transformer as Flax NNX modules.

    model = Transformer(ModelConfig(...), rngs=nnx.Rngs(0))
    logits = model(tokens, positions=positions, segment_ids=segment_ids)            # training
    logits, cache = model.decode(tokens, positions=positions, cache=cache)           # KV-cache sampling
    hidden = model.features(tokens)                  # [B, T, D] final-norm states (reward/value heads)

With `scan_layers=True` the blocks' params are stacked on a leading `layers` axis and applied with
`jax.lax.scan` (one compiled block instead of n_layers copies: compile time stays flat with depth);
remat wraps the block body. Params are fp32, activations in `compute_dtype` (bf16 by default),
logits in `logits_dtype`. μP (`mup_base_width > 0`, see `model/config.py`) only changes init stds
and two constant multipliers (attention q, readout). Dropout (on embeddings and residual branches)
runs only when a `dropout_key` is given.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.axes import constrain, param
from model.config import ModelConfig
from model.layers.attention import Attention
from model.layers.mlp import Mlp
from model.layers.norm import Norm
from model.layers.positions import sinusoidal

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass.
    # Save weight matmuls but not attention scores ([B, N, T, S] would dominate memory).
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    norm = dict(kind=cfg.norm, eps=cfg.norm_eps, axis_name="embed",
                param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.attn_norm = Norm(cfg.d_model, **norm)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg.d_model, **norm)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x, *, positions, segment_ids=None, cache=None, dropout_key=None):
    rate = self.cfg.dropout
    k_attn, k_mlp = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    if self.cfg.norm_placement == "pre":
      h, cache = self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids, cache=cache)
      x = x + dropout(h, rate, k_attn)
      x = x + dropout(self.mlp(self.mlp_norm(x)), rate, k_mlp)
    else:  # post-norm (original Transformer / BERT): normalize after each residual add.
      h, cache = self.attn(x, positions=positions, segment_ids=segment_ids, cache=cache)
      x = self.attn_norm(x + dropout(h, rate, k_attn))
      x = self.mlp_norm(x + dropout(self.mlp(x), rate, k_mlp))
    return constrain(x, ("batch", "length", "embed")), cache


def _stack_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """n_layers Blocks whose params are stacked on a leading axis named `layers`."""
  keys = jax.random.split(rngs.params(), cfg.n_layers)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
  state = jax.vmap(lambda k: nnx.state(Block(cfg, rngs=nnx.Rngs(params=k))))(keys)
  blocks = nnx.merge(graphdef, state)
  for _, var in nnx.iter_graph(blocks):
    if isinstance(var, nnx.Param):
      var.set_metadata(axes=("layers",) + tuple(var.get_metadata()["axes"]))
  return blocks


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    init = jax.nn.initializers.truncated_normal(stddev=cfg.init_std)
    self.embed = param(init, rngs.params(), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
    if cfg.positions == "learned":
      self.pos_embed = param(init, rngs.params(), (cfg.max_seq_len, cfg.d_model), (None, "embed"), pdt)
    if cfg.scan_layers:
      self.blocks = _stack_blocks(cfg, rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = Norm(cfg.d_model, kind=cfg.norm, eps=cfg.norm_eps, axis_name="embed",
                           param_dtype=pdt, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = param(init, rngs.params(), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt)

  def __call__(self, tokens, *, positions=None, segment_ids=None, dropout_key=None) -> jax.Array:
    """tokens [B, T] int → logits [B, T, vocab]. positions default to arange(T)."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x, _ = self._trunk(tokens, positions, segment_ids, None, dropout_key)
    return self._logits(x)

  def features(self, tokens, *, positions=None, segment_ids=None, dropout_key=None) -> jax.Array:
    """tokens [B, T] → final-norm hidden states [B, T, D] (what scalar heads read: reward, value)."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return self._trunk(tokens, positions, segment_ids, None, dropout_key)[0]

  def decode(self, tokens, *, positions, cache):
    """One step (or a prefill chunk) with a KV cache from `init_cache`; returns (logits, cache)."""
    x, cache = self._trunk(tokens, positions, None, cache, None)
    return self._logits(x), cache

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    cfg = self.cfg
    shape = (batch, max_len, cfg.n_kv_heads, cfg.hd)
    dtype = dtype or jnp.dtype(cfg.compute_dtype)
    if cfg.scan_layers:
      shape = (cfg.n_layers,) + shape
      return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
    return [dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers)]

  def _trunk(self, tokens, positions, segment_ids, cache, dropout_key):
    cfg = self.cfg
    cdt = jnp.dtype(cfg.compute_dtype)
    x = jnp.take(self.embed.get_value(), tokens, axis=0).astype(cdt)
    if cfg.positions == "learned":
      x = x + jnp.take(self.pos_embed.get_value(), positions, axis=0).astype(cdt)
    elif cfg.positions == "sinusoidal":
      x = x + sinusoidal(positions, cfg.d_model).astype(cdt)
    if dropout_key is not None:
      dropout_key, k = jax.random.split(dropout_key)
      x = dropout(x, cfg.dropout, k)
    x = constrain(x, ("batch", "length", "embed"))

    def block_fn(graphdef, state, x, layer_cache, key):
      block = nnx.merge(graphdef, state)
      return block(x, positions=positions, segment_ids=segment_ids, cache=layer_cache, dropout_key=key)

    if cfg.remat != "none":
      block_fn = jax.checkpoint(block_fn, policy=REMAT_POLICIES[cfg.remat], static_argnums=(0,))
    keys = (jax.random.split(dropout_key, cfg.n_layers) if dropout_key is not None else None)

    if cfg.scan_layers:
      graphdef, state = nnx.split(self.blocks)

      def body(x, xs):
        layer_state, layer_cache, key = xs
        return block_fn(graphdef, layer_state, x, layer_cache, key)

      x, cache = jax.lax.scan(body, x, (state, cache, keys))
    else:
      new_cache = []
      for i, block in enumerate(self.blocks):
        graphdef, state = nnx.split(block)
        x, c = block_fn(graphdef, state, x, None if cache is None else cache[i],
                        None if keys is None else keys[i])
        new_cache.append(c)
      cache = None if cache is None else new_cache

    return self.final_norm(x), cache

  def _logits(self, x):
    cfg = self.cfg
    cdt = jnp.dtype(cfg.compute_dtype)
    if cfg.logits_mult != 1.0:
      # μP readout (mup's MuReadout/MuSharedReadout): logits × mup_output_mult / m, so the readout's
      # Adam updates, which move logits ∝ width, do so by O(1) at every width.
      x = x * jnp.asarray(cfg.logits_mult, cdt)
    head = self.embed.get_value().T if cfg.tie_embeddings else self.lm_head.get_value()
    logits = jnp.einsum("btd,dv->btv", x, head.astype(cdt),
                        preferred_element_type=jnp.dtype(cfg.logits_dtype))
    return constrain(logits, ("batch", "length", "vocab"))
