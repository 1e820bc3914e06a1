"""Chinchilla scaling-law fits (Hoffmann et al. 2022, §3): three ways to find the compute-optimal N and D.

    python -m train.scaling --results runs/sweeps/isoflop_cpu/results.csv [--curves curves.csv]
        [--out DIR] [--loss val_loss|final_train_loss] [--n-column N|N_kaplan] [--target-flops 1e15 ...]
        [--predict N:D ...] [--n-boot 200] [--seed 0]

reads what `python -m train.sweep` writes (rows with status "done"), runs every approach the data
supports, prints a summary and writes `fits.json` and the figures of `train.scaling_plots` beside the
results (or in --out). The same fits are a Python API for notebooks:

- Approach 1, `fit_envelope(curves)`: the minimum-loss envelope of the training curves over compute;
  `fit_envelope_final(n, d, c, loss)` is the fallback when only final points exist (their lower envelope).
- Approach 2, `fit_isoflop(n, d, c, loss)`: a parabola of loss against log N per compute budget.
- Approach 3, `fit_parametric(n, d, loss)`: L(N, D) = E + A/N^α + B/D^β by Huber regression in log space.

Each gives N_opt ∝ C^a and D_opt ∝ C^b; the paper found a ≈ b ≈ 0.5 (Table 2).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import pathlib
import sys
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage, optimize, special
from threadpoolctl import threadpool_limits

from configs.loader import ConfigError, main_guard

PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


def _interval(samples: np.ndarray, ci: float, axis: int = 0):
  """Percentile bootstrap interval: the central `ci` mass of the samples."""
  lo, hi = np.nanpercentile(samples, [50 * (1 - ci), 50 * (1 + ci)], axis=axis)
  return lo, hi


# ------------------------------------------------------------------ power laws

@dataclasses.dataclass
class PowerLaw:
  """y = k · x^exponent, fitted by least squares in log–log space (kept as ln k: k overflows for the
  steep laws that C ~ 1e12 and a poor sweep can give)."""
  log_k: float
  exponent: float
  interval: tuple[float, float] | None = None  # of the exponent, where a bootstrap gave one.

  @property
  def k(self) -> float:
    return math.exp(self.log_k) if self.log_k < 700 else math.inf

  def __call__(self, x):
    return np.exp(self.log_k + self.exponent * np.log(np.asarray(x, float)))

  def to_dict(self) -> dict:
    return dict(k=self.k, log_k=self.log_k, exponent=self.exponent, exponent_interval=self.interval)


def fit_power_law(x, y) -> PowerLaw:
  logx, logy = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
  if len(np.unique(logx)) < 2:
    raise ValueError("a power law needs at least 2 distinct x values")
  slope, intercept = np.polyfit(logx, logy, 1)
  return PowerLaw(log_k=float(intercept), exponent=float(slope))


# ------------------------------------------------------------------ Approach 1: envelope

@dataclasses.dataclass
class Envelope:
  """Approach 1: the lowest loss reached at each compute C, and by which run (its N and tokens D)."""
  c: np.ndarray
  n_opt: np.ndarray
  d_opt: np.ndarray
  loss: np.ndarray
  used: np.ndarray  # mask of the points the power laws were fitted on.
  n_law: PowerLaw
  d_law: PowerLaw
  source: str  # "curves" or "final points".
  notes: list[str] = dataclasses.field(default_factory=list)

  def to_dict(self) -> dict:
    return dict(source=self.source, points=int(len(self.c)), used=int(self.used.sum()),
                n_opt=self.n_law.to_dict(), d_opt=self.d_law.to_dict(), notes=self.notes)


def _fit_envelope_laws(c, n, d, loss, edge, source, notes) -> Envelope:
  used = ~edge
  if len(np.unique(n[used])) < 2:
    # Too few interior winners to fit on: keep the edge points rather than fit nothing.
    notes.append("fewer than 2 interior sizes win anywhere; the fit includes envelope points won by "
                 "the smallest/largest size, so the exponents are biased toward the sampled range")
    used = np.ones_like(edge)
  if len(np.unique(c[used])) < 2:
    raise ValueError(f"envelope from {source} has fewer than 2 distinct compute values to fit on")
  return Envelope(c=c, n_opt=n, d_opt=d, loss=loss, used=used, n_law=fit_power_law(c[used], n[used]),
                  d_law=fit_power_law(c[used], d[used]), source=source, notes=notes)


def fit_envelope(curves: Mapping, *, n_points: int = 100, smooth: int = 5,
                 drop_edges: bool = True) -> Envelope:
  """Approach 1 from training curves: columns `name, N, tokens, C, loss` (a dict of arrays or a DataFrame).

  Each run's loss is smoothed (moving mean over `smooth` logged points: one logged batch loss is noisy)
  and interpolated linearly in log C, never extrapolated. At `n_points` log-spaced C covered by at least
  2 runs the lowest run wins: N_opt(C) is its N, D_opt(C) its tokens at C. Points won by the smallest or
  largest N among the runs covering C are left out of the power-law fits when `drop_edges` (the optimum
  may lie beyond them: e.g. where small runs have already ended), unless that leaves fewer than 2 sizes.
  Caveat (paper §3.1): a run mid-schedule is compared with another's annealed end, so runs with one
  cosine length per size bias the envelope toward the runs' final points.
  """
  names = np.asarray(curves["name"]).astype(str)
  cols = {k: np.asarray(curves[k], float) for k in ("N", "tokens", "C", "loss")}
  if not np.all(np.isfinite(cols["loss"])):
    bad = sorted(set(names[~np.isfinite(cols["loss"])]))
    raise ValueError(f"non-finite loss in the training curves of {', '.join(bad)}")
  runs = []
  for name in dict.fromkeys(names):
    m = (names == name) & (cols["C"] > 0) & (cols["tokens"] > 0)
    order = np.argsort(cols["C"][m])
    logc = np.log(cols["C"][m][order])
    if len(logc) < 2:
      continue
    loss = cols["loss"][m][order]
    if smooth > 1:
      loss = ndimage.uniform_filter1d(loss, size=min(smooth, len(loss)), mode="nearest")
    runs.append((cols["N"][m][0], logc, loss, np.log(cols["tokens"][m][order])))
  if len(runs) < 2:
    raise ValueError(f"the envelope needs curves of at least 2 runs with 2+ logged points ({len(runs)} found)")
  grid = np.linspace(min(r[1][0] for r in runs), max(r[1][-1] for r in runs), n_points)
  out = []
  for x in grid:
    cands = [r for r in runs if r[1][0] <= x <= r[1][-1]]
    if len(cands) < 2:
      continue
    losses = [np.interp(x, r[1], r[2]) for r in cands]
    best = cands[int(np.argmin(losses))]
    sizes = [r[0] for r in cands]
    out.append((math.exp(x), best[0], math.exp(np.interp(x, best[1], best[3])), min(losses),
                best[0] in (min(sizes), max(sizes))))
  if not out:
    raise ValueError("no compute value is covered by 2 or more training curves")
  c, n, d, loss, edge = map(np.array, zip(*out))
  return _fit_envelope_laws(c, n, d, loss, edge & drop_edges, "curves", [])


def fit_envelope_final(n, d, c, loss, *, drop_edges: bool = True, tol: float = 0.1) -> Envelope:
  """Approach 1 fallback from final points only: the lowest-loss run of each compute cluster (runs within
  `tol` of each other in C, as `group_budgets`), kept where it beats every cluster of smaller C.

  With an IsoFLOP design this is the best sampled point per budget (Approach 2 without the parabola).
  """
  n, d, c, loss = (np.asarray(v, float) for v in (n, d, c, loss))
  keep, best = [], np.inf
  for g in group_budgets(c, tol=tol):
    i = g[np.argmin(loss[g])]
    if loss[i] < best:
      keep.append(i)
      best = loss[i]
  keep = np.array(keep)
  edge = (n[keep] == n.min()) | (n[keep] == n.max()) if drop_edges else np.zeros(len(keep), bool)
  return _fit_envelope_laws(c[keep], n[keep], d[keep], loss[keep], edge, "final points", [])


# ------------------------------------------------------------------ Approach 2: IsoFLOP profiles

@dataclasses.dataclass
class Budget:
  """One IsoFLOP profile: its runs, the parabola loss = p[0]·x² + p[1]·x + p[2] in x = ln N, the vertex."""
  c: float
  n: np.ndarray
  d: np.ndarray
  loss: np.ndarray
  coeffs: np.ndarray
  n_opt: float
  d_opt: float
  loss_opt: float
  inside: bool  # vertex within the sampled N range (outside: extrapolated, less trustworthy).

  def to_dict(self) -> dict:
    return dict(C=self.c, points=int(len(self.n)), N_opt=self.n_opt, D_opt=self.d_opt,
                loss_opt=self.loss_opt, vertex_inside_sampled_N=self.inside)


@dataclasses.dataclass
class IsoFlopFit:
  budgets: list[Budget]
  skipped: list[tuple[float, str]]  # (budget C, why).
  n_law: PowerLaw
  d_law: PowerLaw
  n_boot: int  # bootstrap resamples that gave a fit.

  def to_dict(self) -> dict:
    return dict(budgets=[b.to_dict() for b in self.budgets],
                skipped=[dict(C=c, reason=r) for c, r in self.skipped],
                n_opt=self.n_law.to_dict(), d_opt=self.d_law.to_dict(), bootstrap_fits=self.n_boot)


def group_budgets(c, *, tol: float = 0.1) -> list[np.ndarray]:
  """Indices of runs grouped by compute: sorted ln C, a new group wherever the gap exceeds ln(1 + tol).

  `train.design` puts a budget's runs within ~1% of each other and budgets ≥×2 apart, so 10% separates
  them unambiguously.
  """
  logc = np.log(np.asarray(c, float))
  order = np.argsort(logc)
  breaks = np.nonzero(np.diff(logc[order]) > math.log1p(tol))[0] + 1
  return [np.sort(g) for g in np.split(order, breaks)]


def fit_parabola(n, loss) -> tuple[np.ndarray, float]:
  """Coefficients of loss against x = ln N (highest power first) and the vertex N; ValueError if concave."""
  x = np.log(np.asarray(n, float))
  if len(np.unique(x)) < 3:
    raise ValueError(f"{len(np.unique(x))} distinct sizes, a parabola needs 3")
  coeffs = np.polyfit(x, np.asarray(loss, float), 2)
  if coeffs[0] <= 0:
    raise ValueError("loss is not convex in log N here (parabola opens downward: no minimum)")
  log_vertex = -coeffs[1] / (2 * coeffs[0])
  if not abs(log_vertex) < 700:  # exp() would over/underflow: a nearly flat parabola, no usable vertex.
    raise ValueError(f"the parabola is nearly flat: its vertex ln N = {log_vertex:.3g} is out of any range")
  return coeffs, float(np.exp(log_vertex))


def _profile(c, n, d, loss) -> Budget:
  coeffs, n_opt = fit_parabola(n, loss)
  # D_opt from the runs' own log D–log N line (not C/6N): keeps the exact FLOP accounting of the sweep.
  slope, intercept = np.polyfit(np.log(n), np.log(d), 1)
  x = math.log(n_opt)
  return Budget(c=c, n=n, d=d, loss=loss, coeffs=coeffs, n_opt=n_opt, d_opt=math.exp(intercept + slope * x),
                loss_opt=float(np.polyval(coeffs, x)), inside=bool(n.min() <= n_opt <= n.max()))


def fit_isoflop(n, d, c, loss, *, tol: float = 0.1, n_boot: int = 200, ci: float = 0.95,
                seed: int = 0) -> IsoFlopFit:
  """Approach 2: per budget a parabola in ln N (≥3 sizes), N_opt at its vertex; then N_opt, D_opt ∝ C^a, C^b.

  Intervals on a and b: a stratified bootstrap (runs resampled with replacement within each budget, every
  profile refitted); resamples where some profile has < 3 distinct sizes or no minimum are dropped.
  """
  n, d, c, loss = (np.asarray(v, float) for v in (n, d, c, loss))
  groups, budgets, skipped = group_budgets(c, tol=tol), [], []
  for g in groups:
    cg = float(np.exp(np.log(c[g]).mean()))
    try:
      budgets.append(_profile(cg, n[g], d[g], loss[g]))
    except ValueError as e:
      skipped.append((cg, str(e)))
  if len(budgets) < 2:
    raise ValueError(f"IsoFLOP fit needs 2 budgets with a minimum, got {len(budgets)} "
                     f"(skipped: {'; '.join(f'C={s[0]:.3g}: {s[1]}' for s in skipped) or 'none'})")
  bc = [b.c for b in budgets]
  n_law = fit_power_law(bc, [b.n_opt for b in budgets])
  d_law = fit_power_law(bc, [b.d_opt for b in budgets])
  rng, exps = np.random.default_rng(seed), []
  for _ in range(n_boot):
    try:
      resampled = []
      for b in budgets:
        i = rng.integers(0, len(b.n), len(b.n))
        resampled.append(_profile(b.c, b.n[i], b.d[i], b.loss[i]))
      exps.append((fit_power_law(bc, [r.n_opt for r in resampled]).exponent,
                   fit_power_law(bc, [r.d_opt for r in resampled]).exponent))
    except (ValueError, np.linalg.LinAlgError):
      continue
  if exps:
    lo, hi = _interval(np.array(exps), ci)
    n_law.interval, d_law.interval = (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))
  return IsoFlopFit(budgets=budgets, skipped=skipped, n_law=n_law, d_law=d_law, n_boot=len(exps))


# ------------------------------------------------------------------ Approach 3: parametric loss

# Paper §D.2: α, β ∈ {0, 0.5, ..., 2}, e ∈ {−1, −0.5, ..., 1}, a, b ∈ {0, 5, ..., 25}: 4500 starts.
PAPER_GRID = dict(alpha=np.arange(0, 2.01, 0.5), beta=np.arange(0, 2.01, 0.5), e=np.arange(-1, 1.01, 0.5),
                  a=np.arange(0, 25.1, 5), b=np.arange(0, 25.1, 5))


def init_grid(grid: Mapping | None = None) -> np.ndarray:
  """Starting points θ = (a, b, e, α, β), one row each, from a dict of per-parameter values."""
  g = {**PAPER_GRID, **(grid or {})}
  return np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])), float)


def parametric_objective(theta, log_n, log_d, log_loss, delta: float = 1e-3):
  """Σ Huber_δ(LSE(a − α ln N, b − β ln D, e) − ln L) and its gradient in θ = (a, b, e, α, β).

  LSE of the three terms is ln(A/N^α + B/D^β + E): the fit is in log space, robust to outliers.
  """
  a, b, e, alpha, beta = theta
  t = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  m = t.max(axis=0)  # shift by the max: exp never overflows (a starts as large as 25).
  w = np.exp(t - m)
  s = w.sum(axis=0)
  r = m + np.log(s) - log_loss
  w /= s  # softmax weights = ∂LSE/∂(each term).
  g = np.clip(r, -delta, delta)  # Huber'(r)
  grad = np.array([g @ w[0], g @ w[1], g @ w[2], -(g * w[0]) @ log_n, -(g * w[1]) @ log_d])
  return float(special.huber(delta, r).sum()), grad


def _theta_to_params(theta) -> np.ndarray:
  a, b, e, alpha, beta = theta
  with np.errstate(over="ignore"):  # a diverged fit (a → ∞ with α) gives inf; callers drop it.
    return np.array([np.exp(e), np.exp(a), np.exp(b), alpha, beta])  # E, A, B, α, β


def _minimize(theta0, args, *, polish: bool = False):
  # The objective is tiny (δ² scale) and L-BFGS-B's ftol is relative to max(|f|, 1), so its defaults
  # stop within ~1e-4 (relative) of the optimum: enough to rank the grid's starts, 3× faster than tight
  # tolerances (measured on 300 starts). The best few are polished with tight ones, and so is every
  # bootstrap refit: started at the full fit's optimum, a loose refit barely moves and the intervals shrink.
  options = dict(maxiter=2000, ftol=1e-15, gtol=1e-12) if polish else dict(maxiter=1000)
  return optimize.minimize(parametric_objective, theta0, args=args, jac=True, method="L-BFGS-B",
                           options=options)


@dataclasses.dataclass
class ParametricFit:
  """Approach 3: L(N, D) = E + A/N^alpha + B/D^beta, with bootstrap intervals."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  objective: float
  n_points: int
  delta: float
  ci: float
  intervals: dict[str, tuple[float, float]]
  boot: np.ndarray  # (fits, 5): E, A, B, alpha, beta of every bootstrap fit.
  n_starts: int

  @property
  def params(self) -> np.ndarray:
    return np.array([self.E, self.A, self.B, self.alpha, self.beta])

  @staticmethod
  def _law(p, n, d):
    # A/N^α as exp(ln A − α ln N): a wild bootstrap refit (A → 0, α ≪ 0) gives a number, not 0·inf.
    with np.errstate(divide="ignore", over="ignore"):
      return (p[0] + np.exp(np.log(p[1]) - p[3] * np.log(np.asarray(n, float)))
              + np.exp(np.log(p[2]) - p[4] * np.log(np.asarray(d, float))))

  def predict(self, n, d):
    return self._law(self.params, n, d)

  def predict_interval(self, n, d) -> tuple[np.ndarray, np.ndarray]:
    if not len(self.boot):
      raise ValueError("no bootstrap fits: refit with n_boot > 0")
    return _interval(np.stack([self._law(p, n, d) for p in self.boot]), self.ci)

  @property
  def has_optimum(self) -> bool:
    """Whether loss falls with both N and D (alpha, beta > 0), so a compute-optimal allocation exists."""
    return self.alpha > 0 and self.beta > 0

  @property
  def exponents(self) -> tuple[float, float]:
    """(a, b) of N_opt ∝ C^a, D_opt ∝ C^b: β/(α+β), α/(α+β)."""
    return self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)

  @classmethod
  def _optimum(cls, p, c: float, fpt: Callable | None) -> tuple[float, float]:
    e, a, b, alpha, beta = p
    if not (alpha > 0 and beta > 0 and a > 0 and b > 0):
      return math.nan, math.nan  # loss does not fall with both N and D: no interior optimum.
    g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))  # paper eq. 4, with C = 6ND.
    n0 = g * (c / 6) ** (beta / (alpha + beta))
    if fpt is None:
      return n0, (c / 6) ** (alpha / (alpha + beta)) / g
    # Exact FLOPs: min over N of L(N, C/fpt(N)), a grid ±10⁴ around the 6ND answer then a bounded refine.
    x = np.linspace(math.log(n0) - 9.2, math.log(n0) + 9.2, 1201)
    f = np.asarray(fpt(np.exp(x)), float)
    if f.shape != x.shape:
      f = np.array([float(fpt(v)) for v in np.exp(x)])
    i = int(np.argmin(cls._law(p, np.exp(x), c / f)))
    lo, hi = x[max(i - 1, 0)], x[min(i + 1, len(x) - 1)]
    res = optimize.minimize_scalar(lambda v: float(cls._law(p, math.exp(v), c / float(fpt(math.exp(v))))),
                                   bounds=(lo, hi), method="bounded", options=dict(xatol=1e-10))
    n = math.exp(res.x)
    return n, c / float(fpt(n))

  def compute_optimal(self, c, flops_per_token: Callable | None = None, *, intervals: bool = True) -> dict:
    """N_opt, D_opt, loss and D/N at compute `c` (scalar or array), with bootstrap intervals.

    Default C = 6ND (closed form). `flops_per_token(N)` instead (called with an array where it can be)
    minimises L(N, C / flops_per_token(N)) numerically, for exact FLOP accounting.
    """
    cs = np.atleast_1d(np.asarray(c, float))

    def solve(p):
      n, d = np.array([self._optimum(p, ci, flops_per_token) for ci in cs]).T
      return np.stack([n, d, self._law(p, n, d), d / n])

    if not self.has_optimum:
      raise ValueError(f"no compute-optimal allocation: it needs alpha, beta > 0 (loss falling with both N "
                       f"and D), the fit has alpha={self.alpha:.3g}, beta={self.beta:.3g}")
    keys = ("N", "D", "loss", "tokens_per_param")
    best = solve(self.params)
    out = {"C": cs, **dict(zip(keys, best))}
    if intervals and len(self.boot):
      boot = np.stack([solve(p) for p in self.boot])
      boot = boot[np.all(np.isfinite(boot), axis=(1, 2))]  # refits with alpha or beta ≤ 0 have no optimum.
      if len(boot):
        lo, hi = _interval(boot, self.ci)
        out["intervals"] = {k: (lo[j], hi[j]) for j, k in enumerate(keys)}
    if np.ndim(c) == 0:  # scalars in, scalars out.
      out = {k: (float(v[0]) if not isinstance(v, dict) else {q: (float(a[0]), float(b[0]))
                                                               for q, (a, b) in v.items()})
             for k, v in out.items()}
    return out

  def to_dict(self) -> dict:
    a, b = self.exponents
    return dict(E=self.E, A=self.A, B=self.B, alpha=self.alpha, beta=self.beta, a=a, b=b,
                intervals=self.intervals, objective=self.objective, n_points=self.n_points,
                delta=self.delta, ci=self.ci, bootstrap_fits=int(len(self.boot)), starts=self.n_starts)


