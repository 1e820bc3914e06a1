"""Decoder-only transformer as Flax NNX modules.

    model = Transformer(ModelConfig(...), rngs=nnx.Rngs(0))
    logits = model(tokens, positions=positions, segment_ids=segment_ids)            # training
    logits, cache = model.decode(tokens, positions=positions, cache=cache)           # KV-cache sampling
    logits, pages = model.decode(tokens, positions=positions, cache=pages,           # paged (serve/)
                                 block_tables=tables, logits_at=last)
    logits, aux = model(tokens, return_aux=True)     # + MoE aux terms averaged over MoE layers ({} if dense)
    hidden = model.features(tokens)                  # [B, T, D] final-norm states (reward/value heads)
    logits = model.unembed(hidden)                   # == model(tokens), from the same trunk pass

With `scan_layers=True` the blocks' params are stacked on a leading `layers` axis and applied with
`jax.lax.scan` (one compiled block instead of n_layers copies: compile time stays flat with depth),
or by whatever the trainer installed with `layer_runner` (the pipeline schedule of `train/pipeline.py`);
remat wraps the block body (`remat=offload` keeps its saved matmul outputs in host memory). Params are
fp32, activations in `compute_dtype` (bf16 by default), logits in `logits_dtype`. μP (`mup_base_width > 0`, see `model/config.py`) only changes init stds
and two constant multipliers (attention q, readout). Dropout (on embeddings and residual branches)
runs only when a `dropout_key` is given.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model.axes import constrain, param
from model.config import ModelConfig
from model.layers.attention import Attention
from model.layers.mlp import Mlp
from model.layers.moe import Moe
from model.layers.norm import Norm
from model.layers.positions import sinusoidal
from model.quantize import weight

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass.
    # Save weight matmuls but not attention scores ([B, N, T, S] would dominate memory).
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # save_dots, but the saved matmul outputs wait for the backward pass in pinned host memory: device
    # memory of remat=full at the FLOPs of save_dots, paid in host<->device transfers (PCIe/DMA).
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}

# How the scanned layer stack is applied in a cache-free forward pass: None = `jax.lax.scan`. The trainer
# installs a pipelined schedule (train/pipeline.py) here, so model code stays free of devices and meshes.
_LAYER_RUNNER: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("layer_runner", default=None)


@contextlib.contextmanager
def layer_runner(fn: Callable | None):
  """Installs `fn(layer_fn, x, stacked_state, keys, positions, segment_ids) -> (x, stacked_aux)` for
  forward passes traced inside this context; `layer_fn(layer_state, x, key, positions, segment_ids)
  -> (x, aux)` applies one layer, and (keys, positions, segment_ids) may be None."""
  token = _LAYER_RUNNER.set(fn)
  try:
    yield
  finally:
    _LAYER_RUNNER.reset(token)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nnx.Module):
  """Attention + feed-forward (`Mlp`, or `Moe` when `moe`); returns (x, cache, aux), aux {} if dense."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False):
    self.cfg = cfg
    norm = dict(kind=cfg.norm, eps=cfg.norm_eps, axis_name="embed",
                param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.attn_norm = Norm(cfg.d_model, **norm)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg.d_model, **norm)
    self.mlp = Moe(cfg, rngs=rngs) if moe else Mlp(cfg, rngs=rngs)

  def _ffn(self, x):
    return self.mlp(x) if isinstance(self.mlp, Moe) else (self.mlp(x), {})

  def __call__(self, x, *, positions, segment_ids=None, cache=None, dropout_key=None):
    rate = self.cfg.dropout
    k_attn, k_mlp = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    if self.cfg.norm_placement == "pre":
      h, cache = self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids, cache=cache)
      x = x + dropout(h, rate, k_attn)
      h, aux = self._ffn(self.mlp_norm(x))
      x = x + dropout(h, rate, k_mlp)
    else:  # post-norm (original Transformer / BERT): normalize after each residual add.
      h, cache = self.attn(x, positions=positions, segment_ids=segment_ids, cache=cache)
      x = self.attn_norm(x + dropout(h, rate, k_attn))
      h, aux = self._ffn(x)
      x = self.mlp_norm(x + dropout(h, rate, k_mlp))
    return constrain(x, ("batch", "length", "embed")), cache, aux


