"""Hugging Face safetensors tensors ↔ this project's param tree, and sharded safetensors I/O.

Library module; `python -m model.hf` is the CLI. A torch `nn.Linear` stores [out, in] and this project
stores einsum-shaped [in, ...heads, head_dim] matrices, so every projection is a transpose plus a
reshape (q_proj [N·H, D] → wq [D, N, H]; o_proj [D, N·H] → wo [N, H, D]); norms and embeddings copy as
they are. RoPE needs no permutation: both use the rotate-half layout.

Checkpoints are read one tensor at a time from memory-mapped files (`safe_open`), and a scanned model's
[n_layers, ...] arrays are filled layer by layer, so importing needs about one copy of the model in host
memory, not two. Export writes shards of at most `max_shard_bytes` with transformers' index file.
"""
from __future__ import annotations

import json
import pathlib
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig
from model.transformer import Transformer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class WeightsError(ValueError):
  """Missing, unexpected or wrongly shaped tensors in a checkpoint."""


# (our path inside one block, HF name inside `model.layers.{i}.`, kind). Kinds say how to convert.
_BLOCK = (
    (("attn", "wq"), "self_attn.q_proj.weight", "q"),
    (("attn", "wk"), "self_attn.k_proj.weight", "kv"),
    (("attn", "wv"), "self_attn.v_proj.weight", "kv"),
    (("attn", "wo"), "self_attn.o_proj.weight", "o"),
    (("attn", "bq"), "self_attn.q_proj.bias", "bq"),
    (("attn", "bk"), "self_attn.k_proj.bias", "bkv"),
    (("attn", "bv"), "self_attn.v_proj.bias", "bkv"),
    (("attn", "bo"), "self_attn.o_proj.bias", "copy"),
    (("attn", "q_norm", "scale"), "self_attn.q_norm.weight", "copy"),
    (("attn", "k_norm", "scale"), "self_attn.k_norm.weight", "copy"),
    (("mlp", "w_gate"), "mlp.gate_proj.weight", "t"),
    (("mlp", "w_in"), "mlp.up_proj.weight", "t"),
    (("mlp", "w_out"), "mlp.down_proj.weight", "t"),
    (("mlp", "b_gate"), "mlp.gate_proj.bias", "copy"),
    (("mlp", "b_in"), "mlp.up_proj.bias", "copy"),
    (("mlp", "b_out"), "mlp.down_proj.bias", "copy"),
    (("attn_norm", "scale"), "input_layernorm.weight", "copy"),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", "copy"),
)
_TOP = (
    (("embed",), "model.embed_tokens.weight", "copy"),
    (("final_norm", "scale"), "model.norm.weight", "copy"),
    (("lm_head",), "lm_head.weight", "t"),
)
# Buffers some checkpoints carry that are recomputed, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _to_ours(kind: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  n, k, h, d = cfg.n_heads, cfg.n_kv_heads, cfg.hd, cfg.d_model
  if kind == "q":
    return w.T.reshape(d, n, h)
  if kind == "kv":
    return w.T.reshape(d, k, h)
  if kind == "o":
    return w.T.reshape(n, h, d)
  if kind == "bq":
    return w.reshape(n, h)
  if kind == "bkv":
    return w.reshape(k, h)
  if kind == "t":
    return w.T
  return w


def _to_hf(kind: str, w: np.ndarray) -> np.ndarray:
  if kind in ("q", "kv"):  # [D, N, H] → [N·H, D]
    return w.reshape(w.shape[0], -1).T
  if kind == "o":  # [N, H, D] → [D, N·H]
    return w.reshape(-1, w.shape[-1]).T
  if kind in ("bq", "bkv"):
    return w.reshape(-1)
  if kind == "t":
    return w.T
  return w


def _get(tree: dict, path: tuple) -> object:
  for p in path:
    if not isinstance(tree, dict) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _set(tree: dict, path: tuple, value) -> None:
  for p in path[:-1]:
    tree = tree[p]
  tree[path[-1]] = value


def _entries(cfg: ModelConfig, abstract: dict) -> Iterator[tuple[tuple, str, str, int | None]]:
  """(our path, HF name, kind, layer or None) for every param `abstract` (our pure-dict tree) has."""
  for path, name, kind in _TOP:
    if _get(abstract, path) is not None:
      yield path, name, kind, None
  for i in range(cfg.n_layers):
    for sub, name, kind in _BLOCK:
      path = ("blocks",) + sub if cfg.scan_layers else ("blocks", i) + sub
      if _get(abstract, path) is not None:
        yield path, f"model.layers.{i}.{name}", kind, i


def abstract_params(cfg: ModelConfig) -> dict:
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