def fit_parametric(n, d, loss, *, delta: float = 1e-3, n_boot: int = 200, ci: float = 0.95, seed: int = 0,
                   grid: Mapping | None = None, boot_starts: int = 4) -> ParametricFit:
  # L-BFGS-B calls BLAS on 5-vectors: OpenBLAS's thread pool made each iteration ~25× slower
  # (0.24 vs 0.01 ms on 2 cores), and the paper's grid runs 4,500 fits plus the bootstrap.
  with threadpool_limits(limits=1, user_api="blas"):
    return _fit_parametric(n, d, loss, delta=delta, n_boot=n_boot, ci=ci, seed=seed, grid=grid,
                           boot_starts=boot_starts)


def _fit_parametric(n, d, loss, *, delta, n_boot, ci, seed, grid, boot_starts) -> ParametricFit:
  """Approach 3 as in the paper (§3.3, App. D.2): L-BFGS from every start of `init_grid(grid)`, best kept.

  `grid` overrides some of the paper's per-parameter start values (tests use a coarser one). Bootstrap:
  points resampled with replacement and refitted `n_boot` times; to keep that ~1000× cheaper than the
  full fit, each refit starts only from the full fit's optimum and the `boot_starts` − 1 grid starts that
  ended lowest in the full fit. Intervals are percentile intervals of E, A, B, alpha, beta, and of
  a = β/(α+β), b = α/(α+β). ValueError when the best fit diverged (A or B overflows: the data cannot
  separate the terms); diverged bootstrap refits are dropped.
  """
  n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
  if len(n) < 5:
    raise ValueError(f"the parametric fit has 5 parameters and needs at least 5 points, got {len(n)}")
  if not (np.all(np.isfinite(loss)) and np.all(loss > 0) and np.all(n > 0) and np.all(d > 0)):
    raise ValueError("the parametric fit needs positive, finite N, D and loss")
  args = (np.log(n), np.log(d), np.log(loss), delta)
  starts = init_grid(grid)
  results = [_minimize(t, args) for t in starts]
  finals = np.array([r.fun if np.isfinite(r.fun) else np.inf for r in results])
  best = min((_minimize(results[i].x, args, polish=True) for i in np.argsort(finals)[:5]), key=lambda r: r.fun)
  seeds = [best.x] + [starts[i] for i in np.argsort(finals)[:max(boot_starts - 1, 0)]]
  params = _theta_to_params(best.x)
  if not np.all(np.isfinite(params)):
    raise ValueError(f"the parametric fit diverged (a, b, e, α, β = {np.round(best.x, 3).tolist()}): "
                     "the data do not pin down L(N, D); more or better-spread points are needed")
  rng, boot = np.random.default_rng(seed), []
  for _ in range(n_boot):
    i = rng.integers(0, len(n), len(n))
    sub = tuple(v[i] for v in args[:3]) + (delta,)
    fit = min((_minimize(t, sub, polish=True) for t in seeds), key=lambda r: r.fun)
    boot.append(_theta_to_params(fit.x))
  boot = np.array(boot).reshape(-1, 5)
  boot = boot[np.all(np.isfinite(boot), axis=1)]  # diverged refits say nothing about the interval.
  intervals = {}
  if len(boot):
    ab = np.stack([boot[:, 4] / (boot[:, 3] + boot[:, 4]), boot[:, 3] / (boot[:, 3] + boot[:, 4])], 1)
    lo, hi = _interval(np.concatenate([boot, ab], 1), ci)
    intervals = {k: (float(lo[j]), float(hi[j])) for j, k in enumerate(PARAM_NAMES + ("a", "b"))}
  e_, a_, b_, alpha, beta = map(float, params)
  return ParametricFit(E=e_, A=a_, B=b_, alpha=alpha, beta=beta, objective=float(best.fun),
                       n_points=len(n), delta=delta, ci=ci, intervals=intervals, boot=boot,
                       n_starts=len(starts))


