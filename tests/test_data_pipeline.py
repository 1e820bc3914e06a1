"""Grain pipeline: batches rebuild exactly into document chunks; determinism, resume, sharding, mixing.

Corpus: this interpreter's stdlib cut into ~1,500 documents of 3-60 lines (plus 8 file heads of ~2K
tokens, longer than a row, to exercise splitting), in two domains.
Run: python -m pytest tests/test_data_pipeline.py -q
"""
import collections
import json
import random
import shutil

import numpy as np
import pytest

from data import corpus
from data.errors import DataError
from data.pipeline import eval_batches, train_iterator
from data.shards import build_shards, is_val
from data.tokenizer import Tokenizer, train_tokenizer

SEQ = 64
BATCH = 4
KEYS = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
        "loss_mask": np.float32}


def _cut(text: str, rng: random.Random, lo: int, hi: int) -> list[str]:
  lines, out = text.split("\n"), []
  while lines:
    n = rng.randint(lo, hi)
    out.append("\n".join(lines[:n]))
    lines = lines[n:]
  return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  rng = random.Random(0)
  root = corpus.stdlib_dir()
  tmp = tmp_path_factory.mktemp("pipeline")
  rels = corpus.list_source_files(root)[:40]
  code = [t for rel in rels[:32] for t in _cut((root / rel).read_text("utf-8"), rng, 3, 60)]
  code += [(root / rel).read_text("utf-8")[:5000] for rel in rels[32:]]  # ~2K tokens: split
  topics = corpus.read_topics(root / "pydoc_data/topics.py")
  prose = [t for k in sorted(topics) for t in _cut(topics[k], rng, 3, 30)]
  texts = {"code": [t for t in code if t.strip()], "prose": [t for t in prose if t.strip()]}
  files = {}
  for name, docs in texts.items():
    files[name] = [tmp / f"{name}.jsonl"]
    files[name][0].write_text(
        "".join(json.dumps({"id": f"{name}-{d}", "text": t}) + "\n" for d, t in enumerate(docs)))
  tok_path = train_tokenizer(texts["code"] + texts["prose"], 600, tmp / "tok.model")
  tok = Tokenizer.load(tok_path)
  manifest = build_shards(files, tok_path, tmp / "shards", val_fraction=0.05, num_workers=1)
  # Every chunk the pipeline may emit -> [(domain, document index, chunk start)] (a list: the
  # reference topics repeat some paragraphs verbatim); and the val chunks.
  chunks, val = collections.defaultdict(list), collections.Counter()
  for name, docs in texts.items():
    for d, ids in enumerate(tok.encode_batch(docs, bos=True, eos=True)):
      starts = [0] if len(ids) <= SEQ + 1 else range(0, len(ids) - 1, SEQ)
      for s in starts:
        chunks[tuple(ids[s:s + SEQ + 1])].append((name, d, s))
        if is_val(f"{name}-{d}", 0.05):
          val[tuple(ids[s:s + SEQ + 1])] += 1
  return {"path": tmp / "shards" / "manifest.json", "manifest": manifest, "chunks": chunks,
          "val": val}


def _segments(batch):
  """Yields (row, segment tokens) rebuilt from inputs/targets, checking the batch's invariants."""
  for r in range(batch["inputs"].shape[0]):
    inputs, targets = batch["inputs"][r], batch["targets"][r]
    seg, pos, mask = batch["segment_ids"][r], batch["positions"][r], batch["loss_mask"][r]
    pad = seg == 0
    assert (inputs[pad] == 0).all() and (mask[pad] == 0).all()
    n_seg = seg.max()
    assert np.array_equal(np.unique(seg[~pad]), np.arange(1, n_seg + 1))
    # Next-token targets: within a segment, targets[i] == inputs[i+1].
    same = mask[:-1] == 1
    assert np.array_equal(targets[:-1][same], inputs[1:][same])
    expected_mask = np.concatenate([(seg[1:] == seg[:-1]) & ~pad[:-1], [mask[-1] == 1]])
    assert np.array_equal(mask == 1, expected_mask)
    for k in range(1, n_seg + 1):
      idx = np.flatnonzero(seg == k)
      assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
      assert np.array_equal(pos[idx], np.arange(len(idx)))  # 0-based within the segment
      tokens = inputs[idx].tolist()
      if mask[idx[-1]] == 1:  # segment runs to the row's end: its last token is only a target
        assert idx[-1] == len(seg) - 1
        tokens.append(int(targets[idx[-1]]))
      assert mask[idx[:-1]].all()
      yield r, tuple(tokens)


