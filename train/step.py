"""The one jit-compiled training step: forward, cross-entropy with z-loss and masks, backward, update.

    step_fn = make_train_step(setup, cfg)          # jitted, state donated
    state, metrics = step_fn(state, batch)

`batch` holds [global_batch, seq_len] arrays `inputs, targets, segment_ids, positions, loss_mask`.
With `train.grad_accum = k` the batch is split into k micro-batches scanned in sequence; gradients
of the *summed* token losses are accumulated and divided once by the total token count, so the update
equals the k=1 update up to float summation order.

A mixture-of-experts model (`model.n_experts > 0`) adds `model.moe_aux_weight` × its load-balancing loss
and `model.moe_z_weight` × its router z-loss (both means over tokens, averaged over MoE layers; with
grad_accum, token-weighted over micro-batches, each routed on its own) and reports them as `moe/*`
metrics. A sigmoid router's selection bias is then moved outside the gradient (DeepSeek-V3), on finite
steps only.

With `mesh.stage > 1` the layer stack runs as a GPipe pipeline over `train.microbatches` micro-batches
(`train/pipeline.py`, installed through `model.transformer.layer_runner`); the step reports its bubble
fraction as `pipeline/bubble`. With `optim.offload` the optimizer state is brought from host memory for
the update and written back there (its out_shardings).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from model.axes import activation_constraints
from model.layers.moe import update_router_bias
from model.transformer import layer_runner
from train import pipeline, sharding
from train.state import Setup


def cross_entropy(logits, targets, mask, z_loss: float):
  """Sums over masked tokens: (CE nats, z-loss term, token count). Computed in fp32."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = (log_z - target_logit) * mask
  z = z_loss * jnp.square(log_z) * mask
  return ce.sum(), z.sum(), mask.sum()


def _loss_sums(setup: Setup, params, micro: dict, dropout_key, z_loss: float):
  model = setup.model(params)
  logits, aux = model(micro["inputs"], positions=micro["positions"], segment_ids=micro["segment_ids"],
                      dropout_key=dropout_key, return_aux=True)
  ce, z, n = cross_entropy(logits, micro["targets"], micro["loss_mask"], z_loss)
  loss = ce + z
  if aux:  # MoE: token means, × n so that the step's division by the token count leaves them means.
    mc = setup.model_cfg
    loss = loss + (mc.moe_aux_weight * aux["aux_loss"] + mc.moe_z_weight * aux["z_loss"]) * n
  return loss, (ce, n, aux)


def make_train_step(setup: Setup, cfg: ConfigDict, batch_shape: tuple[int, int]):
  accum, z_loss = cfg.train.grad_accum, cfg.train.z_loss
  mc = setup.model_cfg
  use_dropout = mc.dropout > 0

  stages, microbatches = pipeline.stages_of(setup.mesh), cfg.train.get("microbatches", 1)
  # optim.offload: the moments live in host memory between steps and visit the device for the update.
  opt_sh = setup.state_shardings["opt_state"]
  offloaded = any(s.memory_kind == "pinned_host" for s in jax.tree.leaves(opt_sh))
  opt_on_device = jax.tree.map(lambda s: s.with_memory_kind("device"), opt_sh) if offloaded else None

  def step(state: dict, batch: dict):
    rng, key = jax.random.split(state["rng"])
    key = key if use_dropout else None
    grad_fn = jax.grad(lambda p, mb, k: _loss_sums(setup, p, mb, k, z_loss), has_aux=True)

    if accum == 1:
      grads, (ce, n, aux) = grad_fn(state["params"], batch, key)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
      keys = jax.random.split(key, accum) if key is not None else None

      def body(carry, xs):
        g_acc, ce_acc, n_acc = carry
        mb, k = xs
        g, (ce, n, aux) = grad_fn(state["params"], mb, k)
        return (jax.tree.map(jnp.add, g_acc, g), ce_acc + ce, n_acc + n), aux

      zeros = jax.tree.map(jnp.zeros_like, state["params"])
      (grads, ce, n), aux = jax.lax.scan(body, (zeros, 0.0, 0.0), (micro, keys))
      aux = jax.tree.map(lambda a: a.mean(0), aux)

    n = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g: g / n, grads)
    opt_state = state["opt_state"]
    if offloaded:
      opt_state = jax.device_put(opt_state, opt_on_device)
    updates, opt_state = setup.tx.update(grads, opt_state, state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(loss=ce / n, grad_norm=optax.tree.norm(grads), lr=setup.schedule(state["step"]),
                   tokens=n, nonfinite=opt_state.notfinite_count, nonfinite_total=opt_state.total_notfinite)
    if stages > 1:
      metrics["pipeline/bubble"] = jnp.float32(pipeline.bubble_fraction(stages, microbatches))
    if aux:
      load = aux["expert_load"]  # [n_moe_layers, E], shares of assignments per expert
      metrics.update({"moe/aux_loss": aux["aux_loss"], "moe/z_loss": aux["z_loss"],
                      "moe/dropped_frac": aux["dropped_frac"],
                      "moe/max_load": load.max() * mc.n_experts})  # 1.0: perfectly balanced
      if mc.moe_router == "sigmoid" and mc.moe_bias_rate > 0:
        rate = jnp.where(opt_state.notfinite_count == 0, mc.moe_bias_rate, 0.0)  # skipped step: no move
        params = update_router_bias(params, load, rate)
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1, rng=rng)
    return new_state, metrics

  def traced(state, batch):
    with activation_constraints(sharding.activation_constraint(setup.mesh, setup.rules)), \
        layer_runner(pipeline.runner(setup.mesh, setup.rules, microbatches)):
      return step(state, batch)

  batch_sh = sharding.batch_sharding(batch_shape, setup.mesh, setup.rules)
  return jax.jit(traced, in_shardings=(setup.state_shardings, batch_sh),
                 out_shardings=(setup.state_shardings, setup.replicated), donate_argnums=0)


def make_eval_step(setup: Setup, batch_shape: tuple[int, int], cfg: ConfigDict | None = None):
  """Returns jitted fn(params, batch) -> (sum CE nats, sum target bytes, token count) for val loss/bpb."""

  microbatches = cfg.train.get("microbatches", 1) if cfg is not None else 1

  def ev(params, batch, token_bytes):
    with activation_constraints(sharding.activation_constraint(setup.mesh, setup.rules)), \
        layer_runner(pipeline.runner(setup.mesh, setup.rules, microbatches)):
      model = setup.model(params)
      logits = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    ce, _, n = cross_entropy(logits, batch["targets"], batch["loss_mask"], 0.0)
    nbytes = (token_bytes[batch["targets"]] * batch["loss_mask"]).sum()
    return ce, nbytes, n

  batch_sh = sharding.batch_sharding(batch_shape, setup.mesh, setup.rules)
  return jax.jit(ev, in_shardings=(setup.state_shardings["params"], batch_sh, setup.replicated),
                 out_shardings=setup.replicated)