# ------------------------------------------------------------------ CLI

def _read_csv(path: pathlib.Path, required: Sequence[str], what: str) -> list[dict]:
  if not path.is_file():
    raise ConfigError(f"{what} not found: {path}")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
      raise ConfigError(f"{path}: missing column(s) {', '.join(missing)} "
                        f"(has: {', '.join(reader.fieldnames or [])})")
    return list(reader)


def _float(row: dict, key: str, path, where: str) -> float:
  try:
    return float(row[key])
  except (TypeError, ValueError):
    raise ConfigError(f"{path}: {where}: {key} is {row[key]!r}, not a number") from None


def load_results(path, loss: str = "val_loss", n_column: str = "N") -> dict[str, np.ndarray]:
  """Finished rows (status "done", or every row without a status column) of a sweep's results.csv.

  `n_column` is the parameter count fitted as N (returned under "N"): "N" (every param but position
  tables, the tied vocabulary once: Chinchilla's count) or e.g. "N_kaplan" (no vocabulary or position
  tables: Kaplan et al. 2020's non-embedding N, which gives cleaner laws for models whose embedding is a
  large share of their params; Pearce & Song 2024 trace much of the Kaplan–Chinchilla gap to this choice).
  """
  path = pathlib.Path(path)
  rows = _read_csv(path, (n_column, "D", "C", loss), "results file")
  rows = [r for r in rows if r.get("status", "done") == "done"]
  out = {k: [] for k in ("name", "N", "D", "C", "loss", "flops_per_token")}
  for i, r in enumerate(rows):
    where = f"run {r.get('name') or f'row {i + 1}'}"
    vals = {k: _float(r, c, path, where) for k, c in (("N", n_column), ("D", "D"), ("C", "C"))}
    if not all(math.isfinite(v) and v > 0 for v in vals.values()):
      raise ConfigError(f"{path}: {where}: {n_column}, D and C must be positive and finite, got {vals}")
    value = _float(r, loss, path, where) if r[loss] not in ("", None) else math.nan
    if not math.isfinite(value):
      raise ConfigError(f"{path}: {where} is done but its {loss} is {r[loss]!r} (NaN or empty); "
                        f"rerun it or fit --loss final_train_loss")
    out["name"].append(r.get("name") or f"row{i + 1}")
    out["loss"].append(value)
    for k, v in vals.items():
      out[k].append(v)
    fpt = r.get("flops_per_token")
    out["flops_per_token"].append(float(fpt) if fpt not in (None, "") else vals["C"] / vals["D"])
  return {k: np.array(v) for k, v in out.items()}


