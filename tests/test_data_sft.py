"""SFT data: JSONL loading with counted drops, GSM8K and HH-RLHF conversations, packing, batches.

Trains one real project tokenizer (vocab 1024) on ~400 KB of Tiny Shakespeare + GSM8K (well under 1 s).
Run: python -m pytest tests/test_data_sft.py -q
"""
import json
import math
import re

import numpy as np
import pytest

from data import chat, sft
from data.errors import DataError

USER, ASSISTANT, END = 5, 6, 7


@pytest.fixture(scope="module")
def tok(chat_tokenizer):
  return chat_tokenizer


def turn(role, content):
  return {"role": role, "content": content}


def check_counts(counts):
  assert counts["read"] == counts["kept"] + sum(counts["dropped"].values())


# --- loading ----------------------------------------------------------------------------------------

GOOD = [
    {"messages": [turn("user", "hi"), turn("assistant", "hello")], "id": "a"},
    {"prompt": "p", "response": "r"},
    {"prompt": "p2", "response": "r2", "system": "s"},
    {"messages": [turn("system", "s"), turn("user", "u"), turn("assistant", "a", ), turn("user", "u2"),
                  turn("assistant", "a2")]},
]


def write_lines(path, lines):
  with open(path, "wb") as f:
    f.writelines(line if isinstance(line, bytes) else (line + "\n").encode() for line in lines)
  return path


def test_load_both_formats(tmp_path):
  path = write_lines(tmp_path / "sft.jsonl", [json.dumps(r) for r in GOOD[:2]] + [""] +
                     [json.dumps(r) for r in GOOD[2:]])
  convs, counts = sft.load_conversations(path)
  assert convs == [
      [turn("user", "hi"), turn("assistant", "hello")],  # extra keys ("id") are not carried
      [turn("user", "p"), turn("assistant", "r")],
      [turn("system", "s"), turn("user", "p2"), turn("assistant", "r2")],
      GOOD[3]["messages"]]
  assert counts == {"read": 4, "kept": 4, "dropped": {}}  # the blank line is not a record
  convs, counts = sft.load_conversations(path, limit=2)
  assert len(convs) == 2 and counts["read"] == 2


BAD = [  # (line, reason)
    ("{not json", "invalid_json"),
    ("[1, 2]", "not_object"),
    (json.dumps({"text": "hi"}), "unknown_record"),
    (json.dumps({"messages": [turn("user", "x")], "prompt": "p", "response": "r"}), "unknown_record"),
    (json.dumps({"messages": [turn("human", "x"), turn("assistant", "y")]}), "unknown_role"),
    (json.dumps({"messages": [turn("user", "x"), turn("user", "y"), turn("assistant", "z")]}),
     "repeated_role"),
    (json.dumps({"messages": [turn("user", "x")]}), "no_assistant"),
    (json.dumps({"prompt": "p", "response": ""}), "empty_content"),
    (json.dumps({"prompt": 5, "response": "r"}), "bad_content"),
    (b"\xff\xfe bad bytes\n", "not_utf8"),
]


@pytest.mark.parametrize("bad, reason", BAD)
def test_invalid_line_names_file_and_line(tmp_path, bad, reason):
  path = write_lines(tmp_path / "sft.jsonl", [json.dumps(GOOD[0]), "", bad, json.dumps(GOOD[1])])
  with pytest.raises(DataError, match=f"^{re.escape(str(path))}:3: ") as e:
    sft.load_conversations(path)
  assert e.value.reason == reason


def test_skip_invalid_counts_every_reason(tmp_path):
  lines = []
  for good, (bad, _) in zip(GOOD * 3, BAD):
    lines += [json.dumps(good), bad]
  path = write_lines(tmp_path / "sft.jsonl", lines)
  convs, counts = sft.load_conversations(path, skip_invalid=True)
  expected = {}
  for _, reason in BAD:
    expected[reason] = expected.get(reason, 0) + 1
  assert counts == {"read": 2 * len(BAD), "kept": len(BAD), "dropped": expected}
  check_counts(counts)
  assert len(convs) == len(BAD)


