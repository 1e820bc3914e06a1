"""The mesh and the one table that maps logical axis names to mesh axes.

Model code names logical axes only (see `model/axes.py`); this table decides the layout. Rules are
tried in order and a mesh axis is used at most once per array (the MaxText/flax convention), so
`embed` is sharded over `fsdp` in a weight [embed, mlp] but replicated in an activation
[batch, length, embed] whose batch already took `fsdp`. A dimension that does not divide by its mesh
axes' size is replicated instead (e.g. 1 KV head under tensor=4), so every preset runs on every mesh.
`--config.mesh.rules='(("mlp", None),)'` prepends overrides: changing a layout never edits the model.

What each mesh axis does under these rules (sizes from `--config.mesh.<axis>=N`, any combination):
  data      batch split, params replicated (DP); `mesh.zero1=true` also splits the optimizer state (ZeRO-1)
  fsdp      batch split, params/grads/optimizer state split on `embed` (ZeRO-3), gathered per layer
  tensor    Megatron TP: q/k/v and MLP in/gate split by output (heads, mlp), wo and MLP out by input:
            one all-reduce per attention and per MLP each way; vocab-parallel embedding and logits
  sequence  activations split along `length`; attention gathers K/V (`kv_length`), queries stay split
  stage     the scanned layer stack split into pipeline stages (`train/pipeline.py`)
  expert    MoE experts split (and the batch of the dense parts)
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

# Outermost first: `data` (and `stage`) cross slow links (DCN / InfiniBand) best, `tensor` needs the
# fastest (ICI / NVLink), so it is innermost, where `create_device_mesh` puts neighbouring devices.
MESH_AXES = ("data", "stage", "fsdp", "expert", "sequence", "tensor")

# (logical axis, mesh axis or axes); first matching unused entry wins.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Batch also over `expert`: the dense parts of an MoE model then split their tokens over it
    # instead of repeating the same compute on every expert shard.
    ("batch", ("data", "fsdp", "expert")),
    ("experts", "expert"),  # MoE expert weights [experts, ...] and expert-side activations.
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),  # ZeRO-3 style: params and optimizer state split over fsdp.
    # Pipeline: layer l of the scanned stack lives on stage l // (n_layers / stages) (train/pipeline.py).
    ("layers", "stage"),
    # Sequence (context) parallelism: activations split along the sequence; attention all-gathers
    # K/V, whose sequence axis is `kv_length` (each shard's queries attend to every key).
    ("length", "sequence"),
    ("kv_length", None),
    ("head_dim", None),
)

# ZeRO-1 (`mesh.zero1`): params and grads stay replicated over `data`, the optimizer state (Adam's two
# moments: 2/3 of a step's fp32 state) is split over it too. `fsdp` first, so an optimizer shard is a
# slice of its param's fsdp shard: the update needs no resharding, only an all-gather of the new params.
ZERO1_OPT_RULES = (("embed", ("fsdp", "data")),)


def mesh_shape(mesh_cfg: ConfigDict, n_devices: int) -> dict[str, int]:
  """Axis sizes of the mesh over `n_devices` (the one -1 axis filled), in `MESH_AXES` order."""
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if n_devices % known:
      raise ValueError(f"mesh: {n_devices} devices not divisible by fixed axes product {known}")
    sizes[fill[0]] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {n_devices}")
  return dict(zip(MESH_AXES, sizes))


def make_mesh(mesh_cfg: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = list(mesh_shape(mesh_cfg, len(devices)).values())
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # non-TPU topologies mesh_utils can't reason about: plain row-major order.
    arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, MESH_AXES)


def rules_for(mesh_cfg: ConfigDict) -> tuple:
  extra = tuple(tuple(r) for r in (mesh_cfg.rules or ()))
  return extra + RULES


def opt_rules_for(mesh_cfg: ConfigDict, rules) -> tuple:
  """Rules for the optimizer state's moments: the params' rules, plus ZeRO-1's with `mesh.zero1`."""
  return (ZERO1_OPT_RULES + tuple(rules)) if mesh_cfg.get("zero1", False) else tuple(rules)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> P:
  used: set[str] = set()
  out = []
  for name, dim in zip(axes, shape):
    assigned = None
    for rule_name, mesh_axes in rules:
      if rule_name != name or name is None:
        continue
      if mesh_axes is None:
        break
      group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      group = tuple(a for a in group if a not in used and mesh.shape.get(a, 1) > 1)
      if group and dim % math.prod(mesh.shape[a] for a in group) == 0:
        assigned = group[0] if len(group) == 1 else group
        used.update(group)
        break
    out.append(assigned)
  return P(*out)


def named(axes, shape, mesh: Mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def activation_constraint(mesh: Mesh, rules):
  """The function installed with `model.axes.activation_constraints` while tracing the step."""
  def fn(x, axes):
    return jax.lax.with_sharding_constraint(x, named(axes, x.shape, mesh, rules))
  return fn


def batch_sharding(shape: Sequence[int], mesh: Mesh, rules) -> NamedSharding:
  """Sharding of a [batch, length] input array (batch over data×fsdp×expert)."""
  return named(("batch", "length"), shape, mesh, rules)