def load_curves(path, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """curves.csv columns as arrays (only the runs in `names`, when given)."""
  path = pathlib.Path(path)
  rows = _read_csv(path, ("name", "N", "tokens", "C", "loss"), "curves file")
  if names is not None:
    keep = set(names)
    rows = [r for r in rows if r["name"] in keep]
  out = {"name": np.array([r["name"] for r in rows], str)}
  for k in ("N", "tokens", "C", "loss"):
    out[k] = np.array([_float(r, k, path, f"run {r['name']}") for r in rows])
  bad = sorted(set(out["name"][~np.isfinite(out["loss"])]))
  if bad:
    raise ConfigError(f"{path}: NaN loss in the training curve of {', '.join(bad)}")
  return out


def fpt_law(n, fpt) -> Callable | None:
  """FLOPs per token as a power law of N fitted on the sweep's runs: a smooth interpolant for the exact-
  FLOP optimum (extrapolating it far beyond the sampled sizes is an approximation)."""
  try:
    return fit_power_law(n, fpt)
  except ValueError:  # one size only.
    return None


def _parse_predict(spec: str) -> tuple[float, float]:
  try:
    n, d = spec.split(":")
    return float(n), float(d)
  except ValueError:
    raise ConfigError(f"--predict {spec!r}: expected N:D, e.g. 1e6:2e7") from None


def _ci(iv, fmt: str = ".3f") -> str:
  return f"[{iv[0]:{fmt}}, {iv[1]:{fmt}}]" if iv else ""


def _print_fits(fits: dict) -> None:
  if (e1 := fits.get("approach1")):
    print(f"Approach 1 (envelope of {e1.source}, {int(e1.used.sum())}/{len(e1.c)} points fitted):")
    print(f"  N_opt = {e1.n_law.k:.3g}·C^{e1.n_law.exponent:.3f}   "
          f"D_opt = {e1.d_law.k:.3g}·C^{e1.d_law.exponent:.3f}")
    for note in e1.notes:
      print(f"  note: {note}")
  if (f2 := fits.get("approach2")):
    print(f"Approach 2 (IsoFLOP parabolas, {len(f2.budgets)} budgets, {f2.n_boot} bootstrap fits):")
    for b in f2.budgets:
      side = "below" if b.n_opt < b.n.min() else "above"
      flag = "" if b.inside else f"   [vertex {side} the sampled N range: extrapolated]"
      print(f"  C={b.c:.3g}: N_opt={b.n_opt:.3g}  D_opt={b.d_opt:.3g}  loss={b.loss_opt:.4f}{flag}")
    for cb, why in f2.skipped:
      print(f"  C={cb:.3g}: skipped ({why})")
    print(f"  a = {f2.n_law.exponent:.3f} {_ci(f2.n_law.interval)}   "
          f"b = {f2.d_law.exponent:.3f} {_ci(f2.d_law.interval)}")
  if (f3 := fits.get("approach3")):
    iv = f3.intervals
    print(f"Approach 3 (L = E + A/N^α + B/D^β, Huber δ={f3.delta:g}, {f3.n_points} points, "
          f"{len(f3.boot)} bootstrap fits, {100 * f3.ci:g}% intervals):")
    for k in PARAM_NAMES:
      print(f"  {k:5s} = {getattr(f3, k):.4g} {_ci(iv.get(k), '.4g')}")
    a3, b3 = f3.exponents
    print(f"  a = β/(α+β) = {a3:.3f} {_ci(iv.get('a'))}   b = α/(α+β) = {b3:.3f} {_ci(iv.get('b'))}")


def _optimal_at(ct: float, fits: dict, fpt) -> dict:
  """Every approach's compute-optimal N, D at `ct` (printed, and returned for fits.json)."""
  entry, pad = dict(C=ct), " " * len(f"C={ct:.3g}:")
  lines = []
  if (f3 := fits.get("approach3")):
    for key, f, label in (("approach3_6ND", None, "C = 6ND"), ("approach3_exact_flops", fpt, "exact FLOPs")):
      if key == "approach3_exact_flops" and fpt is None:
        continue
      try:
        entry[key] = o = _jsonable(f3.compute_optimal(ct, f))
      except ValueError as e:
        lines.append(f"A3: {e}")
        break
      lines.append(f"A3 ({label}): N={o['N']:.3g} D={o['D']:.3g} D/N={o['tokens_per_param']:.3g} "
                   f"loss={o['loss']:.4f}")
  for key, label in (("approach1", "A1"), ("approach2", "A2")):
    if key in fits:
      entry[key] = o = dict(N=float(fits[key].n_law(ct)), D=float(fits[key].d_law(ct)))
      lines.append(f"{label}: N={o['N']:.3g} D={o['D']:.3g} D/N={o['D'] / o['N']:.3g}")
  for i, line in enumerate(lines):
    print(f"  {pad if i else f'C={ct:.3g}:'} {line}")
  return entry


def run(args) -> dict:
  results = pathlib.Path(args.results)
  out = pathlib.Path(args.out) if args.out else results.parent
  predict = [_parse_predict(s) for s in args.predict]
  data = load_results(results, args.loss, args.n_column)
  if len(data["N"]) < 5:
    raise ConfigError(f"{results}: {len(data['N'])} usable rows (status done, finite {args.loss}); "
                      "the fits need at least 5 (Approach 3 has 5 parameters)")
  n, d, c, loss = data["N"], data["D"], data["C"], data["loss"]
  report = dict(inputs=dict(results=str(results), loss=args.loss, n_column=args.n_column, rows=int(len(n)),
                            n_boot=args.n_boot, seed=args.seed), warnings=[])

  def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)
    report["warnings"].append(msg)

  curves_path = pathlib.Path(args.curves) if args.curves else results.parent / "curves.csv"
  curves = None
  if curves_path.is_file() or args.curves:
    curves = load_curves(curves_path, list(data["name"]))
    if args.n_column != "N":  # curves.csv carries the total N: each run's N from results.csv instead.
      n_of = dict(zip(data["name"], n))
      curves["N"] = np.array([n_of[name] for name in curves["name"]], float)
    report["inputs"]["curves"] = str(curves_path)
    if not len(curves["name"]):
      warn(f"{curves_path} has no curve of a finished run: Approach 1 uses the envelope of final points")
  else:
    warn(f"no curves file at {curves_path}: Approach 1 uses the envelope of final points")
  fits = {}
  print(f"{results}: {len(n)} finished runs, loss = {args.loss}, N = {args.n_column}", flush=True)
  try:
    fits["approach1"] = (fit_envelope(curves) if curves is not None and len(curves["name"])
                         else fit_envelope_final(n, d, c, loss))
  except ValueError as e:
    warn(f"Approach 1 skipped: {e}")
  try:
    fits["approach2"] = fit_isoflop(n, d, c, loss, n_boot=args.n_boot, seed=args.seed)
  except ValueError as e:
    warn(f"Approach 2 skipped: {e}")
  print(f"fitting Approach 3 from {len(init_grid())} starts ...", file=sys.stderr)
  try:
    fits["approach3"] = fit_parametric(n, d, loss, n_boot=args.n_boot, seed=args.seed)
  except ValueError as e:
    warn(f"Approach 3 skipped: {e}")
  if not fits:
    raise ConfigError(f"{results}: no approach could be fitted (see the warnings above)")
  for key in ("approach1", "approach2", "approach3"):
    report[key] = fits[key].to_dict() if key in fits else None
  _print_fits(fits)

  fpt = fpt_law(n, data["flops_per_token"])
  print("compute-optimal allocation:")
  report["compute_optimal"] = [_optimal_at(ct, fits, fpt) for ct in
                               (args.target_flops or [float(c.max()) * k for k in (1, 10, 100)])]
  report["predictions"] = []
  f3 = fits.get("approach3")
  for pn, pd in predict:
    if f3 is None:
      warn(f"--predict {pn:g}:{pd:g} needs Approach 3, which was skipped")
      continue
    value, (lo, hi) = _prediction(f3, pn, pd)
    report["predictions"].append(dict(N=pn, D=pd, loss=value, interval=(lo, hi)))
    print(f"predicted loss at N={pn:.3g}, D={pd:.3g}: {value:.4f} {_ci((lo, hi), '.4f') if len(f3.boot) else ''}")
  heldout = None
  if args.heldout and f3 is None:
    warn(f"--heldout {args.heldout} needs Approach 3, which was skipped")
  elif args.heldout:
    heldout = load_results(args.heldout, args.loss, args.n_column)
    report["heldout"] = heldout_report(f3, heldout)
    _print_heldout(args.heldout, report["heldout"])

  from train import scaling_plots  # matplotlib only when plotting.
  out.mkdir(parents=True, exist_ok=True)
  report["figures"] = [str(p) for p in scaling_plots.plot_all(
      out, n=n, d=d, c=c, loss=loss, curves=curves, fits=fits, flops_per_token=fpt, heldout=heldout)]
  (out / "fits.json").write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False))
  print(f"wrote {out / 'fits.json'} and {len(report['figures'])} figures")
  return report


