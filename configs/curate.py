"""Curation presets for `python -m data.curate --config=configs/curate.py[:arg]`.

  (no arg)      the default pipeline; give --config.sources="web=/cc/*.warc.gz,wiki=..." and
                --config.out=DIR
  web_samples   the real web samples in ../shared/data/web (WARC, CCNet and Dolma JSONL) -> the
                `web` domain, out runs/curate/web_samples

Every stage's options are under `stages.<name>` with the stage's own defaults (the published ones:
Gopher, C4, FineWeb, 14x8 MinHash bands, 13-gram decontamination); e.g.
`--config.stages.gopher_quality.min_doc_words=100`. The model-based stages (`quality`, `perplexity`)
need a model, so they are not in the default pipeline: add them with
`--config.pipeline="('extract','langid',...,'quality',...)"` and `--config.stages.quality.model=...`.
"""
from __future__ import annotations

from ml_collections import ConfigDict

# Order follows FineWeb's: cheap per-document filters first, then the corpus-wide dedup (fewer
# documents to hash), and PII last so only the kept documents are scanned and redacted.
DEFAULT_PIPELINE = (
    "extract", "langid", "gopher_repetition", "gopher_quality", "c4", "fineweb", "toxic",
    "decontam", "exact_dedup", "url_dedup", "minhash", "line_dedup", "pii")


def get_config(arg: str | None = None) -> ConfigDict:
  from data.curate import registry  # noqa: F401  (fills STAGES)
  from data.curate.base import STAGES, shared_data_dir

  c = ConfigDict()
  c.sources = ""      # "name=glob[,name2=glob2]": files, globs or directories per mixture domain
  c.out = ""          # output directory (see data/curate/runner.py for its layout)
  c.runner = "local"  # local | ray
  c.workers = 0       # processes (local) or actors (ray); 0 = all CPUs
  c.ray_address = ""  # "" = start a local Ray; "auto" or ray://host:10001 to join a cluster
  c.seed = 0
  c.pipeline = DEFAULT_PIPELINE
  c.stages = ConfigDict({name: dict(cls.defaults) for name, cls in sorted(STAGES.items())})
  c.report = ConfigDict(dict(samples_per_reason=3))
  c.mix = ConfigDict(dict(
      tokenize=True,          # False: stop after curation (the curated JSON lines are the output)
      tokenizer="",           # "" = train one on the curated text
      vocab_size=4096,
      tokenizer_sample_chars=20_000_000,
      val_fraction=0.01,
      epochs="",              # "wiki=3": upsample a domain's training documents
      weights="",             # "web=0.7,wiki=0.3": default mixture weights in the manifest
  ))
  if arg == "web_samples":
    c.sources = f"web={shared_data_dir() / 'web'}"
    c.out = "runs/curate/web_samples"
  elif arg:
    raise ValueError(f"unknown curate preset {arg!r}: use web_samples or nothing")
  return c
