"""LoRA (Hu et al. 2021, arXiv:2106.09685) as a transform of the params pure dict.

The model is never edited: adapters live in their own pure dict and are folded into the frozen base
weights before each forward, W' = W + (alpha / r) · A B, so every trainer uses the plain model and
only differentiates / optimizes the adapters:

    cfg = LoraConfig(rank=8, alpha=16.0, targets=("attn",))
    lora = lora_lib.init(base, axes, cfg, key)                 # {"blocks": {"attn": {"wq": {"a", "b"}}}}
    loss = lambda lora: loss_fn(setup.model(lora_lib.apply(base, lora, cfg)), batch)
    grads = jax.grad(loss)(lora)                               # base stays a constant
    final = lora_lib.merge(base, lora, cfg)                    # plain params, saved like any other

Layout of an adapter: a weight is einsum-shaped [*lead, *fan_in, *fan_out] where `lead` is the scan
`layers` axis (absent with `scan_layers=False`) and the number of output dims is fixed per leaf name
(`OUT_DIMS`): wq/wk/wv [D, N, H] → A [D, r], B [r, N, H]; wo [N, H, D] → A [N, H, r], B [r, D];
w_in/w_gate [D, F] → A [D, r], B [r, F]; w_out [F, D] → A [F, r], B [r, D]. Stacked layers give
every adapter the leading [L] too, so one scanned block still applies one adapter per layer.

Init follows peft (`LoraLayer.reset_lora_parameters`): A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) — what
`kaiming_uniform_(a=sqrt(5))` gives — and B = 0, so the initial model is the base model bit for bit
and only B gets a gradient on the first step (dL/dA = scale · dL/dW' Bᵀ = 0). Adapters are fp32 even
over a bf16 base: they are small, and their Adam updates must not round away.

Cost of the merged form: per targeted matrix the step builds W' (one weight-sized buffer) in
2·fan_in·r·fan_out FLOPs, and backprop through W' forms the full weight gradient x̄ᵀ·ȳ before
projecting it onto A and B, so step FLOPs are about those of full fine-tuning. What LoRA saves here
is optimizer state and checkpoint size (Adam moments for r·(fan_in + fan_out) instead of
fan_in·fan_out numbers per matrix: 64x fewer for D = F = 4096, r = 32), not compute.

Dropout: peft drops the adapter's *input* per token, which a weight transform cannot express. With
`dropout > 0` and a `key`, `apply` drops rows of A instead (one fan-in feature of the low-rank path,
for the whole batch, independently per layer, kept rows scaled 1 / (1 - p)); with `key=None` (eval,
merge) there is no dropout, the model's own `dropout_key` convention.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

# Output dims of each adaptable weight (the trailing axes that B produces); the rest after the
# leading `layers` axes are fan-in.
OUT_DIMS = {"wq": 2, "wk": 2, "wv": 2, "wo": 1, "w_in": 1, "w_gate": 1, "w_out": 1}
GROUPS = {"attn": ("wq", "wk", "wv", "wo"), "mlp": ("w_in", "w_gate", "w_out"),
          "all": tuple(OUT_DIMS)}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 8
  alpha: float = 16.0  # update scale alpha / rank: retuning rank needs no LR change (Hu et al. §4.1).
  targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")  # leaf names and/or groups attn, mlp, all.
  dropout: float = 0.0

  def __post_init__(self):
    targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
    object.__setattr__(self, "targets", targets)
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"lora: rank must be a positive int, got {self.rank!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora: dropout must be in [0, 1), got {self.dropout}")
    if not targets:
      raise ValueError(f"lora: targets is empty; known: {sorted(OUT_DIMS) + sorted(GROUPS)}")
    unknown = [t for t in targets if t not in OUT_DIMS and t not in GROUPS]
    if unknown:
      raise ValueError(f"lora: unknown targets {unknown}; known leaf names {sorted(OUT_DIMS)}, "
                       f"groups {sorted(GROUPS)}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def leaf_names(self) -> frozenset[str]:
    """Targets with groups expanded to leaf names."""
    return frozenset(n for t in self.targets for n in GROUPS.get(t, (t,)))


# ------------------------------------------------------------------ tree helpers

def _leaves(tree: dict, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
  """(path, leaf) of a nested dict; leaves are anything that is not a dict (arrays, axes tuples)."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, path + (k,))
    else:
      yield path + (k,), v


def _targeted(tree: dict, cfg: LoraConfig) -> list[tuple[tuple, Any]]:
  names = cfg.leaf_names
  found = [(p, v) for p, v in _leaves(tree) if p[-1] in names]
  # A group may name weights a variant lacks (w_gate without a gated MLP); a leaf named on its own
  # must exist, or the user's target list is silently not what runs.
  seen = {p[-1] for p, _ in found}
  missing = [t for t in cfg.targets if t in OUT_DIMS and t not in seen]
  if missing or not found:
    present = sorted({p[-1] for p, _ in _leaves(tree)} & set(OUT_DIMS))
    raise ValueError(f"lora: targets {list(missing or cfg.targets)} match no param; this model has "
                     f"{present}")
  return found


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for k in path:
    if not isinstance(tree, dict) or k not in tree:
      raise ValueError(f"lora: adapter at {'/'.join(map(str, path))} has no base param")
    tree = tree[k]
  return tree


