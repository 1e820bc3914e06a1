"""Weight-only int8 / int4 quantization of a trained `Transformer` for inference.

    model, meta = model.load.load_model("runs/tiny", quantize="int8")      # or "int4"
    model = quantize_model(model, "int4", group_size=128, embeddings=True)  # in place; returns the model
    param_bytes(model)                                                    # bytes of the stored arrays

Library module, no entry point; held-out bits-per-byte of a quantized checkpoint is measured by
`python -m serve.quant_report` (evaluation needs `data/` and `train/`, which `model/` may not import).

Schemes (symmetric absmax, round to nearest; no zero points, no calibration data):
- int8: one fp32 scale per output channel, scale = absmax / 127 over the whole input (contraction) dim,
  so ±absmax rounds to ±127 and every element is off by at most scale / 2.
- int4: one fp32 scale per output channel and per group of `group_size` input rows (default 128; the
  whole dim if smaller), scale = absmax / 7, codes in the symmetric range [-7, 7]. The 16th code (-8)
  stays unused: with absmax / 8 the +absmax side would clip to 7 (error up to a whole step), and an
  asymmetric grid can't map both ±absmax to codes. Two codes share one int8 byte (adjacent input rows,
  low nibble first): on CPU a `jnp.int4` array still takes one byte per element
  (`on_device_size_in_bytes`, jax 0.10.2), so packing is what halves memory. The input dim is padded
  with zeros to a multiple of the group (d_ff = 704 with groups of 128 → 768 rows).

What is quantized: every matmul weight — attention q/k/v/o, MLP in/gate/out, an untied lm_head — and,
with `embeddings=True`, the token embedding (for tied models it is also the output head; it is scaled
per vocabulary row, which is per output channel of the head and per token of the lookup). Norms, biases
and learned position tables stay in their param dtype (< 1% of the bytes).

Storage: the param `w` becomes an int8 `nnx.Param` of shape [(layers,) K', N] (the weight reshaped to
input rows × output columns, K' = K or K_padded / 2 when packed) whose `quant` metadata (a `QuantSpec`,
part of the graph definition, so jit specializes on it) records how to undo the reshape; its scales are
the sibling param `w_scale` [(layers,) groups, N]. Layers read weights through `weight(module, name,
dtype)`, which dequantizes inside the jitted forward, one layer at a time, so only the small quantized
arrays are resident. Unquantized params take the very same ops as before (training stays bit-identical).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

MODES = ("int8", "int4")
SCALE_SUFFIX = "_scale"
_QMAX = {"int8": 127, "int4": 7}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How a quantized param's codes map back to its weight (hashable: it lives in the graphdef)."""
  mode: str  # "int8" or "int4"
  shape: tuple[int, ...]  # the weight's shape per layer (without the stacked `layers` axis).
  in_axes: tuple[int, ...]  # contraction (input) axes of `shape`; groups run along them.
  group: int  # input rows sharing one scale (K for int8).

  @property
  def k(self) -> int:
    return math.prod(self.shape[a] for a in self.in_axes)

  @property
  def perm(self) -> tuple[int, ...]:
    """Axis order that puts the input axes first (then the weight is a [K, N] matrix)."""
    return self.in_axes + tuple(a for a in range(len(self.shape)) if a not in self.in_axes)


# --- int4 packing ----------------------------------------------------------------------------------

def pack_int4(codes: jax.Array) -> jax.Array:
  """int8 codes in [-8, 7], [..., 2m, N] → [..., m, N] int8: row 2i in the low nibble, 2i+1 in the high."""
  lo, hi = codes[..., 0::2, :], codes[..., 1::2, :]
  return (lo & 0x0F) | (hi << 4)  # hi << 4 stays in int8: [-8, 7] · 16 = [-128, 112].


def unpack_int4(packed: jax.Array) -> jax.Array:
  """Inverse of `pack_int4`: arithmetic right shifts of int8 sign-extend each nibble."""
  lo = (packed << 4) >> 4
  hi = packed >> 4
  out = jnp.stack([lo, hi], axis=-2)  # [..., m, 2, N]
  return out.reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1])


# --- quantize / dequantize arrays --------------------------------------------------------------------

def _group_size(mode: str, k: int, group_size: int) -> int:
  if mode == "int8":
    return k
  g = min(group_size, k)
  return g + (g % 2)  # even, so a group's rows pack into whole bytes.


