"""The mesh and the one table that maps logical axis names to mesh axes.

Model code names logical axes only (see `model/axes.py`); this table decides the layout. Rules are
tried in order and a mesh axis is used at most once per array (the MaxText/flax convention), so
`embed` is sharded over `fsdp` in a weight [embed, mlp] but replicated in an activation
[batch, length, embed] whose batch already took `fsdp`. A dimension that does not divide by its mesh
axes' size is replicated instead (e.g. 1 KV head under tensor=4), so every preset runs on every mesh.
`--config.mesh.rules='(("mlp", None),)'` prepends overrides: changing a layout never edits the model.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis or axes); first matching unused entry wins.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),  # ZeRO-3 style: params and optimizer state split over fsdp.
    ("layers", None),
    ("length", None),
    ("head_dim", None),
)


def make_mesh(mesh_cfg: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices not divisible by fixed axes product {known}")
    sizes[fill[0]] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # non-TPU topologies mesh_utils can't reason about: plain row-major order.
    arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, MESH_AXES)


def rules_for(mesh_cfg: ConfigDict) -> tuple:
  extra = tuple(tuple(r) for r in (mesh_cfg.rules or ()))
  return extra + RULES


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
  """Sharding of a [batch, length] input array (batch over data×fsdp)."""
  return named(("batch", "length"), shape, mesh, rules)
