"""Shards: records equal [bos] + encode(text) + [eos], counts reconcile, the val split is stable.

Builds from this interpreter's stdlib (never skips). Run: python -m pytest tests/test_data_shards.py -q
"""
import json

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from data import corpus
from data.errors import DataError
from data.shards import FORMAT, build_shards, copies, is_val, load_manifest
from data.tokenizer import Tokenizer, train_tokenizer


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = corpus.stdlib_dir()
  tmp = tmp_path_factory.mktemp("inputs")
  code = [{"id": f"code:{rel}", "text": (root / rel).read_text(encoding="utf-8")}
          for rel in corpus.list_source_files(root)[:60]]
  topics = corpus.read_topics(root / "pydoc_data/topics.py")
  prose = [{"id": f"topic:{k}", "text": v} for k, v in sorted(topics.items())]
  prose.insert(3, {"id": "empty-1", "text": ""})
  prose.insert(9, {"id": "empty-2", "text": "  \n "})
  files = {
      "code": [_write_jsonl(tmp / "code_a.jsonl", code[:30]),
               _write_jsonl(tmp / "code_b.jsonl", code[30:])],
      "prose": [_write_jsonl(tmp / "prose.jsonl", prose)],
  }
  tok_path = train_tokenizer([r["text"] for r in code + prose], 600, tmp / "tok.model")
  return {"files": files, "records": {"code": code, "prose": prose}, "tok_path": tok_path,
          "tmp": tmp}


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
  out = tmp_path_factory.mktemp("shards") / "out"
  manifest = build_shards(inputs["files"], inputs["tok_path"], out, val_fraction=0.2,
                          num_workers=2, docs_per_shard=16)
  return out, manifest


def _read_split(out, manifest, domain, split):
  records = []
  for rel in manifest["domains"][domain][split]["files"]:
    reader = ArrayRecordReader(str(out / rel))
    records += [np.frombuffer(r, dtype="<u2") for r in reader.read_all()]
    reader.close()
  return records