def _split(axes: tuple, name: str) -> tuple[int, int, int]:
  """(lead, fan_in, fan_out) dim counts of a weight from its logical axes."""
  lead = 0
  while lead < len(axes) and axes[lead] == "layers":
    lead += 1
  n_out = OUT_DIMS[name]
  n_in = len(axes) - lead - n_out
  if n_in < 1:
    raise ValueError(f"lora: {name} has axes {axes}: no fan-in dims before its {n_out} output dims")
  return lead, n_in, n_out


# ------------------------------------------------------------------ public API

def lora_axes(axes: dict, cfg: LoraConfig) -> dict:
  """Logical axes of the adapters: A (*layers, *fan_in, None), B (*layers, None, *fan_out).

  The rank axis is unnamed (replicated: r is tiny); fan-in/out keep the base weight's names, so A and
  B are sharded like the rows and columns of W and `apply`'s A·B needs no resharding of W.
  """
  out: dict = {}
  for path, ax in _targeted(axes, cfg):
    lead, n_in, _ = _split(tuple(ax), path[-1])
    ax = tuple(ax)
    _set(out, path, {"a": ax[:lead + n_in] + (None,), "b": ax[:lead] + (None,) + ax[lead + n_in:]})
  return out


def init(params: dict, axes: dict, cfg: LoraConfig, key: jax.Array) -> dict:
  """Adapters for every targeted weight of `params` (arrays or ShapeDtypeStructs: only shapes are read).

  Each leaf's key is folded from its path (crc32), so adding targets never changes existing adapters.
  """
  out: dict = {}
  for path, ax in _targeted(axes, cfg):
    shape = tuple(_get(params, path).shape)
    lead, n_in, _ = _split(tuple(ax), path[-1])
    if len(shape) != len(ax):
      raise ValueError(f"lora: param {'/'.join(map(str, path))} has shape {shape} but axes {ax}")
    fan_in = math.prod(shape[lead:lead + n_in])
    k = jax.random.fold_in(key, zlib.crc32("/".join(map(str, path)).encode()))
    bound = 1.0 / math.sqrt(fan_in)  # peft: kaiming_uniform_(a=sqrt(5)) → gain·sqrt(3/fan_in) = this.
    a = jax.random.uniform(k, shape[:lead + n_in] + (cfg.rank,), jnp.float32, -bound, bound)
    b = jnp.zeros(shape[:lead] + (cfg.rank,) + shape[lead + n_in:], jnp.float32)
    _set(out, path, {"a": a, "b": b})
  return out


def _delta(a: jax.Array, b: jax.Array, w_shape: tuple) -> jax.Array:
  """A·B in fp32 as a [*w_shape] array; batched over the leading `layers` dims."""
  rank = a.shape[-1]
  lead = b.ndim - 1 - (len(w_shape) - (a.ndim - 1))  # b = [*lead, r, *out]; a = [*lead, *in, r].
  a2 = a.reshape(a.shape[:lead] + (-1, rank)).astype(jnp.float32)
  b2 = b.reshape(b.shape[:lead] + (rank, -1)).astype(jnp.float32)
  # HIGHEST: TPU/GPU default fp32 matmuls round inputs to bf16 (or TF32), which would make
  # merge(...) differ from the hand-computed W + scale·AB by ~1e-3 relative.
  d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
  return d.reshape(w_shape)


def apply(params: dict, lora_params: dict, cfg: LoraConfig, *, key: jax.Array | None = None) -> dict:
  """Effective params W + scale·A·B at each adapter's path; every other leaf is passed through as is.

  Differentiable w.r.t. `lora_params` (and `params`, though trainers only differentiate the adapters).
  `key` turns on the adapter dropout described in the module docstring when `cfg.dropout > 0`.
  Input dicts are not mutated: only the dicts along adapter paths are copied.
  """
  out = dict(params)
  for path, ab in _adapters(lora_params):
    w = _get(params, path)
    a, b = ab["a"], ab["b"]
    if key is not None and cfg.dropout > 0:
      k = jax.random.fold_in(key, zlib.crc32("/".join(map(str, path)).encode()))
      keep = jax.random.bernoulli(k, 1.0 - cfg.dropout, a.shape[:-1] + (1,))
      a = jnp.where(keep, a / (1.0 - cfg.dropout), 0.0)
    merged = (w.astype(jnp.float32) + cfg.scale * _delta(a, b, w.shape)).astype(w.dtype)
    node = out
    for k_ in path[:-1]:
      node[k_] = dict(node[k_])  # copy-on-write: the caller's base tree stays untouched.
      node = node[k_]
    node[path[-1]] = merged
  return out


def merge(params: dict, lora_params: dict, cfg: LoraConfig) -> dict:
  """Plain params with the adapters folded in, for saving / serving: exactly W + scale·A·B computed
  in fp32 (HIGHEST matmul precision), cast to each param's dtype; no dropout."""
  return apply(params, lora_params, cfg)


def count(lora_params: dict) -> int:
  """Number of adapter parameters: r·(fan_in + fan_out) per targeted matrix per layer."""
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(lora_params))


def _adapters(lora_params: dict, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
  for k, v in lora_params.items():
    if isinstance(v, dict) and set(v) == {"a", "b"}:
      yield path + (k,), v
    elif isinstance(v, dict):
      yield from _adapters(v, path + (k,))
    else:
      raise ValueError(f"lora: unexpected leaf at {'/'.join(map(str, path + (k,)))}; "
                       "adapters are {'a': ..., 'b': ...} dicts")
