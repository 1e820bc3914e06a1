"""Mix step of curation: curated documents -> tokenizer + token shards with domain weights and epochs.

Library module; `data.curate.runner` calls `tokenize` at the end of a run. Tokenization is the
foundation's own (`data.shards.build_shards`, the format `data.pipeline` reads), so a curated corpus
trains exactly like a prepared one: `python -m train --config.data.manifest=<out>/shards`.

  mix.tokenizer   "" = train a SentencePiece tokenizer (mix.vocab_size) on a sample of the curated
                  text, equal share per domain; else the path of an existing .model
  mix.epochs      "wiki=3" = write each training document of `wiki` 3 times (upsampling reference
                  text, as GPT-3 and Llama did); fractional values repeat a hash-chosen fraction
  mix.weights     "web=0.7,wiki=0.3" = default mixture weights stored in the manifest; "" = by
                  token count (which then includes the epochs' repeats)
"""
from __future__ import annotations

import shutil
from pathlib import Path

from data.errors import DataError
from data.prepare import parse_weights, sample_texts
from data.shards import build_shards
from data.tokenizer import Tokenizer, train_tokenizer


def tokenize(files: dict[str, list[Path]], out: Path, cfg, domains: list[str]) -> dict:
  """Writes `out`/tokenizer.model and `out`/shards/; returns a summary for stats.json."""
  m = cfg.mix
  epochs = parse_weights(m.epochs) if m.epochs else {}
  weights = parse_weights(m.weights) if m.weights else {}
  empty = sorted(set(domains) - set(files))
  for what, values in (("mix.epochs", epochs), ("mix.weights", weights)):
    if set(values) & set(empty):
      raise DataError(f"{what} names domain(s) {sorted(set(values) & set(empty))} that kept no "
                      f"documents after curation")
  if not files:
    raise DataError("curation kept no documents: nothing to tokenize (see report.md)")
  tok_path = out / "tokenizer.model"
  if m.tokenizer:
    src = Path(m.tokenizer).expanduser()
    Tokenizer.load(src)  # DataError if missing or not a SentencePiece model
    if src.resolve() != tok_path.resolve():
      shutil.copyfile(src, tok_path)
  else:
    train_tokenizer(sample_texts(files, m.tokenizer_sample_chars, cfg.seed), m.vocab_size,
                    tok_path, seed=cfg.seed)
  manifest = build_shards(files, tok_path, out / "shards", val_fraction=m.val_fraction,
                          num_workers=cfg.workers or None, epochs=epochs, weights=weights,
                          provenance={"curated": str(out.resolve()), "pipeline": list(cfg.pipeline)})
  # Beside the manifest too, so `data.prepare.from_manifest` (and `train --config.data.manifest`)
  # finds the tokenizer the shards were built with.
  shutil.copyfile(tok_path, out / "shards" / "tokenizer.model")
  return {
      "tokenizer": str(tok_path), "manifest": str(out / "shards" / "manifest.json"),
      "vocab_size": manifest["vocab_size"], "empty_domains": empty,
      "domains": {n: {"epochs": d["epochs"], "train_docs": d["train"]["docs"],
                      "train_unique_docs": d["train"]["unique_docs"], "train_tokens": d["train"]["tokens"],
                      "val_docs": d["val"]["docs"], "val_tokens": d["val"]["tokens"]}
                  for n, d in manifest["domains"].items()},
      "weights": manifest.get("weights", {}),
  }
