"""Paged decode attention kernels (`model/kernels/paged_gpu.py`, `paged_tpu.py`) on CPU.

    python -m pytest tests/test_kernels_paged.py -x -q

- Both kernels in interpret mode (Triton `interpret=True`, Mosaic `force_tpu_interpret_mode()`) match the
  XLA fallback `paged.attend` at fp32 1e-5: scattered block tables, GQA (4 query heads on 2 kv heads),
  rows of different lengths (not page multiples) and one padding row (zeros), with and without a
  sliding window, with and without the layers axis (scan_layers' stacked pages + a traced `layer`).
- int8 pages with per-token (GPU) and per-page (TPU) scales match `paged.attend` on the dequantized pages.
- The registered `pallas` paged attention: T > 1 is `paged.attend` exactly; T == 1 is the kernel.
- Both kernels lower for ("cuda",) / ("tpu",) at a serving shape (32 rows, 32 query / 8 kv heads,
  head_dim 128, 16-token pages, 2k context, bf16 and int8 pages, stacked layers), one Pallas custom call
  each and no XLA gather of pages; with libtpu the TPU kernel AOT-compiles for a v5e (Mosaic's checks).
  No CUDA device here: Triton's own compile of the GPU kernel is not run.
- The serving engine on a tiny random model gives the same greedy tokens with attention=pallas as xla.
"""
import dataclasses
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from model.kernels import paged_attention as registered
from model.kernels import paged_gpu, paged_tpu
from model.layers import paged
from tests.conftest import require

K, P, S, H, N = 2, 16, 8, 32, 4  # GQA 2:1; 16 pages of 8 tokens.
TABLES = np.asarray([[5, 9, 2, 14, 3], [3, 1, 12, 7, 0], [15, 4, 0, 0, 0], [6, 11, 8, 0, 0]], np.int32)
LENGTHS = np.asarray([37, 11, 0, 24], np.int32)  # 37, 11: mid-page; 0: padding row; 24: a page boundary.


def _gpu(*args, **kw):
  return paged_gpu.paged_attention(*args, pages_per_block=2, interpret=True, **kw)


def _tpu(*args, **kw):
  with pltpu.force_tpu_interpret_mode():
    return paged_tpu.paged_attention(*args, **kw)


KERNELS = {"gpu": _gpu, "tpu": _tpu}


def _inputs(layers=None, seed=0):
  r = np.random.default_rng(seed)
  lead = () if layers is None else (layers,)
  kp, vp = (jnp.asarray(r.normal(size=lead + (K, P, S, H)), jnp.float32) for _ in range(2))
  q = jnp.asarray(r.normal(size=(len(LENGTHS), N, H)), jnp.float32)
  return q, kp, vp, jnp.asarray(TABLES), jnp.asarray(LENGTHS)


def _reference(q, kp, vp, tables, lengths, **kw):
  return paged.attend(q[:, None], kp, vp, tables, (lengths - 1)[:, None], **kw)[:, 0]


def _check(got, want):
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert not got[LENGTHS == 0].any()  # the padding row is zeros.


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("layers,window", [(None, 0), (2, 9)], ids=["plain", "layers_window"])
def test_kernel_matches_xla_fallback(kernel, layers, window):
  q, kp, vp, tables, lengths = _inputs(layers)
  kw = {"sliding_window": window}
  if layers is not None:  # a traced layer index, as under scan_layers.
    got = jax.jit(lambda layer: KERNELS[kernel](q, kp, vp, tables, lengths, layer=layer, **kw))(1)
    kw["layer"] = 1
  else:
    got = KERNELS[kernel](q, kp, vp, tables, lengths, **kw)
  assert got.shape == q.shape and got.dtype == q.dtype
  _check(got, _reference(q, kp, vp, tables, lengths, **kw))


@pytest.mark.parametrize("kernel,per_page", [("gpu", False), ("tpu", True)])
def test_int8_pages_match_dequantized_reference(kernel, per_page):
  q, kp, vp, tables, lengths = _inputs(seed=1)
  axes = (-1,) if per_page else ()  # absmax per page ([K, P]) or per token ([K, P, S]).

  def quantize(x):
    amax = jnp.abs(x).max(axis=-1)
    amax = amax.max(axis=axes) if axes else amax
    scale = amax / 127.0
    full = scale[..., None] if per_page else scale
    return jnp.round(x / full[..., None]).astype(jnp.int8), scale, full

  (k8, ks, kfull), (v8, vs, vfull) = quantize(kp), quantize(vp)
  got = KERNELS[kernel](q, k8, v8, tables, lengths, k_scales=ks, v_scales=vs, sliding_window=20)
  want = _reference(q, k8 * kfull[..., None], v8 * vfull[..., None], tables, lengths, sliding_window=20)
  _check(got, want)
  with pytest.raises(ValueError, match="int8 pages need k_scales"):
    KERNELS[kernel](q, k8, v8, tables, lengths)