def _prediction(fit: ParametricFit, n_, d_) -> tuple[float, tuple[float, float]]:
  """Approach 3's loss at (N, D) and its bootstrap interval ((nan, nan) without bootstrap fits)."""
  lo, hi = fit.predict_interval(n_, d_) if len(fit.boot) else (math.nan, math.nan)
  return float(fit.predict(n_, d_)), (float(lo), float(hi))


def heldout_report(fit: ParametricFit, runs: Mapping) -> dict:
  """Approach 3's prediction for held-out runs (`load_results` rows) against their measured loss.

  Runs with the same N and D (seed replicates) are one point: the law predicts the expected loss, so it
  is compared with their mean; each run is listed too. error = (predicted − measured) / measured.
  """
  def entry(n_, d_, measured):
    value, (lo, hi) = _prediction(fit, n_, d_)
    return dict(N=float(n_), D=float(d_), measured=float(measured), predicted=value, interval=(lo, hi),
                error=value / float(measured) - 1, inside_interval=bool(lo <= measured <= hi))
  rows = [dict(name=str(name), C=float(c_), **entry(n_, d_, l_))
          for name, n_, d_, c_, l_ in zip(runs["name"], runs["N"], runs["D"], runs["C"], runs["loss"])]
  points = []
  for key in dict.fromkeys(zip(runs["N"], runs["D"])):
    same = [r for r in rows if (r["N"], r["D"]) == key]
    points.append(dict(runs=[r["name"] for r in same], C=same[0]["C"],
                       **entry(*key, np.mean([r["measured"] for r in same]))))
  return dict(runs=rows, points=points)


