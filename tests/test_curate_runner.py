"""Curation runner end to end: real web samples + malformed files -> report, counts, shards; resume;
the Ray runner gives identical outputs; bad options are one clear error.

Run: python -m pytest tests/test_curate_runner.py -q
"""
import gzip
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs.loader import load_preset
from conftest import REPO, require
from data.curate import runner
from data.curate.worker import read_docs
from data.errors import DataError
from data.pipeline import train_iterator
from data.prepare import from_manifest

# Light settings so the default pipeline runs in seconds on the 33 real sample documents.
_LIGHT = {"mix.vocab_size": 512, "mix.tokenizer_sample_chars": 200_000, "mix.val_fraction": 0.1,
          "workers": 2}


def _cfg(sources: str, out, **overrides):
  cfg = load_preset(str(REPO / "configs/curate.py"))
  with cfg.unlocked():
    cfg.sources, cfg.out = sources, str(out)
    for k, v in {**_LIGHT, **overrides}.items():
      node = cfg
      *parents, leaf = k.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = v
  return cfg


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  from conftest import shared_data
  web = shared_data() / "web"
  require(web.is_dir(), f"shared web samples not found at {web}")
  root = tmp_path_factory.mktemp("inputs")
  real = root / "real"
  real.mkdir()
  for name in ("cc_sample_0000.warc.gz", "ccnet_en_head_0091.jsonl", "dolma_documents_000.json.gz"):
    shutil.copy(web / name, real / name)
  bad = root / "bad"
  bad.mkdir()
  with open(web / "ccnet_en_head_0174.jsonl") as f:
    texts = [json.loads(line)["text"] for line in f]
  good = json.dumps({"text": texts[0]})
  (bad / "mixed.jsonl").write_bytes(good.encode() + b"\n{not json\n" + b'{"text": "\xff\xfe bad"}\n')
  # Five copies of 10 real documents (exact dedup keeps one of each), cut mid-stream.
  raw = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts * 5).encode())
  (bad / "truncated.jsonl.gz").write_bytes(raw[: len(raw) // 2])
  (bad / "junk.txt").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
  (bad / "empty.jsonl").write_bytes(b"")
  return {"real": real, "bad": bad}


@pytest.fixture(scope="module")
def local_run(inputs, tmp_path_factory):
  out = tmp_path_factory.mktemp("curate") / "local"
  cfg = _cfg(f"web={inputs['real']},junk={inputs['bad']}", out, **{"mix.epochs": "web=2"})
  stats = runner.run(cfg, log_fn=lambda _: None)
  return cfg, out, stats


def test_counts_reconcile_and_report(local_run):
  cfg, out, stats = local_run
  st = stats["stages"]
  assert runner.tally_lib.check(stats) == []
  # Every stage's input is the previous stage's output, from the read to the last stage.
  names = ["read"] + list(cfg.pipeline)
  for a, b in zip(names, names[1:]):
    assert st[b]["in"] == st[a]["kept"], (a, b)
  assert st[names[-1]]["kept"] == stats["docs_out"] > 0
  # Malformed inputs were counted and skipped by reason, not fatal.
  assert {"bad_json", "invalid_utf8", "truncated", "binary", "empty_file"} <= set(st["read"]["dropped"])
  # The WARC's HTML was extracted; langid and the quality filters dropped something real.
  assert st["extract"]["in"] > 30 and st["extract"]["kept"] > 10
  assert sum(st["langid"]["dropped"].values()) + sum(st["gopher_quality"]["dropped"].values()) > 0
  report = (out / "report.md").read_text()
  for name in names:
    assert f"`{name}`" in report
  assert "## Dropped samples" in report and "bad_json" in report
  saved = json.loads((out / "stats.json").read_text())
  assert saved["docs_out"] == stats["docs_out"]


def test_shards_train_and_epochs(local_run):
  _, out, stats = local_run
  prepared = from_manifest(out / "shards")
  m = json.loads(prepared.manifest_path.read_text())
  assert m["domains"]["web"]["epochs"] == 2.0
  web = m["domains"]["web"]
  assert web["train"]["docs"] == 2 * web["train"]["unique_docs"]
  assert web["train"]["unique_docs"] + web["val"]["unique_docs"] == stats["domains"]["web"]["docs"]
  batch = next(iter(train_iterator(prepared.manifest_path, seq_len=32, batch_size=2, prefetch=0)))
  assert batch["inputs"].shape == (2, 32)
  # Curated docs keep their provenance.
  docs = [d for f in runner.curated_files(out)["web"] for d in read_docs(f)]
  assert len(docs) == stats["domains"]["web"]["docs"]
  assert any(d.url.startswith("http") and d.host for d in docs)
  assert all(d.meta.get("lang") == "en" for d in docs)


def test_resume_never_redoes_a_finished_shard(local_run, inputs):
  cfg, out, stats = local_run
  work = out / "work"
  before = {p.name: p.stat().st_mtime_ns for p in (work / "map").glob("*.jsonl.zst")}
  # Lose one finished shard of the apply phase, as if the run had been killed there.
  victim = sorted((work / "final").glob("*.json"))[0]
  victim.unlink()
  again = runner.run(cfg, log_fn=lambda _: None)
  after = {p.name: p.stat().st_mtime_ns for p in (work / "map").glob("*.jsonl.zst")}
  assert after == before
  assert victim.exists()
  assert again["docs_out"] == stats["docs_out"]
  assert {k: (v["in"], v["kept"], v["dropped"]) for k, v in again["stages"].items()} == \
      {k: (v["in"], v["kept"], v["dropped"]) for k, v in stats["stages"].items()}


def test_changed_options_refused(local_run):
  cfg, out, _ = local_run
  other = _cfg(cfg.sources, out, **{"stages.gopher_quality.min_doc_words": 10})
  with pytest.raises(DataError, match="gopher_quality"):
    runner.run(other, log_fn=lambda _: None)


def test_ray_runner_identical(local_run, inputs, tmp_path):
  try:
    import ray  # noqa: F401
  except ImportError:
    require(False, "ray is not installed (pip install -e '.[ray]')")
  cfg, out, stats = local_run
  ray_out = tmp_path / "ray"
  ray_cfg = _cfg(cfg.sources, ray_out, **{"mix.epochs": "web=2"})
  try:
    ray_stats = runner.run(ray_cfg, runner="ray", log_fn=lambda _: None)
  finally:
    import ray
    ray.shutdown()
  assert ray_stats["runner"] == "ray"
  for key in ("docs_out", "domains", "samples"):
    assert ray_stats[key] == stats[key], key
  assert {k: (v["in"], v["kept"], v["dropped"], v["counts"]) for k, v in ray_stats["stages"].items()} \
      == {k: (v["in"], v["kept"], v["dropped"], v["counts"]) for k, v in stats["stages"].items()}
  for a, b in zip(sorted((out / "work" / "final").glob("*.jsonl.zst")),
                  sorted((ray_out / "work" / "final").glob("*.jsonl.zst"))):
    assert a.name == b.name
    assert [d.to_json() for d in read_docs(a)] == [d.to_json() for d in read_docs(b)]
  m1 = json.loads((out / "shards" / "manifest.json").read_text())
  m2 = json.loads((ray_out / "shards" / "manifest.json").read_text())
  # Same tokens per split; only the (run-specific) source paths differ.
  drop_sources = lambda m: {n: {k: v for k, v in d.items() if k != "sources"}  # noqa: E731
                            for n, d in m["domains"].items()}
  assert drop_sources(m1) == drop_sources(m2)


def test_plan_rejects_per_document_stage_between_globals():
  with pytest.raises(DataError, match="between global stages"):
    runner.plan(("langid", "exact_dedup", "pii", "minhash"))
  with pytest.raises(DataError, match="unknown stage"):
    runner.plan(("langid", "nope"))
  p = runner.plan(("extract", "langid", "exact_dedup", "minhash", "pii"))
  assert p.pre == ("extract", "langid") and p.globals == ("exact_dedup", "minhash") and p.post == ("pii",)


@pytest.mark.parametrize("args, message", [
    (["--config.stages.gopher_quality.min_doc_wordz=3"], "unknown config key"),
    (["--config.sources=web=/nonexistent/x.jsonl", "--config.out=OUT"], "no such file"),
    (["--config.sources=web=IN", "--config.out=OUT", "--config.pipeline=('langid','bogus')"],
     "unknown stage"),
    (["--config.sources=web=IN", "--config.out=OUT", "--runner=spark"], "unknown runner"),
])
def test_cli_bad_input_is_one_line(args, message, inputs, tmp_path):
  args = [a.replace("OUT", str(tmp_path / "o")).replace("IN", str(inputs["real"])) for a in args]
  r = subprocess.run([sys.executable, "-m", "data.curate", *args], cwd=REPO, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  assert message in r.stderr and "Traceback" not in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_train_reads_the_curated_shards(local_run, tmp_path):
  """`python -m train --config.data.manifest=<out>/shards`: the curated corpus trains as is."""
  from train.config import parse_args
  from train.loop import run
  from train.metrics import read_metrics
  _, out, _ = local_run
  run_dir = tmp_path / "run"
  cfg, _ = parse_args(["--config=configs/lm.py:tiny,smoke", f"--config.data.manifest={out / 'shards'}",
                       f"--config.run.dir={run_dir}", "--config.train.progress=false",
                       "--config.checkpoint.async_save=false", "--config.train.steps=4",
                       "--config.train.eval_every=4", "--config.train.log_every=1",
                       "--config.data.vocab_size=512"])
  run(cfg)
  rows = read_metrics(run_dir)
  assert [r["step"] for r in rows if "loss" in r][-1] == 4
  assert any("val_loss" in r for r in rows)
  assert (run_dir / "tokenizer.model").read_bytes() == (out / "shards" / "tokenizer.model").read_bytes()


def test_model_based_stages_through_the_runner(inputs, tmp_path):
  """quality (a classifier trained by the project's CLI) and perplexity (a checkpoint of this project)
  run in spawned worker processes like every other stage."""
  from conftest import shared_data
  from train.config import parse_args
  from train.loop import run as train
  text = shared_data() / "text"
  q = tmp_path / "q.npz"
  # Reference text: WikiText-2 valid paragraphs, one document each (so the CLI's held-out split,
  # made by document, has positives too).
  with open(tmp_path / "wiki.jsonl", "w") as f:
    for line in (text / "wikitext2_valid.txt").read_text().splitlines():
      if len(line) > 300 and not line.strip().startswith("="):
        f.write(json.dumps({"text": line.strip()}) + "\n")
  r = subprocess.run([sys.executable, "-m", "data.curate.quality", f"--positive={tmp_path / 'wiki.jsonl'}",
                      f"--negative={shared_data() / 'web' / 'cc_sample_000*.warc.gz'}",
                      "--chunk_chars=2000", f"--out={q}"], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads(r.stdout.splitlines()[-1])["val"]["auc"] > 0.9
  with open(tmp_path / "shakespeare.jsonl", "w") as f:
    for i, para in enumerate((text / "tinyshakespeare.txt").read_text().split("\n\n")[:2000]):
      f.write(json.dumps({"id": f"p{i}", "text": para}) + "\n")
  cfg, _ = parse_args(["--config=configs/lm.py:tiny,smoke", f"--config.data.sources=text={tmp_path}/shakespeare.jsonl",
                       f"--config.run.dir={tmp_path}/lm", f"--config.data.cache_dir={tmp_path}/cache",
                       "--config.train.progress=false", "--config.checkpoint.async_save=false",
                       "--config.train.steps=20", "--config.checkpoint.every=20",
                       "--config.train.eval_every=1000"])
  train(cfg)
  pipeline = ("extract", "langid", "quality", "exact_dedup", "perplexity")
  cfg = _cfg(f"web={inputs['real']}", tmp_path / "out", pipeline=pipeline,
             **{"stages.quality.model": str(q), "stages.quality.min_score": 0.05,
                "stages.perplexity.checkpoint": str(tmp_path / "lm"),
                "stages.perplexity.drop_percentile": 80.0, "mix.tokenize": False})
  stats = runner.run(cfg, log_fn=lambda _: None)
  st = stats["stages"]
  assert st["quality"]["in"] == st["langid"]["kept"] and st["quality"]["kept"] > 0
  alive = st["perplexity"]["in"]
  # drop_percentile 80: the 20% with the highest bits per byte, floor(n * 20 / 100) of n scored docs.
  assert st["perplexity"]["dropped"] == {"high_perplexity": alive * 20 // 100}
  docs = [d for f in runner.curated_files(tmp_path / "out")["web"] for d in read_docs(f)]
  assert docs and all(0.05 <= d.meta["quality"] <= 1 and d.meta["perplexity_bpb"] > 0 for d in docs)
