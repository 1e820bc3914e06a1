"""Model-based quality filter: a hashed n-gram logistic regression, reference text vs random web text.

The GPT-3 recipe (Brown et al. 2020, Appendix A: logistic regression on hashed features, WebText /
Wikipedia / books as positives, raw Common Crawl as negatives) and the later fastText quality
classifiers (DCLM, Li et al. 2024: word unigrams + bigrams). The project trains its own model:

  python -m data.curate.quality --positive 'ref/*.jsonl' --negative 'web/*.jsonl.gz' \\
      --out quality.npz [--val_fraction 0.1] [--chunk_chars 2000] [--seed 0]

prints {"train": {...}, "val": {"accuracy", "auc", "n_pos", "n_neg"}, "skipped", "out", ...} as one
JSON line. Inputs (globs, files, or directories of JSONL/Parquet/text) are read by the curation
reader (`data.curate.read`: WARC/WET, JSON lines, Parquet, text, .gz/.zst; bad records are skipped
and counted in "skipped"), and WARC pages go through the `extract` stage with its default settings,
so the classifier is trained on text extracted exactly as the pipeline will extract what it scores.
Documents are split into train/val by document (never by chunk, so no text leaks into val), then
optionally cut into line-aligned chunks of ~`chunk_chars` to get more examples from few long
documents.

The pipeline stage `quality` (registered below) loads the .npz once per worker, writes
P(reference) into `doc.meta["quality"]` and drops documents below `min_score`.

Features: text lower-cased and split into words and single punctuation marks; word 1..n-grams
(n = `ngrams`, default 2) hashed (CRC-32 of the UTF-8 token, then MurmurHash3's 64-bit finalizer:
stable across processes and Python versions, unlike `hash()`) into 2^`buckets_log2` buckets with a
hash-derived sign (Weinberger et al. 2009, so collisions cancel in expectation rather than add up);
each distinct n-gram weighs log1p(count) (sublinear TF); the vector is L2-normalised so long and
short documents score on the same scale. The classifier is L2-regularised logistic regression with
balanced class weights, fitted by L-BFGS (scipy) from zero weights: deterministic, no seed needed for
the fit (the seed only picks the train/val split).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.curate.base import Doc, Stage, register
from data.curate.minhash import fmix64
from data.errors import DataError

FORMAT = 1  # bump when the features change, so an old model is refused instead of mis-scoring
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier combining the hashes of an n-gram's words
_S63 = np.uint64(63)


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  buckets_log2: int = 20   # 1M buckets (4 MB of float32): room for millions of training documents;
                           # on the tests' 2,300 chunks 2^18 scores the same (val AUC 0.996 both)
  ngrams: int = 2          # unigrams + bigrams, as DCLM's fastText classifier
  hash_seed: int = 0
  # Per document: the first max_tokens tokens of the first 64 * max_tokens characters, so a 50 MB
  # line costs what a ~1 MB page does (100k tokens featurize in ~0.2 s).
  max_tokens: int = 100_000

  def __post_init__(self):
    if not 10 <= self.buckets_log2 <= 26:
      raise DataError(f"quality: buckets_log2 must be in [10, 26], got {self.buckets_log2}")
    if not 1 <= self.ngrams <= 5:
      raise DataError(f"quality: ngrams must be in [1, 5], got {self.ngrams}")
    if self.max_tokens < 1:
      raise DataError(f"quality: max_tokens must be >= 1, got {self.max_tokens}")


def featurize(text: str, cfg: FeatureConfig) -> tuple[np.ndarray, np.ndarray]:
  """Sorted bucket indices (int64) and their L2-normalised signed weights (float64)."""
  tokens = _TOKEN_RE.findall(text[:64 * cfg.max_tokens].lower())[:cfg.max_tokens]
  if not tokens:
    return np.zeros(0, np.int64), np.zeros(0, np.float64)
  crc = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in tokens), np.uint64, len(tokens))
  words = fmix64(crc + (np.uint64(cfg.hash_seed) << np.uint64(32)))
  grams = [words]
  for n in range(2, cfg.ngrams + 1):
    m = len(words) - n + 1
    if m <= 0:
      break
    g = words[:m]
    for k in range(1, n):
      g = fmix64(g * _GOLDEN + words[k:k + m])
    grams.append(g)
  hashes, counts = np.unique(np.concatenate(grams), return_counts=True)
  signed = np.where((hashes >> _S63).astype(bool), -1.0, 1.0) * np.log1p(counts)
  buckets = (hashes & np.uint64((1 << cfg.buckets_log2) - 1)).astype(np.int64)
  index, inverse = np.unique(buckets, return_inverse=True)
  values = np.bincount(inverse, weights=signed)
  norm = np.sqrt(values @ values)
  return index, (values / norm if norm > 0 else values)


def feature_matrix(texts: Sequence[str], cfg: FeatureConfig):
  """scipy.sparse CSR [len(texts), 2^buckets_log2] of `featurize` rows."""
  import scipy.sparse  # pylint: disable=g-import-not-at-top

  rows = [featurize(t, cfg) for t in texts]
  indptr = np.cumsum([0] + [len(i) for i, _ in rows])
  indices = np.concatenate([i for i, _ in rows]) if rows else np.zeros(0, np.int64)
  data = np.concatenate([v for _, v in rows]) if rows else np.zeros(0)
  return scipy.sparse.csr_matrix((data, indices, indptr), shape=(len(texts), 1 << cfg.buckets_log2))


@dataclasses.dataclass
class QualityModel:
  """Linear scorer: P(reference | text) = sigmoid(w · x(text) + b)."""
  config: FeatureConfig
  weights: np.ndarray  # float32 [2^buckets_log2]
  bias: float
  info: dict[str, Any] = dataclasses.field(default_factory=dict)  # training counts and metrics

  def score(self, text: str) -> float:
    index, values = featurize(text, self.config)
    return float(_sigmoid(self.weights[index].astype(np.float64) @ values + self.bias))

  def scores(self, texts: Sequence[str]) -> np.ndarray:
    return np.array([self.score(t) for t in texts], np.float64)

  def save(self, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, weights=self.weights, bias=np.float64(self.bias),
                        config=json.dumps({"format": FORMAT, **dataclasses.asdict(self.config)}),
                        info=json.dumps(self.info))
    tmp.replace(path)

  @classmethod
  def load(cls, path: str | Path) -> QualityModel:
    path = Path(path)
    if not path.is_file():
      raise DataError(f"quality model {path}: no such file")
    try:
      with np.load(path, allow_pickle=False) as z:
        config = json.loads(str(z["config"]))
        weights, bias, info = z["weights"], float(z["bias"]), json.loads(str(z["info"]))
    except (OSError, ValueError, KeyError) as e:
      raise DataError(f"quality model {path}: not a model written by data.curate.quality ({e})") from None
    if config.pop("format", None) != FORMAT:
      raise DataError(f"quality model {path}: feature format is not {FORMAT}; retrain it")
    cfg = FeatureConfig(**config)
    if weights.shape != (1 << cfg.buckets_log2,):
      raise DataError(f"quality model {path}: weights shape {weights.shape} does not match "
                      f"buckets_log2={cfg.buckets_log2}")
    return cls(cfg, weights.astype(np.float32), bias, info)


def _sigmoid(z):
  return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form of 1 / (1 + exp(-z))


def train_classifier(positives: Sequence[str], negatives: Sequence[str], *,
                     config: FeatureConfig = FeatureConfig(), l2: float = 1e-4,
                     max_iter: int = 300) -> QualityModel:
  """Fits the logistic regression; the objective is the class-balanced mean log loss + l2/2 |w|^2.

  Balanced weights (each class carries half the loss whatever its count) make P = 0.5 the point where
  a text is as likely reference-like as web-like, so `min_score=0.5` means the same thing for any
  training mix. l2: held-out AUC on the tests' mix (WikiText-2 + stdlib prose vs Common Crawl, 2,300
  training chunks) is 0.994 at 1e-3, 0.996 at 1e-4, 0.997 at 1e-5; below 1e-4 the ~250 web chunks
  are fitted almost exactly (train loss 0.02), memorising rather than generalising, so 1e-4.
  """
  from scipy.optimize import minimize  # pylint: disable=g-import-not-at-top

  if not positives or not negatives:
    raise DataError(f"quality: need both classes to train, got {len(positives)} positive and "
                    f"{len(negatives)} negative texts")
  x = feature_matrix(list(positives) + list(negatives), config)
  y = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
  c = np.where(y == 1, 0.5 / len(positives), 0.5 / len(negatives))  # sums to 1
  xt = x.T.tocsr()

  def objective(theta):
    w, b = theta[:-1], theta[-1]
    z = x @ w + b
    loss = c @ (np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * (w @ w)
    r = c * (_sigmoid(z) - y)
    return loss, np.concatenate([xt @ r + l2 * w, [r.sum()]])

  # The loss is a weighted mean, so gradients are O(1/n): scipy's default gtol (1e-5) would stop it
  # after a few steps; stop on the relative loss change instead (ftol) or at max_iter.
  res = minimize(objective, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B",
                 options=dict(maxiter=max_iter, gtol=1e-12, ftol=1e-9))
  info = dict(n_pos=len(positives), n_neg=len(negatives), l2=l2, iterations=int(res.nit),
              loss=float(res.fun), converged=bool(res.success))
  return QualityModel(config, res.x[:-1].astype(np.float32), float(res.x[-1]), info)


def evaluate(model: QualityModel, positives: Sequence[str], negatives: Sequence[str]) -> dict:
  """Accuracy at 0.5 and ROC AUC (Mann-Whitney, ties count half) on labelled texts."""
  from scipy.stats import rankdata  # pylint: disable=g-import-not-at-top

  s = model.scores(list(positives) + list(negatives))
  n_pos, n_neg = len(positives), len(negatives)
  y = np.concatenate([np.ones(n_pos, bool), np.zeros(n_neg, bool)])
  out = dict(n_pos=n_pos, n_neg=n_neg, accuracy=float(np.mean((s >= 0.5) == y)) if len(s) else None)
  if n_pos and n_neg:
    ranks = rankdata(s)
    out["auc"] = float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
  return out


def chunk_text(text: str, max_chars: int) -> list[str]:
  """Line-aligned pieces of about `max_chars` (a longer single line is its own piece); 0 = whole text."""
  if max_chars <= 0 or len(text) <= max_chars:
    return [text] if text.strip() else []
  out, cur, size = [], [], 0
  for line in text.split("\n"):
    if cur and size + len(line) > max_chars:
      out.append("\n".join(cur))
      cur, size = [], 0
    cur.append(line)
    size += len(line) + 1
  out.append("\n".join(cur))
  return [p for p in out if p.strip()]


# --- pipeline stage ---------------------------------------------------------------------------------

@register
class QualityFilter(Stage):
  """Keeps documents whose P(reference) >= `min_score`; writes the score to `meta["quality"]`.

  min_score 0.5: with the balanced training above, the point where the classifier finds a document
  as likely reference-like as random-web-like. Raise it to keep less: DCLM kept the top 10% of its
  pool by classifier score, which here means reading `min_score` off the scores of a sample.
  """
  name = "quality"
  defaults = {"model": "", "min_score": 0.5}

  def __init__(self, **config: Any):
    super().__init__(**config)
    ms = self.config["min_score"]
    if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not 0.0 <= ms <= 1.0:
      raise DataError(f"stage 'quality': min_score must be a number in [0, 1], got {ms!r}")
    self._model: QualityModel | None = None

  def __getstate__(self) -> dict:  # shipped to workers (Ray) without the 4 MB of weights; setup reloads
    return {**self.__dict__, "_model": None}

  def setup(self) -> None:
    if not self.config["model"]:
      raise DataError("stage 'quality': option 'model' is empty; train one with "
                      "`python -m data.curate.quality --positive ... --negative ... --out model.npz` "
                      "and set --config.stages.quality.model=model.npz")
    self._model = QualityModel.load(self.config["model"])

  def process(self, doc: Doc) -> Doc | str:
    if self._model is None:
      self.setup()
    s = self._model.score(doc.text)
    if s < self.config["min_score"]:
      return "low_quality_score"
    doc.meta["quality"] = round(s, 6)
    return doc


# --- CLI --------------------------------------------------------------------------------------------

def _read_texts(specs: Iterable[str], skipped: collections.Counter) -> list[str]:
  """Texts of every document under `specs`, read and extracted as the curation pipeline does."""
  # pylint: disable=g-import-not-at-top
  from data.curate.extract import Extract
  from data.curate.read import iter_file
  from data.readers import expand_paths

  extract = Extract()  # WARC pages: same main-content settings as the pipeline's `extract` stage
  texts = []
  try:
    for spec in specs:
      for path in expand_paths(spec):
        for doc in iter_file(path, "train", lambda reason, where: skipped.update([reason])):
          out = extract.process(doc)
          if isinstance(out, str):
            skipped[f"extract_{out}"] += 1
          elif out.text.strip():
            texts.append(out.text)
  finally:
    extract.close()
  return texts


def _split(texts: list[str], val_fraction: float, rng: np.random.Generator) -> tuple[list, list]:
  order = rng.permutation(len(texts))
  n_val = round(len(texts) * val_fraction)
  if val_fraction > 0 and len(texts) >= 2:
    n_val = min(max(n_val, 1), len(texts) - 1)  # keep at least one document on each side
  val = sorted(order[:n_val])
  train = sorted(order[n_val:])
  return [texts[i] for i in train], [texts[i] for i in val]


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m data.curate.quality", description=__doc__.split("\n")[0])
  p.add_argument("--positive", action="append", required=True, help="glob/dir/file of reference text")
  p.add_argument("--negative", action="append", required=True, help="glob/dir/file of web text")
  p.add_argument("--out", required=True, help="model path (.npz)")
  p.add_argument("--val_fraction", type=float, default=0.1)
  p.add_argument("--chunk_chars", type=int, default=0, help="split docs into ~N-char pieces; 0 = no")
  p.add_argument("--seed", type=int, default=0, help="train/val split")
  p.add_argument("--l2", type=float, default=1e-4)
  p.add_argument("--buckets_log2", type=int, default=FeatureConfig.buckets_log2)
  p.add_argument("--ngrams", type=int, default=FeatureConfig.ngrams)
  p.add_argument("--hash_seed", type=int, default=FeatureConfig.hash_seed)
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  try:
    if not 0.0 <= args.val_fraction < 1.0:
      raise DataError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    cfg = FeatureConfig(buckets_log2=args.buckets_log2, ngrams=args.ngrams, hash_seed=args.hash_seed)
    rng = np.random.default_rng(args.seed)
    splits, skipped = {}, collections.Counter()
    for label, specs in (("pos", args.positive), ("neg", args.negative)):
      train, val = _split(_read_texts(specs, skipped), args.val_fraction, rng)
      splits[label] = [[c for t in part for c in chunk_text(t, args.chunk_chars)]
                       for part in (train, val)]
    model = train_classifier(splits["pos"][0], splits["neg"][0], config=cfg, l2=args.l2)
    report = {"train": evaluate(model, splits["pos"][0], splits["neg"][0])}
    if splits["pos"][1] or splits["neg"][1]:
      report["val"] = evaluate(model, splits["pos"][1], splits["neg"][1])
    model.info.update(report, seed=args.seed, val_fraction=args.val_fraction,
                      chunk_chars=args.chunk_chars)
    model.save(args.out)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({**report, "fit": {k: model.info[k] for k in ("iterations", "loss", "converged")},
                    "skipped": dict(sorted(skipped.items())), "out": str(args.out),
                    "seconds": round(time.perf_counter() - t0, 2)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