def _stack_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """n_layers Blocks whose params are stacked on a leading axis named `layers`."""
  keys = jax.random.split(rngs.params(), cfg.n_layers)
  moe = cfg.n_experts > 0  # with scan every layer is MoE (config checks moe_every == 1).
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0), moe=moe)))
  state = jax.vmap(lambda k: nnx.state(Block(cfg, rngs=nnx.Rngs(params=k), moe=moe)))(keys)
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
      self.blocks = nnx.List([Block(cfg, rngs=rngs, moe=cfg.is_moe_layer(i))
                              for i in range(cfg.n_layers)])
    self.final_norm = Norm(cfg.d_model, kind=cfg.norm, eps=cfg.norm_eps, axis_name="embed",
                           param_dtype=pdt, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = param(init, rngs.params(), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt)

  def __call__(self, tokens, *, positions=None, segment_ids=None, dropout_key=None, return_aux=False):
    """tokens [B, T] int → logits [B, T, vocab]. positions default to arange(T).

    `return_aux=True` returns (logits, aux): the MoE layers' `aux_loss`, `z_loss`, `dropped_frac`
    averaged over MoE layers, and `expert_load` [n_moe_layers, E] ({} for a dense model).
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x, _, aux = self._trunk(tokens, positions, segment_ids, None, dropout_key, with_aux=True)
    return (self._logits(x), aux) if return_aux else self._logits(x)

  def features(self, tokens, *, positions=None, segment_ids=None, dropout_key=None) -> jax.Array:
    """tokens [B, T] → final-norm hidden states [B, T, D] (what scalar heads read: reward, value)."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return self._trunk(tokens, positions, segment_ids, None, dropout_key)[0]

  def unembed(self, hidden) -> jax.Array:
    """Hidden states from `features` [B, T, D] → logits: one trunk pass serves a policy and a value head."""
    return self._logits(hidden)

  def decode(self, tokens, *, positions, cache, block_tables=None, logits_at=None):
    """One step (or a prefill chunk) with a KV cache; returns (logits, cache).

    `cache` comes from `init_cache` (dense), or from `init_paged_cache` with `block_tables` [B, M] int32
    (row b's positions [i*S, (i+1)*S) live in page block_tables[b, i]; positions < 0 are padding and
    write only the null page 0). `logits_at` [B] int: logits of that one index per row only ([B, 1, V]),
    as a prefill chunk needs just its last token's: a [B, T, vocab] product would be wasted.
    """
    x, cache = self._trunk(tokens, positions, None, cache, None, block_tables)
    if logits_at is not None:
      x = x[jnp.arange(x.shape[0]), logits_at][:, None]
    return self._logits(x), cache

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    cfg = self.cfg
    shape = (batch, max_len, cfg.n_kv_heads, cfg.hd)
    dtype = dtype or jnp.dtype(cfg.compute_dtype)
    if cfg.scan_layers:
      shape = (cfg.n_layers,) + shape
      return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
    return [dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers)]

  def init_paged_cache(self, num_pages: int, page_size: int, dtype=None):
    """Zeroed pages [kv_heads, num_pages, page_size, head_dim] per layer (page 0 is the null page);
    stacked on a leading layers axis with scan_layers. See `model/layers/paged.py`."""
    cfg = self.cfg
    shape = (cfg.n_kv_heads, num_pages, page_size, cfg.hd)
    dtype = dtype or jnp.dtype(cfg.compute_dtype)
    if cfg.scan_layers:
      shape = (cfg.n_layers,) + shape
      return dict(k_pages=jnp.zeros(shape, dtype), v_pages=jnp.zeros(shape, dtype))
    return [dict(k_pages=jnp.zeros(shape, dtype), v_pages=jnp.zeros(shape, dtype))
            for _ in range(cfg.n_layers)]

  def _trunk(self, tokens, positions, segment_ids, cache, dropout_key, block_tables=None, with_aux=False):
    cfg = self.cfg
    cdt = jnp.dtype(cfg.compute_dtype)
    x = jnp.take(weight(self, "embed"), tokens, axis=0).astype(cdt)
    if cfg.positions == "learned":
      x = x + jnp.take(self.pos_embed.get_value(), positions, axis=0).astype(cdt)
    elif cfg.positions == "sinusoidal":
      x = x + sinusoidal(positions, cfg.d_model).astype(cdt)
    if dropout_key is not None:
      dropout_key, k = jax.random.split(dropout_key)
      x = dropout(x, cfg.dropout, k)
    x = constrain(x, ("batch", "length", "embed"))

    def block_fn(graphdef, state, x, layer_cache, key, positions=positions, segment_ids=segment_ids):
      block = nnx.merge(graphdef, state)
      if block_tables is not None:  # one table for all layers: not scanned, handed to each layer's cache.
        layer_cache = dict(layer_cache, block_tables=block_tables)
      return block(x, positions=positions, segment_ids=segment_ids, cache=layer_cache, dropout_key=key)

    if cfg.remat != "none":
      block_fn = jax.checkpoint(block_fn, policy=REMAT_POLICIES[cfg.remat], static_argnums=(0,))
    keys = (jax.random.split(dropout_key, cfg.n_layers) if dropout_key is not None else None)

    if cfg.scan_layers:
      graphdef, state = nnx.split(self.blocks)

      def body(x, xs):
        layer_state, layer_cache, key = xs
        x, layer_cache, aux = block_fn(graphdef, layer_state, x, layer_cache, key)
        return x, (layer_cache, aux)

      def paged_body(carry, xs):
        # Paged: the stacked pages ride in the carry and each layer updates its own slice in place
        # (`model/layers/paged.py`); as scan inputs/outputs they would be copied whole at every step.
        x, pages = carry
        layer_state, key, layer = xs
        x, pages, aux = block_fn(graphdef, layer_state, x, dict(pages, layer=layer), key)
        return (x, pages), aux

      runner = _LAYER_RUNNER.get() if cache is None and block_tables is None else None
      if runner is not None:  # e.g. pipeline stages: per-example inputs travel with their micro-batch.
        def layer_fn(layer_state, x, key, positions, segment_ids):
          x, _, aux = block_fn(graphdef, layer_state, x, None, key, positions, segment_ids)
          return x, aux
        x, aux = runner(layer_fn, x, state, keys, positions, segment_ids)
      elif block_tables is None:
        x, (cache, aux) = jax.lax.scan(body, x, (state, cache, keys))  # aux: stacked [n_layers, ...]
      else:
        (x, cache), aux = jax.lax.scan(paged_body, (x, cache), (state, keys, jnp.arange(cfg.n_layers)))
    else:
      new_cache, auxes = [], []
      for i, block in enumerate(self.blocks):
        graphdef, state = nnx.split(block)
        x, c, a = block_fn(graphdef, state, x, None if cache is None else cache[i],
                           None if keys is None else keys[i])
        new_cache.append(c)
        auxes += [a] if a else []
      cache = None if cache is None else new_cache
      aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes else {}
    x = self.final_norm(x)
    if not with_aux:
      return x, cache
    # MoE losses are means over each layer's tokens: average them over layers so their weights do not
    # scale with depth; expert_load stays per layer (the router-bias update needs each layer's own).
    aux = {k: v if k == "expert_load" else v.mean() for k, v in aux.items()}
    return x, cache, aux

  def _logits(self, x):
    cfg = self.cfg
    cdt = jnp.dtype(cfg.compute_dtype)
    if cfg.logits_mult != 1.0:
      # μP readout (mup's MuReadout/MuSharedReadout): logits × mup_output_mult / m, so the readout's
      # Adam updates, which move logits ∝ width, do so by O(1) at every width.
      x = x * jnp.asarray(cfg.logits_mult, cdt)
    head = weight(self, "embed").T if cfg.tie_embeddings else weight(self, "lm_head")
    logits = jnp.einsum("btd,dv->btv", x, head.astype(cdt),
                        preferred_element_type=jnp.dtype(cfg.logits_dtype))
    return constrain(logits, ("batch", "length", "vocab"))