def quantize_array(w: jax.Array, mode: str, in_axes: tuple[int, ...], *, group_size: int = 128,
                   batch_dims: int = 0) -> tuple[jax.Array, jax.Array, QuantSpec]:
  """w [(batch...), *shape] → (codes int8 [(batch...), K', N], scales fp32 [(batch...), groups, N], spec).

  `in_axes` are the contraction axes of `shape`; `batch_dims` leading axes (stacked layers) are kept."""
  if mode not in MODES:
    raise ValueError(f"quantization mode {mode!r} not in {MODES}")
  if group_size < 1:
    raise ValueError(f"group_size must be ≥ 1, got {group_size}")
  batch, shape = w.shape[:batch_dims], tuple(w.shape[batch_dims:])
  in_axes = tuple(sorted(a % len(shape) for a in in_axes))
  k = math.prod(shape[a] for a in in_axes)
  spec = QuantSpec(mode, shape, in_axes, _group_size(mode, k, group_size))
  perm = tuple(range(batch_dims)) + tuple(batch_dims + a for a in spec.perm)
  mat = jnp.transpose(w.astype(jnp.float32), perm).reshape(*batch, k, -1)  # [..., K, N]
  n_groups = -(-k // spec.group)
  pad = n_groups * spec.group - k
  if pad:  # zero rows quantize to code 0 and are sliced off again by `dequantize_array`.
    mat = jnp.pad(mat, [(0, 0)] * batch_dims + [(0, pad), (0, 0)])
  grouped = mat.reshape(*batch, n_groups, spec.group, mat.shape[-1])
  qmax = _QMAX[mode]
  absmax = jnp.max(jnp.abs(grouped), axis=-2, keepdims=True)
  # An all-zero group gets scale 1 (codes 0): no division by zero, exact round trip.
  scale = jnp.where(absmax > 0, absmax / qmax, 1.0)
  codes = jnp.clip(jnp.round(grouped / scale), -qmax, qmax).astype(jnp.int8)
  codes = codes.reshape(*batch, n_groups * spec.group, mat.shape[-1])
  if mode == "int4":
    codes = pack_int4(codes)
  return codes, scale[..., 0, :], spec


def _unflatten(mat: jax.Array, spec: QuantSpec) -> jax.Array:
  """[(batch...), K_padded, N] → [(batch...), *spec.shape]: drops padding rows, undoes the transpose."""
  batch = mat.shape[:-2]
  permuted = mat[..., :spec.k, :].reshape(*batch, *(spec.shape[a] for a in spec.perm))
  inverse = tuple(spec.perm.index(a) for a in range(len(spec.shape)))
  return jnp.transpose(permuted, tuple(range(len(batch))) + tuple(len(batch) + a for a in inverse))


def dequantize_array(codes: jax.Array, scales: jax.Array, spec: QuantSpec) -> jax.Array:
  """Inverse of `quantize_array` (up to rounding): fp32 weight [(batch...), *spec.shape]."""
  if spec.mode == "int4":
    codes = unpack_int4(codes)
  *batch, rows, n = codes.shape
  grouped = codes.reshape(*batch, rows // spec.group, spec.group, n).astype(jnp.float32)
  return _unflatten((grouped * scales[..., :, None, :]).reshape(*batch, rows, n), spec)


def element_scales(scales: jax.Array, spec: QuantSpec) -> jax.Array:
  """The scale of each element of the weight, shaped like `dequantize_array`'s result (for checking
  the bound |w − deq(q(w))| ≤ scale / 2)."""
  *batch, n_groups, n = scales.shape
  rows = jnp.broadcast_to(scales[..., :, None, :], (*batch, n_groups, spec.group, n))
  return _unflatten(rows.reshape(*batch, n_groups * spec.group, n), spec)


# --- the model-side hook ---------------------------------------------------------------------------

def weight(module: nnx.Module, name: str, dtype=None) -> jax.Array:
  """The param `name` of `module` as an array (in `dtype` if given), dequantized when it is stored
  quantized. For a plain param this is exactly `param.get_value()` (`.astype(dtype)`)."""
  var = getattr(module, name)
  spec = var.get_metadata().get("quant")
  if spec is None:
    value = var.get_value()
  else:
    value = dequantize_array(var.get_value(), getattr(module, name + SCALE_SUFFIX).get_value(), spec)
  return value if dtype is None else value.astype(dtype)


def _targets(embeddings: bool) -> dict[type, dict[str, tuple[int, ...]]]:
  """Module class → {param name: its contraction axes}. Imported here, not at the top, because the
  layers import `weight` from this module."""
  from model.layers.attention import Attention
  from model.layers.mlp import Mlp
  from model.transformer import Transformer
  top = {"lm_head": (0,)}  # [embed, vocab]
  if embeddings:
    top["embed"] = (1,)  # [vocab, embed]: per vocabulary row; the tied head contracts over embed.
  return {Attention: {"wq": (0,), "wk": (0,), "wv": (0,), "wo": (0, 1)},  # [d, n, h] ... [n, h, d]
          Mlp: {"w_in": (0,), "w_gate": (0,), "w_out": (0,)},  # [d, f], [d, f], [f, d]
          Transformer: top}


def quantize_model(model: nnx.Module, mode: str, *, group_size: int = 128, embeddings: bool = True):
  """Replaces the matmul weights of `model` (in place) by int8 codes + fp32 scales; returns `model`."""
  if mode not in MODES:
    raise ValueError(f"quantize={mode!r} not in {MODES}")
  targets = _targets(embeddings)
  modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]
  for module in modules:
    for name, in_axes in targets.get(type(module), {}).items():
      var = getattr(module, name, None)
      if not isinstance(var, nnx.Param) or var.get_metadata().get("quant") is not None:
        continue  # absent (e.g. no gate, tied head) or already quantized.
      axes = tuple(var.get_metadata().get("axes", ()))
      stacked = 1 if axes[:1] == ("layers",) else 0  # scan_layers: a leading per-layer axis.
      codes, scales, spec = quantize_array(var.get_value(), mode, in_axes, group_size=group_size,
                                           batch_dims=stacked)
      # No logical axes beyond `layers`: quantized weights are replicated (serving one device).
      new_axes = ("layers",) * stacked + (None, None)
      setattr(module, name, nnx.Param(codes, axes=new_axes, quant=spec))
      setattr(module, name + SCALE_SUFFIX, nnx.Param(scales, axes=new_axes))
  return model


def quantized_params(model: nnx.Module) -> list[nnx.Param]:
  """The params of `model` stored quantized (those with a `quant` spec)."""
  variables = jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [v for v in variables if v.get_metadata().get("quant") is not None]


def param_bytes(model: nnx.Module) -> int:
  """Bytes of every stored param array (codes and scales included), as held on the device."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return sum(int(x.size) * x.dtype.itemsize for x in leaves)
