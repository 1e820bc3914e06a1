"""Tokenizer: lossless round trips, special-token layout, byte accounting, training determinism.

Trains one small BPE model (vocab 800) on ~2 MB of this interpreter's stdlib (always present, so these
tests never skip). Run: python -m pytest tests/test_data_tokenizer.py -q
"""
import io

import numpy as np
import pytest
import sentencepiece as spm

from data import corpus
from data.errors import DataError
from data.tokenizer import CHAT_TOKENS, Tokenizer, train_tokenizer

VOCAB = 800

HARD_TEXTS = [
    "",
    "plain ascii words",
    "   leading spaces and trailing spaces   ",
    "def f(x):\n\tif x:\n\t\treturn x  \n\n\n\n    else:\n        pass\t\n",
    "class A:\n    def m(self):  # comment\n        return {'a': [1, 2, 3]}\n",
    "unicode: café naïve Zürich Ελληνικά русский عربى हिन्दी",
    "CJK: 日本語のテキスト 中文文本 한국어 텍스트",
    "emoji: 🤗👍🏽👨‍👩‍👧‍👦🏳️‍🌈 and ZWJ sequences",
    "sentencepiece's own marker ▁ and ▁▁ runs ▁",
    "literal chat tokens <|system|><|user|> hi <|assistant|> <|end|>",
    "control chars \x00\x01\x7f and \r\n windows \r lines\x0c",
    "\n\n\n",
    "\t",
    " ",
    "digits 1234567890 3.14159 1e-9",
    "ﬁ ligature and NFKC-sensitive ｆｕｌｌｗｉｄｔｈ and combining é",
]


def _stdlib_texts(max_chars=2_000_000):
  root = corpus.stdlib_dir()
  texts, n = [], 0
  for rel in corpus.list_source_files(root):
    text = (root / rel).read_text(encoding="utf-8", errors="replace")
    texts.append(text)
    n += len(text)
    if n > max_chars:
      break
  texts.extend(corpus.read_topics(root / "pydoc_data/topics.py").values())
  return texts


@pytest.fixture(scope="module")
def texts():
  return _stdlib_texts()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, texts):
  return train_tokenizer(texts, VOCAB, tmp_path_factory.mktemp("tok") / "tok.model", seed=0)


@pytest.fixture(scope="module")
def tok(tok_path):
  return Tokenizer.load(tok_path)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_round_trip_hard_texts(tok, text):
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
  # Bits-per-byte accounting: the ids' byte lengths add up to the text's UTF-8 length.
  assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_round_trip_real_corpora(tok, texts, shared_data_dir):
  shakespeare = (shared_data_dir / "text/tinyshakespeare.txt").read_text(encoding="utf-8")
  docs = texts[:200] + [shakespeare]
  token_bytes = tok.token_bytes()
  for text, ids in zip(docs, tok.encode_batch(docs)):
    assert tok.decode(ids) == text
    assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))
  # Code compresses: at vocab 800 BPE still averages > 2 bytes per token on stdlib source.
  n_bytes = sum(len(t.encode()) for t in texts[:200])
  assert n_bytes / sum(map(len, tok.encode_batch(texts[:200]))) > 2.0


def test_special_ids(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
  assert list(tok.special_ids) == list(CHAT_TOKENS)
  ids = [tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, *tok.special_ids.values()]
  assert len(set(ids)) == len(ids) and all(0 <= i < tok.vocab_size for i in ids)
  assert tok.vocab_size == VOCAB
  # Typed literally, chat tokens are ordinary text, never the control ids.
  literal = tok.encode("".join(CHAT_TOKENS) + " <|user|>")
  assert not set(literal) & set(ids)
  # decode drops pad/bos/eos and the control tokens.
  hello = tok.encode("hello")
  assert tok.decode([tok.bos_id, *hello, tok.special_ids["<|end|>"], tok.eos_id, tok.pad_id]) == "hello"


def test_whitespace_pieces(tok):
  nl = tok.encode("\n")
  assert len(nl) == 1 and tok.id_to_piece(nl[0]) == "\n"
  assert len(tok.encode("\t")) == 1
  # Indentation runs are learned as single pieces (allow_whitespace_only_pieces).
  assert len(tok.encode("        ")) == 1
  assert tok.encode("a\n\nb") == tok.encode("a") + nl + nl + tok.encode("b")


def test_token_bytes(tok):
  tb = tok.token_bytes()
  assert tb.shape == (tok.vocab_size,) and tb.dtype == np.int32
  for i in [tok.pad_id, tok.bos_id, tok.eos_id, *tok.special_ids.values()]:
    assert tb[i] == 0
  byte_ids = [i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")]
  assert len(byte_ids) == 256 and set(tb[byte_ids]) == {1}
  assert (tb[max(byte_ids) + 1:] >= 1).all()  # every learned piece decodes to something


def test_encode_batch_matches_encode(tok, texts):
  long_text = "\n".join(texts[:40])  # > 64K chars: takes the line-by-line path
  assert len(long_text) > 1 << 16
  batch = HARD_TEXTS + [long_text, long_text + "▁x"]
  assert tok.encode_batch(batch) == [tok.encode(t) for t in batch]
  assert tok.encode_batch(batch, bos=True, eos=True) == [
      tok.encode(t, bos=True, eos=True) for t in batch]
  assert tok.encode(long_text) == tok._sp.encode(long_text)  # line split is exact
  assert tok.decode(tok.encode(long_text + "▁x")) == long_text + "▁x"


def test_serialization(tok, tok_path):
  again = Tokenizer.from_bytes(tok.to_bytes())
  assert again.sha256 == tok.sha256 and len(tok.sha256) == 64
  assert again.encode("x = 1\n") == tok.encode("x = 1\n")
  assert tok.to_bytes() == tok_path.read_bytes()


def test_training_is_deterministic(tmp_path, texts, tok):
  path = train_tokenizer(texts, VOCAB, tmp_path / "again.model", seed=0)
  assert Tokenizer.load(path).sha256 == tok.sha256


def test_bad_tokenizers(tmp_path, texts):
  with pytest.raises(DataError, match="too small"):
    train_tokenizer(texts, 100, tmp_path / "small.model")
  with pytest.raises(DataError, match="not found") as e:
    Tokenizer.load(tmp_path / "missing.model")
  assert "missing.model" in str(e.value)
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"\x00not a model")
  with pytest.raises(DataError, match="garbage.model"):
    Tokenizer.load(garbage)
  # A SentencePiece model without this project's layout (no chat tokens) is refused with a hint.
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts[0].split("\n")), model_writer=model,
                                 vocab_size=600, model_type="bpe", byte_fallback=True,
                                 pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
  foreign = tmp_path / "foreign.model"
  foreign.write_bytes(model.getvalue())
  with pytest.raises(DataError, match="chat token"):
    Tokenizer.load(foreign)
