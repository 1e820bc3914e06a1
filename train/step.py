"""The one jit-compiled training step: forward, cross-entropy with z-loss and masks, backward, update.

    step_fn = make_train_step(setup, cfg)          # jitted, state donated
    state, metrics = step_fn(state, batch)

`batch` holds [global_batch, seq_len] arrays `inputs, targets, segment_ids, positions, loss_mask`.
With `train.grad_accum = k` the batch is split into k micro-batches scanned in sequence; gradients
of the *summed* token losses are accumulated and divided once by the total token count, so the update
equals the k=1 update up to float summation order.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from model.axes import activation_constraints
from train import sharding
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
  logits = model(micro["inputs"], positions=micro["positions"], segment_ids=micro["segment_ids"],
                 dropout_key=dropout_key)
  ce, z, n = cross_entropy(logits, micro["targets"], micro["loss_mask"], z_loss)
  return ce + z, (ce, n)


def make_train_step(setup: Setup, cfg: ConfigDict, batch_shape: tuple[int, int]):
  accum, z_loss = cfg.train.grad_accum, cfg.train.z_loss
  use_dropout = setup.model_cfg.dropout > 0

  def step(state: dict, batch: dict):
    rng, key = jax.random.split(state["rng"])
    key = key if use_dropout else None
    grad_fn = jax.grad(lambda p, mb, k: _loss_sums(setup, p, mb, k, z_loss), has_aux=True)

    if accum == 1:
      grads, (ce, n) = grad_fn(state["params"], batch, key)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
      keys = jax.random.split(key, accum) if key is not None else None

      def body(carry, xs):
        g_acc, ce_acc, n_acc = carry
        mb, k = xs
        g, (ce, n) = grad_fn(state["params"], mb, k)
        return (jax.tree.map(jnp.add, g_acc, g), ce_acc + ce, n_acc + n), None

      zeros = jax.tree.map(jnp.zeros_like, state["params"])
      (grads, ce, n), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), (micro, keys))

    n = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g: g / n, grads)
    updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(loss=ce / n, grad_norm=optax.tree.norm(grads), lr=setup.schedule(state["step"]),
                   tokens=n, nonfinite=opt_state.notfinite_count, nonfinite_total=opt_state.total_notfinite)
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1, rng=rng)
    return new_state, metrics

  def traced(state, batch):
    with activation_constraints(sharding.activation_constraint(setup.mesh, setup.rules)):
      return step(state, batch)

  batch_sh = sharding.batch_sharding(batch_shape, setup.mesh, setup.rules)
  return jax.jit(traced, in_shardings=(setup.state_shardings, batch_sh),
                 out_shardings=(setup.state_shardings, setup.replicated), donate_argnums=0)


def make_eval_step(setup: Setup, batch_shape: tuple[int, int]):
  """Returns jitted fn(params, batch) -> (sum CE nats, sum target bytes, token count) for val loss/bpb."""

  def ev(params, batch, token_bytes):
    with activation_constraints(sharding.activation_constraint(setup.mesh, setup.rules)):
      model = setup.model(params)
      logits = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    ce, _, n = cross_entropy(logits, batch["targets"], batch["loss_mask"], 0.0)
    nbytes = (token_bytes[batch["targets"]] * batch["loss_mask"]).sum()
    return ce, nbytes, n

  batch_sh = sharding.batch_sharding(batch_shape, setup.mesh, setup.rules)
  return jax.jit(ev, in_shardings=(setup.state_shardings["params"], batch_sh, setup.replicated),
                 out_shardings=setup.replicated)