class SafetensorsReader:
  """Tensor name → numpy array, lazily, from a directory with one or many `.safetensors` files."""

  def __init__(self, directory: str | pathlib.Path):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._open = safe_open
    self.directory = pathlib.Path(directory)
    index = self.directory / INDEX
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      self.files = {name: self.directory / f for name, f in weight_map.items()}
    else:
      paths = sorted(self.directory.glob("*.safetensors"))
      if not paths:
        raise FileNotFoundError(f"no *.safetensors files (or {INDEX}) in {self.directory}")
      self.files = {}
      for p in paths:
        with safe_open(p, framework="flax") as f:
          self.files.update({name: p for name in f.keys()})
    self._handles: dict[pathlib.Path, object] = {}

  def names(self) -> list[str]:
    return list(self.files)

  def get(self, name: str) -> np.ndarray:
    path = self.files[name]
    if path not in self._handles:
      if not path.is_file():
        raise FileNotFoundError(f"{path} (listed in {INDEX}) does not exist")
      # The "flax" framework reads bf16 (numpy's loader can't); np.asarray keeps it via ml_dtypes.
      self._handles[path] = self._open(path, framework="flax").__enter__()
    return np.asarray(self._handles[path].get_tensor(name))

  def close(self) -> None:
    for h in self._handles.values():
      h.__exit__(None, None, None)
    self._handles.clear()


def params_from_hf(reader: SafetensorsReader, cfg: ModelConfig, *,
                   dtype: str | None = None) -> dict:
  """Our pure-dict param tree (numpy, `dtype` or cfg.param_dtype) from an HF checkpoint reader."""
  abstract = abstract_params(cfg)
  out = jax.tree.map(lambda s: None, abstract)
  available = set(reader.names())
  used: set[str] = set()
  missing = []
  for path, name, kind, layer in _entries(cfg, abstract):
    if name not in available:
      if path == ("lm_head",):
        missing.append(f"{name} (config.json says tie_word_embeddings=false)")
      else:
        missing.append(name)
      continue
    used.add(name)
    spec = _get(abstract, path)
    want = spec.shape[1:] if layer is not None and cfg.scan_layers else spec.shape
    w = reader.get(name)
    try:
      value = _to_ours(kind, w, cfg)
    except ValueError:
      value = None
    if value is None or value.shape != tuple(want):
      raise WeightsError(f"{name}: shape {tuple(w.shape)} does not fit config.json "
                         f"(expected {tuple(want)} after conversion to {'/'.join(map(str, path))})")
    value = value.astype(jnp.dtype(dtype or cfg.param_dtype))
    if layer is not None and cfg.scan_layers:
      if _get(out, path) is None:
        _set(out, path, np.empty(spec.shape, value.dtype))
      _get(out, path)[layer] = value
    else:
      _set(out, path, value)
  if missing:
    raise WeightsError(f"checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:3]}")
  extra = sorted(n for n in available - used if not n.endswith(_IGNORED_SUFFIXES))
  if cfg.tie_embeddings and "lm_head.weight" in extra:
    # Some tied checkpoints also save the head; it must equal the embedding to be dropped safely.
    if not np.array_equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
      raise WeightsError("tie_word_embeddings=true but lm_head.weight differs from embed_tokens")
    extra.remove("lm_head.weight")
  if extra:
    raise WeightsError(f"checkpoint has {len(extra)} tensor(s) this architecture doesn't use, "
                       f"e.g. {extra[:3]}")
  return out


def params_to_hf(params: dict, cfg: ModelConfig, *, dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) for every param, one at a time (`dtype`: float32 / bfloat16 / float16)."""
  for path, name, kind, layer in _entries(cfg, params):
    w = np.asarray(_get(params, path))
    if layer is not None and cfg.scan_layers:
      w = w[layer]
    yield name, np.ascontiguousarray(_to_hf(kind, w).astype(jnp.dtype(dtype)))


def write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], directory: str | pathlib.Path, *,
                      max_shard_bytes: int = 5 * 2**30, metadata: dict | None = None) -> list[pathlib.Path]:
  """Writes `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards + index when larger.

  5 GiB shards by default, as transformers' `save_pretrained`; each shard is written as soon as it
  fills, so memory holds one shard at a time.
  """
  from safetensors.flax import save_file  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  shard: dict[str, np.ndarray] = {}
  shard_bytes = total = 0
  written: list[tuple[pathlib.Path, list[str]]] = []  # temporary names until the shard count is known.

  def flush():
    path = directory / f".shard-{len(written):05d}.safetensors"
    save_file({k: jnp.asarray(v) for k, v in shard.items()}, str(path), metadata=dict(metadata or {}, format="pt"))
    written.append((path, list(shard)))

  for name, w in tensors:
    if shard and shard_bytes + w.nbytes > max_shard_bytes:
      flush()
      shard, shard_bytes = {}, 0
    shard[name] = w
    shard_bytes += w.nbytes
    total += w.nbytes
  flush()
  if len(written) == 1:
    return [written[0][0].rename(directory / SINGLE)]
  n, weight_map, finals = len(written), {}, []
  for i, (path, names) in enumerate(written):
    finals.append(path.rename(directory / f"model-{i + 1:05d}-of-{n:05d}.safetensors"))
    weight_map.update({k: finals[-1].name for k in names})
  (directory / INDEX).write_text(json.dumps(dict(metadata=dict(total_size=total), weight_map=weight_map),
                                            indent=2))
  return finals
