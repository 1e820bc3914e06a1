"""Logical axis names for params and activations, and the hook that lets `train/` shard them.

Model code only ever names *logical* axes (`embed`, `mlp`, `q_heads`, `batch`, ...). Params carry
their names as the `axes` metadata of each `nnx.Param`; activations pass through `constrain(x, names)`,
which is a no-op unless the trainer installed a constraint function with `activation_constraints`
(it maps names to mesh axes through its one rules table). This keeps every device and mesh
decision out of `model/`.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Sequence

import jax
from flax import nnx

Axes = tuple[str | None, ...]

_CONSTRAIN: contextvars.ContextVar[Callable[[jax.Array, Axes], jax.Array] | None] = (
    contextvars.ContextVar("activation_constraint", default=None))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  fn = _CONSTRAIN.get()
  return x if fn is None else fn(x, tuple(axes))


@contextlib.contextmanager
def activation_constraints(fn: Callable[[jax.Array, Axes], jax.Array] | None):
  """Installs `fn(x, logical_axes) -> x` for activations traced inside this context."""
  token = _CONSTRAIN.set(fn)
  try:
    yield
  finally:
    _CONSTRAIN.reset(token)


def param(init: Callable, key: jax.Array, shape: Sequence[int], axes: Sequence[str | None],
          dtype) -> nnx.Param:
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(key, tuple(shape), dtype), axes=tuple(axes))


def param_axes(variable: nnx.Variable) -> Axes:
  """Logical axes of a param; ('layers', ...) when it is stacked for scan."""
  return tuple(variable.get_metadata().get("axes", (None,) * variable.get_value().ndim))