def test_records_and_counts(inputs, built):
  out, manifest = built
  tok = Tokenizer.load(inputs["tok_path"])
  assert manifest == {k: v for k, v in load_manifest(out).items() if k != "root"}
  assert manifest["format"] == FORMAT and manifest["dtype"] == "uint16"
  assert manifest["vocab_size"] == 600 and manifest["tokenizer_sha256"] == tok.sha256
  assert manifest["dropped"] == {"empty": 2} and manifest["read"] == 60 + len(inputs["records"]["prose"])
  kept = 0
  for domain, records in inputs["records"].items():
    records = [r for r in records if r["text"].strip()]
    entry = manifest["domains"][domain]
    for split in ("train", "val"):
      expected = [r for r in records if is_val(r["id"], 0.2) == (split == "val")]
      got = _read_split(out, manifest, domain, split)
      assert len(got) == entry[split]["docs"] == len(expected)
      for r, ids in zip(expected, got):  # input order is kept within a split
        assert ids.tolist() == tok.encode(r["text"], bos=True, eos=True)
      assert entry[split]["tokens"] == sum(map(len, got))
      assert len(entry[split]["files"]) == -(-len(expected) // 16)  # docs_per_shard=16
      kept += len(expected)
  assert kept + sum(manifest["dropped"].values()) == manifest["read"]
  assert 0 < manifest["domains"]["prose"]["val"]["docs"] < manifest["domains"]["prose"]["train"]["docs"]


def test_identical_for_any_worker_count_and_val_split_stable(inputs, built, tmp_path):
  out, manifest = built
  one = build_shards(inputs["files"], inputs["tok_path"], tmp_path / "one", val_fraction=0.2,
                     num_workers=1, docs_per_shard=16)
  assert one == manifest
  for rel in manifest["domains"]["code"]["train"]["files"]:
    assert (tmp_path / "one" / rel).read_bytes() == (out / rel).read_bytes()
  # Adding a file (and reordering) never moves an existing document between train and val.
  extra = _write_jsonl(inputs["tmp"] / "extra.jsonl",
                       [{"id": f"extra{i}", "text": f"extra document {i}"} for i in range(50)])
  files = {"code": [extra] + inputs["files"]["code"][::-1], "prose": inputs["files"]["prose"]}
  grown = build_shards(files, inputs["tok_path"], tmp_path / "grown", val_fraction=0.2,
                       num_workers=1)
  def val_docs(root, m):
    return {tuple(r) for r in _read_split(root, m, "code", "val")}
  assert val_docs(out, manifest) <= val_docs(tmp_path / "grown", grown)
  assert grown["domains"]["code"]["train"]["docs"] + grown["domains"]["code"]["val"]["docs"] == 110
  # The build replaced nothing but its own out_dir and left no temp directories behind.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["grown", "one"]


def test_rebuild_replaces_atomically(inputs, tmp_path):
  out = tmp_path / "out"
  files = {"prose": inputs["files"]["prose"]}
  build_shards(files, inputs["tok_path"], out, val_fraction=0.0, num_workers=1)
  m = build_shards(files, inputs["tok_path"], out, val_fraction=0.5, num_workers=1)
  assert load_manifest(out / "manifest.json")["val_fraction"] == 0.5 == m["val_fraction"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_inputs(inputs, tmp_path):
  empty = _write_jsonl(tmp_path / "empty_docs.jsonl", [{"text": ""}, {"text": " "}])
  with pytest.raises(DataError, match="no non-empty documents") as e:
    build_shards({"x": [empty]}, inputs["tok_path"], tmp_path / "o", num_workers=1)
  assert "empty_docs.jsonl" in str(e.value)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"text": \n')
  with pytest.raises(DataError, match=f"{bad}:2"):
    build_shards({"x": [bad]}, inputs["tok_path"], tmp_path / "o", num_workers=1)
  with pytest.raises(DataError, match="bad domain name"):
    build_shards({"a/b": [empty]}, inputs["tok_path"], tmp_path / "o", num_workers=1)
  with pytest.raises(DataError, match="not found"):
    build_shards({"x": [empty]}, tmp_path / "nope.model", tmp_path / "o", num_workers=1)
  assert not (tmp_path / "o").exists()


def test_load_manifest_errors(built, tmp_path):
  out, manifest = built
  with pytest.raises(DataError, match="manifest not found"):
    load_manifest(tmp_path / "nothing")
  corrupt = tmp_path / "corrupt.json"
  corrupt.write_text('{"format": 1, "domains": ')
  with pytest.raises(DataError, match="corrupt.json"):
    load_manifest(corrupt)
  copy = tmp_path / "copy"
  copy.mkdir()
  (copy / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(DataError, match="is missing"):  # shard files absent beside this manifest
    load_manifest(copy)
  broken = dict(manifest, read=manifest["read"] + 1)
  (out / "broken.json").write_text(json.dumps(broken))
  with pytest.raises(DataError, match="reconcile"):
    load_manifest(out / "broken.json")


def test_epochs_upsample_train_only_and_weights_recorded(inputs, built, tmp_path):
  out1, m1 = built
  out = tmp_path / "up"
  m = build_shards(inputs["files"], inputs["tok_path"], out, val_fraction=0.2, num_workers=2,
                   docs_per_shard=16, epochs={"prose": 2.5}, weights={"code": 1.0, "prose": 3.0})
  assert m["weights"] == {"code": 1.0, "prose": 3.0}
  assert load_manifest(out)["domains"]["prose"]["epochs"] == 2.5
  p1, p = m1["domains"]["prose"], m["domains"]["prose"]
  # Val is never repeated; train repeats each doc 2 or 3 times, the extra copy for ~half of them.
  assert p["val"] == {**p1["val"], "files": p["val"]["files"]}
  assert p["train"]["unique_docs"] == p1["train"]["unique_docs"]
  train_ids = [r["id"] for r in inputs["records"]["prose"] if r["text"].strip()
               and not is_val(r["id"], 0.2)]
  expected = sum(copies(i, 2.5) for i in train_ids)
  assert p["train"]["docs"] == expected
  assert 2.3 * len(train_ids) < expected < 2.7 * len(train_ids)
  assert len(_read_split(out, m, "prose", "train")) == expected
  assert m["domains"]["code"] == {**m1["domains"]["code"], "sources": m["domains"]["code"]["sources"]}
  with pytest.raises(DataError, match="epochs must be finite and >= 1"):
    build_shards(inputs["files"], inputs["tok_path"], tmp_path / "bad", epochs={"prose": 0.5})
  with pytest.raises(DataError, match="unknown domain"):
    build_shards(inputs["files"], inputs["tok_path"], tmp_path / "bad", weights={"wiki": 1.0})
