"""Tokenizers that arrive with imported models: a Hugging Face `tokenizer.json`, or a SentencePiece model
with another project's layout (Llama 2's `tokenizer.model`).

Library module, no entry point. `data.tokenizer.tokenizer_from_meta(meta)` builds one of these (or the
project's own `Tokenizer`) from a checkpoint's meta; `python -m model.hf import` puts the bytes there.
Both classes offer what the sampler and the evaluation harness use from `data.tokenizer.Tokenizer`:
`encode`, `encode_batch`, `decode`, `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `to_bytes`, `sha256`.

`bos_id` is the token put before every sequence. A tokenizer whose own post-processor adds a BOS
(Llama 2/3: `<s>`, `<|begin_of_text|>`) uses that one; one that adds none (Qwen2/3) gets its
end-of-text token instead, which is also what its pretraining
used between documents and what lm-evaluation-harness prepends for rolling log-likelihoods
(`prefix_token_id` = bos or else eos). `encode` itself never adds special tokens.
"""
from __future__ import annotations

import abc
import functools
import hashlib
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from data.errors import DataError


class _Base(abc.ABC):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  eos_ids: tuple[int, ...]  # every id that ends generation (Llama 3 instruct: <|eot_id|> and others).
  _bytes: bytes

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    ids = self._encode(text)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False,
                   num_threads: int = -1) -> list[list[int]]:
    del num_threads
    return [self.encode(t, bos=bos, eos=eos) for t in texts]

  def _check_ids(self, ids: Iterable[int]) -> list[int]:
    out = [int(i) for i in ids]
    for i in out:
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
    return out

  def to_bytes(self) -> bytes:
    return self._bytes

  @functools.cached_property
  def sha256(self) -> str:
    return hashlib.sha256(self._bytes).hexdigest()

  @abc.abstractmethod
  def _encode(self, text: str) -> list[int]:
    """Ids of `text`, no special tokens added."""


def _special_id(special: dict, name: str) -> int | None:
  value = special.get(name)
  if isinstance(value, list):  # config.json may list several eos ids; the first is the canonical one.
    value = value[0] if value else None
  return None if value is None else int(value)


class HFTokenizer(_Base):
  """A Hugging Face `tokenizers` tokenizer from `tokenizer.json` bytes (the fast tokenizer transformers uses)."""

  def __init__(self, data: bytes, special: dict | None = None, name: str = "tokenizer.json"):
    try:
      from tokenizers import Tokenizer as _HF  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise DataError("this checkpoint's tokenizer is a Hugging Face tokenizer.json: "
                      "pip install tokenizers") from None
    special = dict(special or {})
    self._bytes = bytes(data)
    try:
      self._tok = _HF.from_str(self._bytes.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON.
      raise DataError(f"{name}: not a Hugging Face tokenizer.json: {e}") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    eos = _special_id(special, "eos_token_id")
    if eos is None:
      raise DataError(f"{name}: no eos_token_id given (config.json / generation_config.json)")
    eos_all = special.get("eos_token_id")
    self.eos_id = eos
    self.eos_ids = tuple(int(i) for i in eos_all) if isinstance(eos_all, list) else (eos,)
    # Which BOS the tokenizer itself adds: encode with and without special tokens and compare.
    probe = "a"
    plain = self._tok.encode(probe, add_special_tokens=False).ids
    full = self._tok.encode(probe, add_special_tokens=True).ids
    added = full[:len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []
    bos = _special_id(special, "bos_token_id")
    self.bos_id = added[0] if added else eos
    if bos is not None and added and added[0] != bos:
      raise DataError(f"{name}: the tokenizer adds token {added[0]} but bos_token_id is {bos}")
    pad = _special_id(special, "pad_token_id")
    self.pad_id = eos if pad is None else pad
    self._skip = frozenset(self._tok.get_added_tokens_decoder())  # specials and added tokens.

  def _encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False,
                   num_threads: int = -1) -> list[list[int]]:
    del num_threads
    pre, post = ([self.bos_id] if bos else []), ([self.eos_id] if eos else [])
    return [pre + e.ids + post for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special tokens are dropped (skip_special_tokens, as transformers' decode does)."""
    return self._tok.decode(self._check_ids(ids), skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def __repr__(self) -> str:
    return f"HFTokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


class SentencePieceTokenizer(_Base):
  """Any SentencePiece model (its own normalization and dummy prefix), e.g. Llama 2's `tokenizer.model`."""

  def __init__(self, data: bytes, special: dict | None = None, name: str = "tokenizer.model"):
    special = dict(special or {})
    self._bytes = bytes(data)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._bytes)
    except (RuntimeError, OSError) as e:
      raise DataError(f"{name}: not a SentencePiece model: {e}") from None
    sp = self._sp
    self.vocab_size = sp.get_piece_size()
    eos = _special_id(special, "eos_token_id")
    self.eos_id = eos if eos is not None else sp.eos_id()
    bos = _special_id(special, "bos_token_id")
    self.bos_id = bos if bos is not None else sp.bos_id()
    if self.eos_id < 0 or self.bos_id < 0:
      raise DataError(f"{name}: the model defines no bos/eos piece and none was given")
    eos_all = special.get("eos_token_id")
    self.eos_ids = tuple(int(i) for i in eos_all) if isinstance(eos_all, list) else (self.eos_id,)
    pad = _special_id(special, "pad_token_id")
    self.pad_id = pad if pad is not None else (sp.pad_id() if sp.pad_id() >= 0 else self.eos_id)

  def _encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    keep = [i for i in self._check_ids(ids) if not self._sp.is_control(i)]
    return self._sp.decode(keep)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