def _chunk_keys(batches, chunks):
  out = []
  for b in batches:
    for _, seg in _segments(b):
      assert seg in chunks, "segment is not a chunk of any document"
      out.append(seg)
  return out


def _unique_docs(batches, chunks):
  """(domain, document) of every segment that belongs to exactly one document."""
  return {chunks[k][0][:2] for k in _chunk_keys(batches, chunks) if len(chunks[k]) == 1}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return len(a) == len(b) and all(
      all(np.array_equal(x[k], y[k]) for k in KEYS) for x, y in zip(a, b))


def test_shapes_and_reconstruction(data):
  it = train_iterator(data["path"], seq_len=SEQ, batch_size=BATCH, seed=1)
  batches = _take(it, 30)
  for b in batches:
    assert set(b) == set(KEYS)
    for k, dtype in KEYS.items():
      assert b[k].shape == (BATCH, SEQ) and b[k].dtype == dtype
  keys = _chunk_keys(batches, data["chunks"])
  assert len(keys) > 30 * BATCH  # packing: more than one chunk per row on average
  assert any(data["chunks"][k][0][2] > 0 for k in keys), "no long document was split"
  real = sum(float((b["segment_ids"] > 0).mean()) for b in batches) / len(batches)
  assert real > 0.9  # first-fit over 64 bins leaves < 10% padding here
  assert json.loads(json.dumps(it.get_state())) == it.get_state()


def test_determinism_and_seed(data):
  a = _take(train_iterator(data["path"], seq_len=SEQ, batch_size=BATCH, seed=3), 12)
  b = _take(train_iterator(data["path"], seq_len=SEQ, batch_size=BATCH, seed=3, prefetch=0), 12)
  c = _take(train_iterator(data["path"], seq_len=SEQ, batch_size=BATCH, seed=4), 12)
  assert _equal(a, b) and not _equal(a, c)


@pytest.mark.parametrize("n_before", [3, 21])  # mid packed group, and past several groups
def test_resume_from_state(data, n_before):
  it = train_iterator(data["path"], seq_len=SEQ, batch_size=BATCH, seed=5)
  _take(it, n_before)
  state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
  expected = _take(it, 6)
  fresh = train_iterator(data["path"], seq_len=SEQ, batch_size=BATCH, seed=5)
  fresh.set_state(state)
  assert _equal(_take(fresh, 6), expected)


def test_processes_see_disjoint_documents(data):
  seen = []
  for p in range(2):
    it = train_iterator(data["path"], seq_len=SEQ, batch_size=BATCH, seed=0, process_index=p,
                        process_count=2)
    seen.append(_unique_docs(_take(it, 25), data["chunks"]))
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def _token_share(batches, chunks, domain):
  counts = {"code": 0, "prose": 0}
  for b in batches:
    for _, seg in _segments(b):
      owners = {name for name, _, _ in chunks[seg]}
      if len(owners) == 1:  # a few short chunks occur verbatim in both domains: they count for neither.
        counts[owners.pop()] += len(seg)
  return counts[domain] / sum(counts.values())


def test_mixing_weights_are_token_fractions(data):
  m = data["manifest"]["domains"]
  default_share = m["code"]["train"]["tokens"] / (
      m["code"]["train"]["tokens"] + m["prose"]["train"]["tokens"])
  for weights, expected in [({"code": 0.9, "prose": 0.1}, 0.9), ({"code": 0.3, "prose": 0.7}, 0.3),
                            (None, default_share)]:
    it = train_iterator(data["path"], seq_len=SEQ, batch_size=BATCH, seed=0, weights=weights)
    share = _token_share(_take(it, 400), data["chunks"], "code")  # ~100K tokens, ~350 documents
    assert abs(share - expected) < 0.05, (weights, share, expected)
  it = train_iterator(data["path"], seq_len=SEQ, batch_size=BATCH, weights={"prose": 1.0})
  assert _token_share(_take(it, 10), data["chunks"], "code") == 0.0


