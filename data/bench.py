"""Curation benchmark: `python -m data.bench` prints one JSON line per figure.

  python -m data.bench                       # 50,000 docs, all CPUs (~5 min on 2 cores)
  python -m data.bench --docs=5000 --compare_docs=2000 --filter_docs=1000   # a quick look

The corpus is `data.curate.benchcorpus.build_bench_corpus`: documents built reproducibly (seeded)
from the real samples in ../shared/data and the embedded stdlib corpus, 10% of them planted
near-duplicates of another, so dedup precision and recall are measured against ground truth.
Lines printed ("bench" names the figure):

  corpus            docs, MB of text, planted copies, build time
  stage             docs/s of each per-document stage, one process (extract on real WARC HTML,
                    the others on the corpus); MB/s
  end_to_end        the default pipeline through the local runner on all CPUs, corpus in 50
                    files: docs/s and MB/s of input text, wall time (tokenization not included)
  dedup             exact_dedup + minhash alone on the whole corpus: precision / recall of the
                    planted copies (cluster-level, `benchcorpus.precision_recall`)
  minhash_vs_datasketch   ours vs datasketch MinHash + MinHashLSH, same shingles, 14x8 bands:
                    docs/s each, speedup, agreement on duplicate pairs (goal >= 5x, >= 0.95)
  filter_vs_datatrove     gopher_repetition, gopher_quality, c4, fineweb vs datatrove's filters with
                    equal parameters: identical keep/drop share, docs/s, speedup (goal >= 99%, >= 2x)

Needs the test extras (datasketch, datatrove[processing], spacy) and ../shared/data ($SHARED_DATA).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data.errors import DataError


def _emit(**row) -> None:
  print(json.dumps(row), flush=True)


def _mb(texts) -> float:
  return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def _stage_speeds(docs, shared: Path, limit: int) -> None:
  from data.curate import registry  # noqa: F401
  from data.curate.base import STAGES, Doc, GlobalStage
  from data.curate import read as read_lib
  from configs.curate import DEFAULT_PIPELINE

  # extract: on the real Common Crawl HTML (the corpus is plain text), repeated to ~1 s of work.
  html = []
  for name in ("cc_sample_0000.warc.gz", "cc_sample_0001.warc.gz"):
    html += [d for d in read_lib.iter_file(shared / "web" / name, "web", lambda r, w: None) if d.html]
  stage = STAGES["extract"]()
  stage.setup()
  stage.process(Doc(id="warm", text="", domain="web", html="<p>warm up</p>"))
  # Fresh Doc objects each round: `extract` clears `html` on the docs it processes.
  batch = [Doc(id=d.id, text="", domain="web", html=d.html) for _ in range(8) for d in html]
  mb = _mb(d.html for d in batch)
  t0 = time.perf_counter()
  kept = sum(not isinstance(stage.process(d), str) for d in batch)
  s = time.perf_counter() - t0
  _emit(bench="stage", stage="extract", docs=len(batch), kept=kept,
        docs_per_s=round(len(batch) / s, 1), mb_per_s=round(mb / s, 2),
        input="real Common Crawl HTML (2 WARCs x8)")

  sample = docs[:limit]
  for name in DEFAULT_PIPELINE:
    cls = STAGES[name]
    if name == "extract" or issubclass(cls, GlobalStage):
      continue
    stage = cls()
    stage.setup()
    fresh = [Doc(id=d.id, text=d.text, domain=d.domain, url=d.url, host=d.host) for d in sample]
    t0 = time.perf_counter()
    kept = sum(not isinstance(stage.process(d), str) for d in fresh)
    s = time.perf_counter() - t0
    _emit(bench="stage", stage=name, docs=len(fresh), kept=kept, docs_per_s=round(len(fresh) / s, 1),
          mb_per_s=round(_mb(d.text for d in sample) / s, 2), input="bench corpus")


def _global_speeds_and_dedup(docs, dup_of, shard_docs: int) -> None:
  from data.curate import registry  # noqa: F401
  from data.curate.base import STAGES
  from data.curate.benchcorpus import precision_recall

  shards = [docs[i:i + shard_docs] for i in range(0, len(docs), shard_docs)]
  alive = [np.ones(len(s), dtype=bool) for s in shards]
  with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
    for name in ("exact_dedup", "minhash"):
      stage = STAGES[name]()
      stage.setup()
      t0 = time.perf_counter()
      summaries = [stage.summarize(s) for s in shards]
      t1 = time.perf_counter()
      (Path(tmp) / name).mkdir()
      decisions = stage.decide(summaries, alive, Path(tmp) / name)
      t2 = time.perf_counter()
      for a, d in zip(alive, decisions):
        a &= np.array([not isinstance(x, str) for x in d], dtype=bool)
      dropped = ~np.concatenate(alive)
      _emit(bench="stage", stage=name, docs=len(docs), docs_per_s=round(len(docs) / (t2 - t0), 1),
            summarize_s=round(t1 - t0, 2), decide_s=round(t2 - t1, 2), input="bench corpus")
      _emit(bench="dedup", stages="exact_dedup" if name == "exact_dedup" else "exact_dedup+minhash",
            **precision_recall(dropped, dup_of))


def _end_to_end(docs, workers: int) -> None:
  from configs.loader import load_preset
  from data.curate import runner
  from data.curate.worker import write_docs

  with tempfile.TemporaryDirectory(prefix="data-bench-e2e-") as tmp:
    inp = Path(tmp) / "in"
    inp.mkdir()
    per_file = -(-len(docs) // 50)
    for i in range(0, len(docs), per_file):
      write_docs(inp / f"part-{i // per_file:03d}.jsonl.zst", docs[i:i + per_file])
    cfg = load_preset(str(Path(__file__).resolve().parents[1] / "configs/curate.py"))
    with cfg.unlocked():
      cfg.sources, cfg.out, cfg.workers = f"web={inp}", str(Path(tmp) / "out"), workers
      cfg.mix.tokenize = False
    t0 = time.perf_counter()
    stats = runner.run(cfg, log_fn=lambda _: None)
    wall = time.perf_counter() - t0
  mb = _mb(d.text for d in docs)
  _emit(bench="end_to_end", docs=len(docs), mb=round(mb, 2), workers=workers or os.cpu_count(),
        wall_s=round(wall, 1), docs_per_s=round(len(docs) / wall, 1), mb_per_s=round(mb / wall, 3),
        kept=stats["docs_out"], seconds={k: round(v, 1) for k, v in stats["seconds"].items()})


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m data.bench", description=__doc__.split("\n")[0])
  p.add_argument("--docs", type=int, default=50_000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workers", type=int, default=0, help="end-to-end processes; 0 = all CPUs")
  p.add_argument("--stage_docs", type=int, default=5_000, help="docs per single-stage timing")
  p.add_argument("--compare_docs", type=int, default=50_000, help="docs for the datasketch comparison")
  p.add_argument("--filter_docs", type=int, default=10_000, help="docs for the datatrove comparison")
  p.add_argument("--skip", default="", help="comma list of: stages,dedup,e2e,datasketch,datatrove")
  args = p.parse_args(argv)
  skip = set(filter(None, args.skip.split(",")))
  from data.curate.base import shared_data_dir
  from data.curate.benchcorpus import build_bench_corpus
  shared = shared_data_dir()
  if not (shared / "web").is_dir():
    raise DataError(f"shared data not found at {shared} (set SHARED_DATA)")
  t0 = time.perf_counter()
  docs, dup_of = build_bench_corpus(n_docs=args.docs, seed=args.seed)
  _emit(bench="corpus", docs=len(docs), mb=round(_mb(d.text for d in docs), 2),
        planted_copies=int((dup_of >= 0).sum()), build_s=round(time.perf_counter() - t0, 2),
        cpus=os.cpu_count())
  texts = [d.text for d in docs]
  if "stages" not in skip:
    _stage_speeds(docs, shared, args.stage_docs)
  if "dedup" not in skip:
    _global_speeds_and_dedup(docs, dup_of, shard_docs=1000)
  if "e2e" not in skip:
    _end_to_end(docs, args.workers)
  if "datasketch" not in skip:
    from data.curate.minhash import compare_with_datasketch
    r = compare_with_datasketch(texts[:args.compare_docs])
    _emit(bench="minhash_vs_datasketch", **{k: round(v, 4) if isinstance(v, float) else v
                                            for k, v in r.items()})
  if "datatrove" not in skip:
    from data.curate.filters_ref import compare_with_datatrove
    for r in compare_with_datatrove(texts[:args.filter_docs]):
      _emit(bench="filter_vs_datatrove", **{k: round(v, 4) if isinstance(v, float) else v
                                            for k, v in r.items()})
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
