"""Mixture-of-experts feed-forward block: top-k router, capacity or dropless dispatch, aux losses.

    moe = Moe(cfg, rngs=rngs)          # cfg.n_experts > 0; built by `Block` in place of `Mlp`
    y, aux = moe(x)                    # x [B, T, D] → y [B, T, D]; aux: scalars + expert_load [E]

Experts are `n_experts` stacked MLPs of the config's activation (params [experts, embed, mlp] and
[experts, mlp, embed]); `train/` shards the `experts` axis over the `expert` mesh axis. The router is a
fp32 linear [embed, experts] (Switch Transformer §2.4 "selective precision": bf16 router logits make
top-k unstable), two kinds:

- `softmax` (Switch, Mixtral): softmax over all experts, then the top k; `moe_renormalize` rescales the k
  weights to sum 1 (Mixtral does; Switch's k = 1 does not).
- `sigmoid` (DeepSeek-V3 §2.1.2, aux-loss-free balancing): affinities s = sigmoid(logits); the top k of
  s + b are *selected*, but tokens are *combined* with s (renormalized over the k). The bias b is an
  `nnx.Param` named `router_bias`, so it lives, is sharded and checkpointed with the others; it gets no
  gradient (stop_gradient; Adam turns a zero gradient into a zero update) and no weight decay (1-D), and
  the train step moves it by γ · sign(mean load − load_e) after each update (`update_router_bias`).

Dispatch, chosen by `capacity_factor`:

- c > 0, capacity (GShard, Switch; the MaxText / Flaxformer "dense dispatch"): a group is one sequence,
  so the result is the same on every mesh. Each expert takes at most C = min(T, ceil(k · T · c / E))
  tokens per group; slots are handed out in order of choice rank, then position (all first choices
  before any second choice, GShard Algorithm 1), and a (token, choice) over capacity is dropped: its
  contribution is zero, so a token dropped by all its choices leaves the block as its residual. Dispatch
  and combine are one-hot [B, T, E, C] tensors used in two einsums; the expert inputs [E, B, C, D] are
  constrained to (experts, batch), so under expert parallelism XLA turns the einsums into all-to-alls.
  Cost: E · C ≈ k · c · T token slots per sequence in the expert matmuls (c× the useful FLOPs), plus
  the two dispatch einsums, 2 · B · T · E · C · D FLOPs each (quadratic in T: why GShard uses groups).
- c = 0, dropless: the N · k (token, choice) pairs are sorted by expert and the experts applied with
  `jax.lax.ragged_dot` (grouped matmul, megablocks-style), then scattered back and mixed with the
  weights. Exactly the useful FLOPs plus a sort and two gathers of [N · k, D]; the sort is global, so
  under GSPMD the tokens and expert weights are gathered (correct on any mesh, not expert-parallel).

Aux losses (returned, weighted and added by the train step, averaged over MoE layers by the model):
`aux_loss` = E · Σ_e f_e · P_e (Switch eq. 4, f_e = share of the k · N assignments routed to e, before
capacity; P_e = mean router probability, for sigmoid the normalized affinities s / Σ s of DeepSeek-V3
eq. 19), which is 1.0 when perfectly balanced; `z_loss` = mean over tokens of logsumexp(logits)²
(ST-MoE eq. 5); `dropped_frac` = share of (token, choice) pairs over capacity.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.axes import constrain, param
from model.config import ModelConfig
from model.layers.mlp import _ACT, Mlp
from model.quantize import weight


def route(logits: jax.Array, *, k: int, router: str = "softmax", bias: jax.Array | None = None,
          renormalize: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Router logits [..., E] (fp32) → (combine weights [..., k], expert ids [..., k], probs [..., E]).

  `probs` are what the load-balancing loss averages: the softmax, or normalized sigmoid affinities.
  With `bias` (sigmoid only) the top k of sigmoid + bias are selected; the weights stay unbiased.
  """
  if router == "softmax":
    gates = probs = jax.nn.softmax(logits, axis=-1)
    select = gates
  elif router == "sigmoid":
    gates = jax.nn.sigmoid(logits)
    probs = gates / gates.sum(-1, keepdims=True)
    select = gates if bias is None else gates + jax.lax.stop_gradient(bias)
  else:
    raise ValueError(f"router={router!r} not in ('softmax', 'sigmoid')")
  _, experts = jax.lax.top_k(select, k)  # ties go to the lower expert id.
  weights = jnp.take_along_axis(gates, experts, axis=-1)
  if renormalize:
    weights = weights / weights.sum(-1, keepdims=True)
  return weights, experts, probs