def test_bad_arguments(data):
  with pytest.raises(DataError, match="unknown domain"):
    train_iterator(data["path"], seq_len=SEQ, batch_size=BATCH, weights={"web": 1.0})
  with pytest.raises(DataError, match="positive weight"):
    train_iterator(data["path"], seq_len=SEQ, batch_size=BATCH, weights={"code": 0.0})
  with pytest.raises(DataError, match="process_index"):
    train_iterator(data["path"], seq_len=SEQ, batch_size=BATCH, process_index=2, process_count=2)
  with pytest.raises(DataError, match="manifest not found"):
    train_iterator(data["path"].parent / "nope", seq_len=SEQ, batch_size=BATCH)


def test_corrupt_shard(data, tmp_path):
  shutil.copytree(data["path"].parent, tmp_path / "shards")
  shard = tmp_path / "shards" / data["manifest"]["domains"]["prose"]["train"]["files"][0]
  shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
  with pytest.raises(DataError, match="corrupt shard") as e:
    train_iterator(tmp_path / "shards", seq_len=SEQ, batch_size=BATCH)
  assert str(shard) in str(e.value)


def test_eval_batches(data):
  a = eval_batches(data["path"], seq_len=SEQ, batch_size=BATCH, num_batches=1000)
  b = eval_batches(data["path"], seq_len=SEQ, batch_size=BATCH, num_batches=1000)
  assert a and _equal(a, b)
  for batch in a:
    for k, dtype in KEYS.items():
      assert batch[k].shape == (BATCH, SEQ) and batch[k].dtype == dtype
  # Exactly the val documents' chunks, each once, both domains.
  keys = _chunk_keys(a, data["chunks"])
  assert collections.Counter(keys) == data["val"]
  assert {data["chunks"][k][0][0] for k in keys} == {"code", "prose"}
  # A cap on batches returns a prefix of the same batches.
  assert _equal(eval_batches(data["path"], seq_len=SEQ, batch_size=BATCH, num_batches=2), a[:2])
  # Two processes: the same number of batches; rows are dealt round-robin, so between them they
  # hold every val chunk exactly once.
  parts = [eval_batches(data["path"], seq_len=SEQ, batch_size=BATCH, num_batches=1000,
                        process_index=p, process_count=2) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == -(-sum(int((x["segment_ids"].max(1) > 0).sum())
                                                  for x in a) // (2 * BATCH))
  k0, k1 = (collections.Counter(_chunk_keys(p, data["chunks"])) for p in parts)
  assert k0 + k1 == data["val"] and k0 and k1
  # Padding rows (all-zero, loss_mask 0; _segments checked the mask) only fill the last batch.
  for part in parts:
    filled = np.concatenate([x["segment_ids"].max(1) > 0 for x in part])
    assert filled[:-BATCH].all() and (filled == np.sort(filled)[::-1]).all()


def _docs_per_run(batches, chunks, run=16):
  """Mean number of distinct documents among each `run` consecutive chunks of ≥ 10-chunk documents."""
  long_docs = {owner[:2] for owners in chunks.values() for owner in owners if owner[2] >= 9 * SEQ}
  seq = [chunks[k][0][:2] for k in _chunk_keys(batches, chunks)
         if len(chunks[k]) == 1 and chunks[k][0][:2] in long_docs]
  runs = [seq[i:i + run] for i in range(0, len(seq) - run + 1, run)]
  return sum(len(set(r)) for r in runs) / max(len(runs), 1), len(runs)


def test_shuffle_window_spreads_long_documents(data):
  # Without the window a long document's ~30 chunks are emitted together (packing only shuffles
  # within its 64 bins); the window deals them among the other documents' chunks.
  def measure(window):
    it = train_iterator(data["path"], seq_len=SEQ, batch_size=BATCH, seed=0, shuffle_window=window)
    return _docs_per_run(_take(it, 150), data["chunks"])
  (off, n_off), (on, n_on) = measure(0), measure(512)
  assert n_off >= 5 and n_on >= 5
  assert on > 2 * off, (off, on)
  with pytest.raises(DataError, match="shuffle_window"):
    train_iterator(data["path"], seq_len=SEQ, batch_size=BATCH, shuffle_window=-1)
