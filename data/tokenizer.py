"""SentencePiece BPE tokenizer: training with the project's fixed settings, and a lossless wrapper.

Library module, no entry point (`data.prepare` trains one on the corpus). Usage:

  train_tokenizer(texts, vocab_size=4096, out_path="tok.model")
  tok = Tokenizer.load("tok.model")
  ids = tok.encode("def f(x):\\n\\treturn x\\n", bos=True, eos=True)
  assert tok.decode(ids) == "def f(x):\\n\\treturn x\\n"

Vocabulary layout (what training produces; `load` checks the pad/bos/eos ids, the chat control
tokens and the byte pieces, so a foreign SentencePiece model fails with a clear message):
  0 <pad>, 1 <s> (bos), 2 </s> (eos), 3 <unk>,
  4..7 chat-turn control tokens <|system|> <|user|> <|assistant|> <|end|>,
  8 "\\n", 9 "\\t" (user-defined: always whole pieces),
  10..265 byte-fallback pieces <0x00>..<0xFF>, then the learned BPE merges.

Why these settings: identity normalization, no dummy prefix and no whitespace collapsing make
`decode(encode(s)) == s` for any text (code indentation, trailing spaces, blank lines, leading spaces);
byte fallback covers every character never seen in training (CJK, emoji) at 1 token per UTF-8 byte;
`allow_whitespace_only_pieces` lets BPE learn indentation runs (4, 8, 12... spaces become single pieces).
SentencePiece trains on lines, so a newline never occurs inside a training sentence: making "\\n" a
user-defined symbol gives it a real piece (otherwise it would cost a byte-fallback token, 1 per line).

Chat-turn tokens are *control* symbols: SentencePiece never produces them from text, so a user typing
"<|user|>" gets ordinary pieces (`<`, `|`, `user`, ...) and can't forge a turn; they are inserted by id
(`special_ids`). One SentencePiece quirk is worked around here: it represents spaces as U+2581 ("▁")
internally and decodes every "▁" piece character to a space, so a literal U+2581 in the input would come
back as " ". `encode` therefore emits a literal U+2581 as its three UTF-8 byte-fallback tokens, which
decode back to U+2581.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data.errors import DataError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
USER_SYMBOLS = ("\n", "\t")
# 4 specials + 4 chat + 2 user symbols + 256 bytes; BPE needs some room beyond that.
RESERVED_PIECES = 4 + len(CHAT_TOKENS) + len(USER_SYMBOLS) + 256
MIN_VOCAB_SIZE = RESERVED_PIECES + 64
_META = "\u2581"  # SentencePiece's whitespace marker "▁"
# Above ~64K chars SentencePiece's BPE encoder of one string slows down (a 5 MB string takes 5x longer
# than the same text line by line); "\n" is a user-defined piece, so BPE never merges across it and
# encoding line by line gives identical ids.
_LINE_SPLIT_CHARS = 1 << 16


def _training_lines(texts: Iterable[str], max_line_chars: int) -> Iterator[str]:
  for text in texts:
    for line in text.split("\n"):
      # SentencePiece skips sentences longer than max_sentence_length; cut instead of losing them.
      for start in range(0, len(line), max_line_chars):
        yield line[start:start + max_line_chars]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | Path, *,
                    max_sentences: int = 2_000_000, seed: int = 0,
                    num_threads: int | None = None) -> Path:
  """Trains a BPE SentencePiece model on `texts` and writes it atomically to `out_path`.

  `max_sentences` caps the lines SentencePiece keeps (a seeded random sample when there are more):
  2M lines of ~40 chars is ~80 MB of text, beyond which BPE training time grows with no gain at a
  vocabulary of a few thousand.
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise DataError(f"vocab_size={vocab_size} is too small: {RESERVED_PIECES} ids are reserved "
                    f"(specials, chat tokens, 256 bytes); use at least {MIN_VOCAB_SIZE}")
  out_path = Path(out_path)
  max_line_chars = 4096
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(texts, max_line_chars),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        split_by_whitespace=True,
        max_sentencepiece_length=16,
        character_coverage=0.9995,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        pad_piece=PAD, bos_piece=BOS, eos_piece=EOS, unk_piece=UNK,
        control_symbols=list(CHAT_TOKENS),
        user_defined_symbols=list(USER_SYMBOLS),
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=4 * max_line_chars,  # bytes; a 4096-char line is at most 16 KB of UTF-8
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise DataError(f"tokenizer training for {out_path} failed: {e}") from None
  Tokenizer.from_bytes(model.getvalue())  # validates the layout
  out_path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
  with os.fdopen(fd, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, out_path)
  return out_path