def test_registered_kernel_decodes_with_pallas_and_prefills_with_attend():
  assert paged.PAGED_ATTENTION["pallas"] is paged._pallas and "auto" in paged.PAGED_ATTENTION
  q, kp, vp, tables, lengths = _inputs()
  pos = jnp.asarray([[30, 31, 32, 33, 34, 35, 36]] * 4, jnp.int32).at[2].set(-1)
  chunk = jnp.asarray(np.random.default_rng(2).normal(size=(4, 7, N, H)), jnp.float32)
  np.testing.assert_array_equal(registered(chunk, kp, vp, tables, pos, sliding_window=9),
                                paged.attend(chunk, kp, vp, tables, pos, sliding_window=9))
  got = paged.PAGED_ATTENTION["pallas"](q[:, None], kp, vp, tables, (lengths - 1)[:, None])[:, 0]
  _check(got, _reference(q, kp, vp, tables, lengths))
  with pytest.raises(ValueError, match="page_size 12 must be"):  # Triton tiles: powers of two.
    odd = jnp.zeros((K, 4, 12, H), jnp.float32)
    _gpu(q, odd, odd, tables % 4, lengths)
  # auto on CPU is the XLA fallback, bit for bit.
  np.testing.assert_array_equal(paged.PAGED_ATTENTION["auto"](chunk, kp, vp, tables, pos),
                                paged.attend(chunk, kp, vp, tables, pos))


def _serving_args(quantized=False, sharding=None):
  """Abstract (q, k_pages, v_pages, tables, lengths, layer(, k_scales, v_scales)) of a decode step: 32 rows,
  32 query / 8 kv heads, head_dim 128, 2k context of 16-token pages, 2 stacked layers, bf16 (int8 pages)."""
  B, NQ, KV, HD, PS, M, L = 32, 32, 8, 128, 16, 128, 2
  sd = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  pages = sd((L, KV, 32 * M + 1, PS, HD), jnp.int8 if quantized else jnp.bfloat16)
  args = [sd((B, NQ, HD), jnp.bfloat16), pages, pages, sd((B, M), jnp.int32), sd((B,), jnp.int32),
          sd((), jnp.int32)]
  return args + [sd(pages.shape[:-1], jnp.float32)] * 2 if quantized else args


def _decode_fn(module):
  def fn(q, k, v, tables, lengths, layer, *scales):
    kw = dict(zip(("k_scales", "v_scales"), scales))
    return module.paged_attention(q, k, v, tables, lengths, layer=layer, sliding_window=1024, **kw)
  return fn


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "int8"])
@pytest.mark.parametrize("platform,module,call", [("cuda", paged_gpu, "__gpu$xla.gpu.triton"),
                                                  ("tpu", paged_tpu, "tpu_custom_call")])
def test_lowers_at_serving_shape(platform, module, call, quantized):
  text = jax.jit(_decode_fn(module)).trace(*_serving_args(quantized)).lower(
      lowering_platforms=(platform,)).as_text()
  assert re.findall(r"custom_call @(\S+)\(", text).count(call) == 1
  assert "paged_decode" in text
  # The pool is read in place: no gather of pages (the XLA fallback's) in the module.
  assert "gather" not in text


def test_compiles_for_tpu():
  """AOT compile for a TPU v5e chip through libtpu: Mosaic's own layout passes check the block shapes
  (whole [16, 128] pages, [4, 128] query groups, [1, 16] scale rows) and the in-kernel int8 casts."""
  require(importlib.util.find_spec("libtpu") is not None, "libtpu not installed (pip install -e '.[tpu]')")
  from train.plan import tpu_topology_devices
  sharding = jax.sharding.SingleDeviceSharding(tpu_topology_devices("v5e:2x2")[0])
  for quantized in (False, True):
    jax.jit(_decode_fn(paged_tpu)).lower(*_serving_args(quantized, sharding)).compile()


def test_engine_greedy_tokens_with_pallas_equal_xla(monkeypatch):
  from serve.api import SamplingParams
  from serve.engine import Engine
  from tests.test_serve_engine import CFG, random_model
  traced = []  # the decode step must go through the kernel (traced once per jitted shape).
  kernel = paged_gpu.paged_attention
  monkeypatch.setattr(paged_gpu, "paged_attention", lambda *a, **kw: traced.append(1) or kernel(*a, **kw))
  cfg = dataclasses.replace(CFG, d_model=32, n_layers=2, sliding_window=11)
  prompts = [[int(t) for t in np.random.default_rng(3).integers(2, 128, n)] for n in (5, 19)]
  out = {}
  for name in ("xla", "pallas"):
    model = random_model(dataclasses.replace(cfg, attention=name), seed=4)
    engine = Engine(model, eos_id=-1, block_size=8, num_blocks=12, max_slots=2, prefill_chunk=16)
    out[name] = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0))
  assert out["pallas"] == out["xla"] and all(len(r) == 6 for r in out["xla"])
  assert traced