def _print_heldout(path, held: dict) -> None:
  print(f"held-out runs ({path}), Approach 3:")
  for r in held["runs"]:
    print(f"  {r['name']}: measured {r['measured']:.4f}, predicted {r['predicted']:.4f} "
          f"{_ci(r['interval'], '.4f')}, error {100 * r['error']:+.2f}%")
  for p in held["points"]:
    if len(p["runs"]) > 1:
      print(f"  mean of {len(p['runs'])} runs at N={p['N']:.3g}, D={p['D']:.3g}: measured {p['measured']:.4f}, "
            f"predicted {p['predicted']:.4f}, error {100 * p['error']:+.2f}%")


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (tuple, list)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None  # strict JSON has no NaN/Infinity: null (an interval no bootstrap fit could give).
  return x


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.scaling", description=__doc__.split("\n")[0])
  parser.add_argument("--results", required=True, help="results.csv of `python -m train.sweep`")
  parser.add_argument("--curves", default="", help="curves.csv (default: beside --results)")
  parser.add_argument("--out", default="", help="where fits.json and the figures go (default: beside --results)")
  parser.add_argument("--loss", default="val_loss", choices=("val_loss", "final_train_loss"))
  parser.add_argument("--n-column", default="N",
                      help="results.csv column fitted as N: N (default, Chinchilla) or N_kaplan (no vocabulary)")
  parser.add_argument("--target-flops", type=float, nargs="*", default=[],
                      help="compute budgets for the compute-optimal N, D (default: max C ×1, ×10, ×100)")
  parser.add_argument("--predict", nargs="*", default=[], help="N:D pairs to predict the loss of (Approach 3)")
  parser.add_argument("--heldout", default="",
                      help="results.csv of held-out runs (not fitted): Approach 3's prediction vs their "
                           "loss, in fits.json and on parametric_fit.png")
  parser.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples (Approaches 2 and 3)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  def go():
    if args.n_boot < 0:
      raise ConfigError(f"--n-boot must be >= 0, got {args.n_boot}")
    run(args)
    return 0

  return main_guard(go)


if __name__ == "__main__":
  sys.exit(main())