class Tokenizer:
  """A loaded SentencePiece model with this project's special-token layout."""

  def __init__(self, model_proto: bytes, name: str = "<bytes>"):
    self._proto = bytes(model_proto)
    self._name = name
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._proto)
    except (RuntimeError, OSError) as e:
      raise DataError(f"{name}: not a SentencePiece model: {e}") from None
    sp = self._sp
    self.vocab_size: int = sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id, self.unk_id = (
        sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id())
    if (self.pad_id, self.bos_id, self.eos_id) != (0, 1, 2):
      raise DataError(f"{name}: expected pad/bos/eos ids 0/1/2, got "
                      f"{self.pad_id}/{self.bos_id}/{self.eos_id}; train it with "
                      "data.tokenizer.train_tokenizer")
    self.special_ids: dict[str, int] = {}
    for piece in CHAT_TOKENS:
      i = sp.piece_to_id(piece)
      if i == self.unk_id or not sp.is_control(i):
        raise DataError(f"{name}: chat token {piece} missing (or not a control symbol); train it "
                        "with data.tokenizer.train_tokenizer")
      self.special_ids[piece] = i
    self._byte_ids = []
    for b in range(256):
      i = sp.piece_to_id(f"<0x{b:02X}>")
      if not sp.is_byte(i):
        raise DataError(f"{name}: model has no byte-fallback pieces, so text can't round-trip")
      self._byte_ids.append(i)
    self._meta_ids = [self._byte_ids[b] for b in _META.encode("utf-8")]
    self._newline_id = sp.piece_to_id("\n")
    self._skip = frozenset((self.pad_id, self.bos_id, self.eos_id))

  # --- construction / serialization ---------------------------------------------------------------

  @classmethod
  def load(cls, path: str | Path) -> Tokenizer:
    path = Path(path)
    try:
      data = path.read_bytes()
    except FileNotFoundError:
      raise DataError(f"{path}: tokenizer model not found") from None
    except OSError as e:
      raise DataError(f"{path}: unreadable tokenizer model: {e}") from None
    return cls(data, name=str(path))

  @classmethod
  def from_bytes(cls, b: bytes) -> Tokenizer:
    return cls(b)

  def to_bytes(self) -> bytes:
    return self._proto

  @functools.cached_property
  def sha256(self) -> str:
    return hashlib.sha256(self._proto).hexdigest()

  # --- encode / decode ----------------------------------------------------------------------------

  def _encode_plain(self, text: str) -> list[int]:
    if len(text) <= _LINE_SPLIT_CHARS or self._newline_id == self.unk_id:
      return self._sp.encode(text)
    out: list[int] = []
    for i, ids in enumerate(self._sp.encode(text.split("\n"))):
      if i:
        out.append(self._newline_id)
      out.extend(ids)
    return out

  def _encode_one(self, text: str) -> list[int]:
    if _META not in text:
      return self._encode_plain(text)
    out: list[int] = []
    for i, part in enumerate(text.split(_META)):
      if i:
        out.extend(self._meta_ids)
      if part:
        out.extend(self._encode_plain(part))
    return out

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    ids = self._encode_one(text)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False,
                   num_threads: int = -1) -> list[list[int]]:
    """encode() of each text; `num_threads` C++ threads (-1 = all cores, 1 inside worker pools)."""
    # SentencePiece's own batch call (C++ threads) for the common case; the rare texts needing the
    # workarounds above go one at a time.
    plain = [i for i, t in enumerate(texts) if _META not in t and len(t) <= _LINE_SPLIT_CHARS]
    out: list[list[int]] = [[] for _ in texts]
    for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain], num_threads=num_threads)):
      out[i] = ids
    plain_set = set(plain)
    for i, t in enumerate(texts):
      if i not in plain_set:
        out[i] = self._encode_one(t)
    pre = [self.bos_id] if bos else []
    post = [self.eos_id] if eos else []
    return [pre + ids + post for ids in out] if (bos or eos) else out

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad/bos/eos are dropped (chat control tokens decode to "" as well)."""
    keep = [int(i) for i in ids if int(i) not in self._skip]
    for i in keep:
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
    return self._sp.decode(keep)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  # --- per-token byte lengths (bits per byte) -----------------------------------------------------

  def token_bytes(self) -> np.ndarray:
    """int32[vocab_size]: UTF-8 bytes each id adds to decoded text (bytes 1, control/special 0)."""
    return self._token_bytes.copy()

  @functools.cached_property
  def _token_bytes(self) -> np.ndarray:
    sp = self._sp
    out = np.zeros(self.vocab_size, dtype=np.int32)
    for i in range(self.vocab_size):
      if sp.is_control(i) or sp.is_unused(i):
        out[i] = 0
      elif sp.is_byte(i):
        out[i] = 1
      elif sp.is_unknown(i):
        out[i] = len(sp.decode([i]).encode("utf-8"))  # " ⁇ ", never produced by encode
      else:
        out[i] = len(sp.id_to_piece(i).replace(_META, " ").encode("utf-8"))
    return out

  def __repr__(self) -> str:
    return f"Tokenizer({self._name}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def tokenizer_from_meta(meta: dict):
  """The tokenizer stored in a checkpoint's meta (`model.load.make_meta`): the project's own
  SentencePiece `Tokenizer`, or, for imported models, a `data.foreign_tokenizer` one."""
  from data import foreign_tokenizer  # pylint: disable=g-import-not-at-top
  from model.load import tokenizer_bytes_from_meta  # pylint: disable=g-import-not-at-top
  data = tokenizer_bytes_from_meta(meta)
  kind = meta.get("tokenizer_kind", "sentencepiece")
  special = meta.get("tokenizer_special") or {}
  if kind == "hf_tokenizers":
    return foreign_tokenizer.HFTokenizer(data, special)
  if kind != "sentencepiece":
    raise DataError(f"checkpoint meta: unknown tokenizer_kind {kind!r}")
  try:
    return Tokenizer.from_bytes(data)
  except DataError:  # an imported SentencePiece model with another project's layout (Llama 2).
    return foreign_tokenizer.SentencePieceTokenizer(data, special)