def expert_load(experts: jax.Array, n_experts: int) -> jax.Array:
  """Share of all (token, choice) assignments routed to each expert [E] (sums to 1)."""
  counts = jax.nn.one_hot(experts.reshape(-1), n_experts, dtype=jnp.float32).sum(0)
  return counts / experts.size


def load_balancing_loss(probs: jax.Array, experts: jax.Array, n_experts: int) -> jax.Array:
  """Switch Transformer eq. 4 without α, top-k: E · Σ_e f_e · P_e; 1.0 when routing is uniform."""
  p = probs.reshape(-1, n_experts).astype(jnp.float32).mean(0)
  return n_experts * jnp.sum(expert_load(experts, n_experts) * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE eq. 5 without its weight: mean over tokens of logsumexp(router logits)²."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def expert_capacity(tokens_per_group: int, k: int, capacity_factor: float, n_experts: int) -> int:
  """ceil(k · tokens · c / E) slots per expert and group (GShard), at least 1, at most the group size
  (an expert can get each token once, as a token's k choices are distinct)."""
  c = math.ceil(k * tokens_per_group * capacity_factor / n_experts)
  return max(1, min(tokens_per_group, c))


def dispatch_masks(experts: jax.Array, weights: jax.Array, n_experts: int, capacity: int):
  """Expert ids and weights [G, T, k] → dispatch [G, T, E, C] (0/1), combine [G, T, E, C], kept [G, T, k].

  Slots go to every token's first choice (by position), then every second choice, and so on
  (GShard Algorithm 1); a choice that finds its expert's C slots taken is dropped.
  """
  g, t, k = experts.shape
  onehot = jax.nn.one_hot(experts, n_experts, dtype=jnp.int32)  # [G, T, k, E]
  by_rank = onehot.transpose(0, 2, 1, 3).reshape(g, k * t, n_experts)  # choice-major order
  slot = (jnp.cumsum(by_rank, axis=1) - 1).reshape(g, k, t, n_experts).transpose(0, 2, 1, 3)
  slot = (slot * onehot).sum(-1)  # [G, T, k]: place of (token, choice) in its expert's queue
  kept = slot < capacity
  slots = jax.nn.one_hot(jnp.where(kept, slot, capacity), capacity, dtype=jnp.float32)  # dropped: 0s
  chosen = onehot.astype(jnp.float32)
  dispatch = jnp.einsum("gtke,gtkc->gtec", chosen, slots)
  combine = jnp.einsum("gtke,gtkc->gtec", chosen * weights[..., None].astype(jnp.float32), slots)
  return dispatch, combine, kept


class Moe(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f, e = cfg.d_model, cfg.moe_ff, cfg.n_experts
    pdt = jnp.dtype(cfg.param_dtype)
    init = jax.nn.initializers.truncated_normal(stddev=cfg.hidden_init_std)
    self.router = param(init, rngs.params(), (d, e), ("embed", None), jnp.float32)
    if cfg.moe_router == "sigmoid":
      self.router_bias = param(jax.nn.initializers.zeros, rngs.params(), (e,), ("experts",), jnp.float32)
    self.w_in = param(init, rngs.params(), (e, d, f), ("experts", "embed", "mlp"), pdt)
    if cfg.gated:
      self.w_gate = param(init, rngs.params(), (e, d, f), ("experts", "embed", "mlp"), pdt)
    self.w_out = param(jax.nn.initializers.truncated_normal(stddev=cfg.out_init_std), rngs.params(),
                       (e, f, d), ("experts", "mlp", "embed"), pdt)
    if cfg.n_shared_experts:  # DeepSeekMoE: n_s shared experts of width f == one MLP of width n_s · f.
      self.shared = Mlp(dataclasses.replace(cfg, d_ff=cfg.n_shared_experts * f), rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
    cfg, e = self.cfg, self.cfg.n_experts
    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), self.router.get_value())
    logits = constrain(logits, ("batch", "length", None))
    bias = self.router_bias.get_value() if cfg.moe_router == "sigmoid" else None
    weights, experts, probs = route(logits, k=cfg.experts_per_token, router=cfg.moe_router, bias=bias,
                                    renormalize=cfg.moe_renormalize)
    aux = dict(aux_loss=load_balancing_loss(probs, experts, e), z_loss=router_z_loss(logits),
               expert_load=expert_load(experts, e))
    if cfg.capacity_factor > 0:
      y, kept = self._capacity(x, experts, weights)
      aux["dropped_frac"] = 1.0 - kept.mean(dtype=jnp.float32)
    else:
      y = self._dropless(x, experts, weights)
      aux["dropped_frac"] = jnp.zeros((), jnp.float32)
    if cfg.n_shared_experts:
      y = y + self.shared(x)
    return constrain(y, ("batch", "length", "embed")), aux

  def _capacity(self, x, experts, weights):
    cfg, t = self.cfg, x.shape[1]
    cap = expert_capacity(t, cfg.experts_per_token, cfg.capacity_factor, cfg.n_experts)
    dispatch, combine, kept = dispatch_masks(experts, weights, cfg.n_experts, cap)
    dispatch = constrain(dispatch.astype(x.dtype), ("batch", "length", None, None))
    xe = constrain(jnp.einsum("btec,btd->ebcd", dispatch, x), ("experts", "batch", None, "embed"))
    h = jnp.einsum("ebcd,edf->ebcf", xe, weight(self, "w_in", x.dtype))
    if cfg.gated:
      h = _ACT[cfg.activation](jnp.einsum("ebcd,edf->ebcf", xe, weight(self, "w_gate", x.dtype))) * h
    else:
      h = _ACT[cfg.activation](h)
    h = constrain(h, ("experts", "batch", None, "mlp"))
    ye = constrain(jnp.einsum("ebcf,efd->ebcd", h, weight(self, "w_out", x.dtype)),
                   ("experts", "batch", None, "embed"))
    return jnp.einsum("btec,ebcd->btd", combine.astype(x.dtype), ye), kept

  def _dropless(self, x, experts, weights):
    cfg, (b, t, d), k = self.cfg, x.shape, self.cfg.experts_per_token
    flat = experts.reshape(-1)  # [N·k]: expert of each (token, choice), token-major
    order = jnp.argsort(flat, stable=True)  # the pairs grouped by expert, ragged_dot's layout
    sizes = jnp.bincount(flat, length=cfg.n_experts).astype(jnp.int32)
    xs = jnp.take(x.reshape(b * t, d), order // k, axis=0)
    mm = lambda a, name: jax.lax.ragged_dot(a, weight(self, name, x.dtype), sizes)
    h = mm(xs, "w_in")
    h = _ACT[cfg.activation](mm(xs, "w_gate")) * h if cfg.gated else _ACT[cfg.activation](h)
    ys = jnp.zeros((b * t * k, d), x.dtype).at[order].set(mm(h, "w_out"))  # back to (token, choice)
    y = jnp.einsum("nk,nkd->nd", weights.reshape(b * t, k).astype(x.dtype), ys.reshape(b * t, k, d))
    return y.reshape(b, t, d)


def update_router_bias(params, expert_load_per_layer: jax.Array, rate: float):
  """DeepSeek-V3's aux-loss-free balancing, applied outside the gradient after the optimizer step:
  b_e += γ · sign(mean load − load_e) (underloaded experts become likelier to be selected).

  `params` is the pure-dict param tree; its `router_bias` leaves, in tree order (layer order: a stacked
  [layers, E] leaf under scan, else one [E] per MoE layer), take rows of `expert_load_per_layer`
  [n_moe_layers, E] in turn. `rate` may be a traced scalar (0 to skip a step).
  """
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  out, row = [], 0
  for path, leaf in paths:
    if getattr(path[-1], "key", None) == "router_bias":
      n = leaf.shape[0] if leaf.ndim == 2 else 1
      load = expert_load_per_layer[row:row + n].reshape(leaf.shape)
      row += n
      move = jnp.nan_to_num(jnp.sign(load.mean(-1, keepdims=True) - load))  # NaN load: stay put
      leaf = leaf + (rate * move).astype(leaf.dtype)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)
