"""Constitutional critique/revision pairs and rejection sampling: the orchestration around the sampler
(scripted replies stand in for the model), the files they write (read back by align.dpo / align.sft's
loaders), and bad input."""
import json
import subprocess
import sys

import pytest

from align import constitution as cai
from align.rollout import Reply
from conftest import REPO


class _Script:
  """Replaces chat_replies: records the conversations of each call, answers by a rule."""

  def __init__(self, rule):
    self.rule, self.calls = rule, []

  def __call__(self, model, tokenizer, convs, **kw):
    self.calls.append([list(c) for c in convs])
    return [self.rule(len(self.calls), c) for c in convs]


def _reply(text, ended=True):
  return Reply(text=text, ended=ended, ids=())


def test_critique_pairs_builds_the_conversation_and_pairs(monkeypatch, tmp_path):
  principles = cai.load_constitution(str(REPO / "configs" / "constitution.json"))
  prompts = [[dict(role="user", content=f"question {i}")] for i in range(4)]

  def rule(stage, conv):
    q = conv[0]["content"]
    if stage == 1:
      return _reply(f"answer to {q}", ended=q != "question 3")  # prompt 3: the answer never ends.
    if stage == 2:
      return _reply(f"critique of {q}")
    return _reply(f"answer to {q}" if q == "question 2" else f"revised {q}")  # 2: revision == answer.

  script = _Script(rule)
  monkeypatch.setattr(cai, "chat_replies", script)
  pairs, counts = cai.critique_pairs(None, None, prompts, principles, seed=0, max_new_tokens=8, temperature=1.0)
  assert counts == dict(prompts=4, kept=2, dropped={"answer_unfinished": 1, "revision_identical": 1})
  assert [p["chosen"] for p in pairs] == ["revised question 0", "revised question 1"]
  assert [p["rejected"] for p in pairs] == ["answer to question 0", "answer to question 1"]
  # Stage 2 sees prompt, answer, critique request; stage 3 also the critique and the revision request.
  critique_conv, revision_conv = script.calls[1][0], script.calls[2][0]
  assert [t["role"] for t in critique_conv] == ["user", "assistant", "user"]
  assert critique_conv[2]["content"] == pairs[0]["principle"]
  assert [t["role"] for t in revision_conv] == ["user", "assistant", "user", "assistant", "user"]
  principle = next(p for p in principles if p["critique"] == pairs[0]["principle"])
  assert revision_conv[4]["content"] == principle["revision"]
  # The written file is what align.dpo reads.
  from data.preference import load_pairs
  out = tmp_path / "pairs.jsonl"
  cai.write_jsonl(pairs, str(out))
  loaded, c = load_pairs(out)
  assert c["kept"] == 2 and loaded[0]["prompt"] == prompts[0] and loaded[0]["chosen"] == "revised question 0"


def test_rejection_sampling_keeps_verified_answers(monkeypatch, tmp_path):
  from data.sft import load_conversations
  from data.tasks import gsm8k
  problems = gsm8k.load("train", limit=3)

  answers = iter([f"#### {problems[0]['target']}", f"#### {problems[0]['target']}",  # one kept, one dup
                  "#### -1", "no number",                                              # both wrong
                  f"#### {problems[2]['target']}", "unfinished"])

  def scripted(model, tokenizer, convs, **kw):
    out = []
    for _ in convs:
      a = next(answers)
      out.append(_reply(a, ended=a != "unfinished"))
    return out

  monkeypatch.setattr(cai, "chat_replies", scripted)
  rows, counts = cai.rejection_samples(None, None, "gsm8k", n=2, limit=3, seed=0, max_new_tokens=8,
                                       temperature=1.0, keep_per_prompt=2)
  assert counts == dict(problems=3, samples=6, unfinished=1, wrong=2, kept=2, duplicate=1,
                        problems_with_a_kept_answer=2)
  assert [r["prompt"] for r in rows] == [problems[0]["question"], problems[2]["question"]]
  out = tmp_path / "rs.jsonl"
  cai.write_jsonl(rows, str(out))
  convs, c = load_conversations(out)
  assert c["kept"] == 2 and convs[0][1]["role"] == "assistant"


@pytest.mark.parametrize("content, message", [
    ("{", "invalid JSON"),
    ('{"principles": []}', "expected"),
    ('{"principles": [{"critique": "x"}]}', "principle 0 needs"),
])
def test_bad_constitution_file(tmp_path, content, message):
  path = tmp_path / "c.json"
  path.write_text(content)
  with pytest.raises(Exception, match=message):
    cai.load_constitution(str(path))


def test_cli_errors(tiny_run, tmp_path):
  def run(*args):
    return subprocess.run([sys.executable, "-m", "align.constitution", *args], cwd=REPO, capture_output=True,
                          text=True)

  r = run("critique", f"--checkpoint={tmp_path / 'none'}", f"--out={tmp_path / 'o.jsonl'}")
  assert r.returncode == 2 and "checkpoint not found" in r.stderr
  r = run("critique", f"--checkpoint={tiny_run}", f"--out={tmp_path / 'o.jsonl'}",
          f"--constitution={tmp_path / 'missing.json'}")
  assert r.returncode == 2 and "constitution file not found" in r.stderr
  r = run("rejection", f"--checkpoint={tiny_run}", f"--out={tmp_path / 'o.jsonl'}", "--task=chess")
  assert r.returncode == 2 and "known tasks" in r.stderr
  assert not (tmp_path / "o.jsonl").exists()  # nothing written on bad input.