def test_load_errors(tmp_path):
  with pytest.raises(DataError, match="file not found"):
    sft.load_conversations(tmp_path / "missing.jsonl")
  path = write_lines(tmp_path / "bad.jsonl", ["{oops"])
  with pytest.raises(DataError, match="no valid conversations.*invalid_json"):
    sft.load_conversations(path, skip_invalid=True)


def test_gsm8k_conversations(shared_data_dir):
  convs, counts = sft.gsm8k_conversations("train")
  assert counts == {"read": 7473, "kept": 7473, "dropped": {}}
  with open(shared_data_dir / "math" / "gsm8k_train.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [c for c in convs] == [[turn("user", r["question"]), turn("assistant", r["answer"])]
                                for r in rows]
  assert all(c[1]["content"].splitlines()[-1].startswith("#### ") for c in convs)
  assert len(sft.gsm8k_conversations("test", limit=5)[0]) == 5


def test_hh_rlhf_shared_file(shared_data_dir):
  """All 2,312 pairs: kept dialogues alternate user/assistant and end with the assistant; the rest are
  counted by reason (figures in the hh_rlhf_conversations docstring)."""
  chosen, counts = sft.hh_rlhf_conversations(which="chosen")
  assert counts == {"read": 2312, "kept": 2300, "dropped": {"empty_content": 4, "repeated_role": 8}}
  rejected, counts = sft.hh_rlhf_conversations(which="rejected")
  assert counts == {"read": 2312, "kept": 2307, "dropped": {"repeated_role": 5}}
  for conv in chosen + rejected:
    assert [t["role"] for t in conv] == ["user", "assistant"] * (len(conv) // 2)
    assert all(t["content"] == t["content"].strip() and t["content"] for t in conv)
  pairs, counts = sft.hh_rlhf_pairs()
  # 13 distinct pairs have a bad side: the 12 chosen plus 1 whose rejected side alone repeats a role.
  assert counts == {"read": 2312, "kept": 2299, "dropped": {"empty_content": 4, "repeated_role": 9}}
  for p in pairs:
    assert p["prompt"][-1]["role"] == "user" and p["chosen"] and p["rejected"]
  assert sft.hh_rlhf_conversations(limit=10)[1]["read"] == 10
  with pytest.raises(ValueError, match="chosen"):
    sft.hh_rlhf_conversations(which="both")


# --- packing ----------------------------------------------------------------------------------------

def test_pack_hand_example():
  # <s> <|user|> hi <|end|> <|assistant|> yo <|end|>, render mask on "yo" and its <|end|>.
  ids, mask = [1, USER, 500, END, ASSISTANT, 600, END], [0, 0, 0, 0, 0, 1, 1]
  packed, counts = sft.pack([(ids, mask)], seq_len=8)
  np.testing.assert_array_equal(packed["inputs"], [[1, USER, 500, END, ASSISTANT, 600, END, 0]])
  np.testing.assert_array_equal(packed["targets"], [[USER, 500, END, ASSISTANT, 600, END, 0, 0]])
  np.testing.assert_array_equal(packed["loss_mask"], [[0, 0, 0, 0, 1, 1, 0, 0]])
  np.testing.assert_array_equal(packed["segment_ids"], [[1, 1, 1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(packed["positions"], [[0, 1, 2, 3, 4, 5, 6, 0]])
  assert packed["loss_mask"].dtype == np.float32 and packed["inputs"].dtype == np.int32
  assert counts["tokens"] == 7 and counts["trained_tokens"] == 2 and counts["rows"] == 1


def test_pack_first_fit_decreasing_and_segment_isolation():
  # Lengths 2..6 into rows of 10. FFD: 6 -> row 0, 5 -> row 1, 4 -> row 0 (full), 3 -> row 1, 2 -> row 1.
  examples = [([100 + 10 * n + j for j in range(n)], [0] + [1] * (n - 1)) for n in (2, 3, 4, 5, 6)]
  packed, counts = sft.pack(examples, seq_len=10)
  seg = packed["segment_ids"]
  np.testing.assert_array_equal(seg, [[1] * 6 + [2] * 4, [1] * 5 + [2] * 3 + [3] * 2])
  np.testing.assert_array_equal(packed["positions"], [list(range(6)) + list(range(4)),
                                                      list(range(5)) + list(range(3)) + [0, 1]])
  np.testing.assert_array_equal(packed["inputs"][0], examples[4][0] + examples[2][0])
  # No loss across a boundary: each conversation's last token (whose next token is another
  # conversation's first, or padding) has mask 0; every other position is trained here.
  np.testing.assert_array_equal(packed["loss_mask"], [[1] * 5 + [0] + [1] * 3 + [0],
                                                      [1] * 4 + [0] + [1] * 2 + [0] + [1, 0]])
  assert counts["padding_fraction"] == 0.0


def test_pack_gsm8k_loses_nothing(tok, shared_data_dir):
  convs, _ = sft.gsm8k_conversations("train", limit=400)
  convs.append([turn("user", "x " * 1000), turn("assistant", "y")])  # too long
  examples = [chat.render(c, tok) for c in convs]
  seq_len = 384
  packed, counts = sft.pack(examples, seq_len)
  check_counts(counts)
  kept = [e for e in examples if len(e[0]) <= seq_len]
  assert counts["dropped"]["longer_than_seq_len"] == len(examples) - len(kept) >= 2
  assert counts["kept"] == len(kept) and counts["truncated"] == 0
  seg, inputs = packed["segment_ids"], packed["inputs"]
  assert counts["tokens"] == sum(len(ids) for ids, _ in kept) == int((seg > 0).sum())
  # Every kept conversation comes back whole, in one segment, with its shifted mask.
  found = []
  for r in range(len(seg)):
    for s in range(1, seg[r].max() + 1):
      where = np.flatnonzero(seg[r] == s)
      assert (np.diff(where) == 1).all()
      assert (packed["positions"][r, where] == np.arange(len(where))).all()
      found.append((tuple(inputs[r, where]), tuple(packed["loss_mask"][r, where])))
  expected = [(tuple(ids), tuple(mask[1:]) + (0,)) for ids, mask in kept]
  assert sorted(found) == sorted(expected)
  # Trained targets are exactly the replies plus <|end|>, and never cross a segment or padding.
  m = packed["loss_mask"] > 0
  assert (seg[:, :-1][m[:, :-1]] == seg[:, 1:][m[:, :-1]]).all() and not m[:, -1].any()
  assert (packed["targets"][m] != 0).all() and (packed["targets"][:, :-1] == inputs[:, 1:]).all()
  assert int(m.sum()) == counts["trained_tokens"] == sum(
      len(tok.encode(c[-1]["content"])) + 1 for c, e in zip(convs, examples, strict=True) if len(e[0]) <= seq_len)
  # First-fit decreasing stays within its worst case, 11/9 OPT + 6/9 rows (Johnson 1973).
  assert counts["rows"] <= 11 / 9 * math.ceil(counts["tokens"] / seq_len) + 1


def test_pack_drop_or_truncate():
  long = (list(range(10, 30)), [0] * 5 + [1] * 15)
  prompt_only = (list(range(10, 30)), [0] * 12 + [1] * 8)  # trained part lies past the cut
  short = ([1, 2, 3], [0, 1, 1])
  packed, counts = sft.pack([long, prompt_only, short], seq_len=10)
  assert counts["dropped"] == {"longer_than_seq_len": 2, "no_loss_tokens": 0}
  assert counts["kept"] == 1 and packed["inputs"].shape == (1, 10)
  packed, counts = sft.pack([long, prompt_only, short], seq_len=10, drop_longer=False)
  assert counts["dropped"] == {"longer_than_seq_len": 0, "no_loss_tokens": 1}
  assert counts["truncated"] == 1 and counts["kept"] == 2 and counts["tokens"] == 13
  check_counts(counts)
  row = np.flatnonzero((packed["segment_ids"] > 0).sum(1) == 10)[0]
  np.testing.assert_array_equal(packed["inputs"][row], list(range(10, 20)))
  np.testing.assert_array_equal(packed["loss_mask"][row], [0] * 4 + [1] * 5 + [0])
  with pytest.raises(DataError, match="example 0: ids and loss_mask"):
    sft.pack([([1, 2, 3], [0, 1])], seq_len=10)


# --- batches ----------------------------------------------------------------------------------------

def packed_rows(n, seq_len=4):
  inputs = np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)
  return {"inputs": inputs, "targets": inputs + 1, "loss_mask": np.ones((n, seq_len), np.float32),
          "segment_ids": np.ones((n, seq_len), np.int32), "positions": np.tile(np.arange(seq_len), (n, 1))}


def row_ids(batch):
  return (batch["inputs"][:, 0] // batch["inputs"].shape[1]).tolist()


def test_batches_deterministic_and_shuffled_per_epoch():
  packed = packed_rows(12)
  a = [row_ids(b) for b in sft.batches(packed, 4, seed=3, epochs=3)]
  b = [row_ids(b) for b in sft.batches(packed, 4, seed=3, epochs=3)]
  c = [row_ids(b) for b in sft.batches(packed, 4, seed=4, epochs=3)]
  assert a == b and a != c and len(a) == 9
  epochs = [[i for b in a[3 * e:3 * e + 3] for i in b] for e in range(3)]
  assert all(sorted(e) == list(range(12)) for e in epochs)  # each epoch sees every row once
  assert epochs[0] != epochs[1] != epochs[2]  # reshuffled
  batch = next(sft.batches(packed, 4, seed=3))
  assert {k: v.shape for k, v in batch.items()} == {k: (4, 4) for k in packed}
  assert (batch["targets"] == batch["inputs"] + 1).all()  # rows stay whole across features
  # Resuming at a step replays nothing and continues the same stream.
  assert [row_ids(b) for b in sft.batches(packed, 4, seed=3, epochs=3, start=5)] == a[5:]


def test_batches_straddle_epochs_and_errors():
  packed = packed_rows(5)
  got = [row_ids(b) for b in sft.batches(packed, 2, seed=0, epochs=2)]
  assert len(got) == 5  # floor(2 * 5 / 2)
  flat = [i for b in got for i in b]
  assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5))
  forever = sft.batches(packed, 2, seed=0)
  assert [row_ids(next(forever)) for _ in range(5)] == got
  with pytest.raises(DataError, match="batch_size must be in \\[1, 5\\]"):
    sft.batches(packed, 6, seed=0)
  with pytest.raises(DataError, match="all \\[rows, seq_len\\]"):
    sft.batches({"inputs": np.zeros((3, 4)), "targets": np.zeros((2, 4))}, 1, seed=0)


# --- preference rows ---------------------------------------------------------------------------------

def test_mismatched_rows_pair_each_prompt_with_the_next_reply(tok):
  from data import preference
  pairs = [dict(prompt=[turn("user", f"question number {i}?" + " and more words" * (6 if i == 0 else 0))],
                chosen=f"answer {i} " * (2 * i + 1), rejected="no") for i in range(3)]
  arrays, counts = preference.pair_arrays(pairs, tok, seq_len=48)
  assert counts["kept"] == 3, [len(preference.render_side(p["prompt"], p["chosen"], tok)[0]) for p in pairs]
  kl = preference.mismatched_arrays(arrays)
  assert set(kl) == {f"kl_{f}" for f in preference.FIELDS}
  fits = []
  for i in range(3):
    j = (i + 1) % 3
    prompt, _ = preference.render_side(pairs[i]["prompt"], "x", tok)
    prompt = prompt[:-len(tok.encode("x")) - 1]  # the rendered prompt alone, header included
    ids, mask = preference.render_side(pairs[i]["prompt"], pairs[j]["chosen"], tok)
    assert ids[:len(prompt)] == prompt
    n = int(kl["kl_segment_ids"][i].sum())
    fits.append(len(ids) <= 49)
    if fits[-1]:  # fits: the exact rendering of (prompt i, reply i+1)
      assert n == len(ids) - 1
      assert kl["kl_inputs"][i, :n].tolist() == ids[:-1] and kl["kl_targets"][i, :n].tolist() == ids[1:]
      assert kl["kl_loss_mask"][i, :n].tolist() == mask[1:]
      assert kl["kl_positions"][i, :n].tolist() == list(range(n))
    # Always: the masked targets are exactly reply j and its <|end|>, after a BOS-first prompt.
    reply = tok.encode(pairs[j]["chosen"]) + [chat.end_id(tok)]
    assert kl["kl_targets"][i][kl["kl_loss_mask"][i] > 0].tolist() == reply
    assert kl["kl_inputs"][i, 0] == tok.bos_id and not kl["kl_loss_mask"][i, n:].any()
  assert any(fits) and not all(fits)  # both the exact and the left-truncated case ran
