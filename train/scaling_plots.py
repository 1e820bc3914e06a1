"""Figures of the scaling-law fits of `train.scaling` (matplotlib, Agg backend, PNG).

Written by `python -m train.scaling` beside fits.json; each function also works alone in a notebook:

    from train import scaling, scaling_plots
    fit = scaling.fit_isoflop(n, d, c, loss)
    scaling_plots.plot_isoflop(fit, "isoflop.png")
"""
from __future__ import annotations

import pathlib
from typing import Callable, Mapping

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or pods.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from train import scaling  # noqa: E402

COLORS = {"approach1": "tab:blue", "approach2": "tab:orange", "approach3": "tab:green"}
LABELS = {"approach1": "Approach 1 (envelope)", "approach2": "Approach 2 (IsoFLOP)",
          "approach3": "Approach 3 (parametric)"}


def _save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def _size_colors(n, ref) -> np.ndarray:
  """Viridis colour of each N on a log scale spanning `ref`."""
  lo, hi = np.log(np.min(ref)), np.log(np.max(ref))
  return plt.cm.viridis((np.log(n) - lo) / max(hi - lo, 1e-12))


def plot_isoflop(fit: scaling.IsoFlopFit, path) -> pathlib.Path:
  """Loss against N per budget: the runs, each fitted parabola (in ln N) and its vertex (hollow: outside)."""
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
  cs = [b.c for b in fit.budgets]
  colors = _size_colors(cs, cs)
  for b, color in zip(fit.budgets, colors):
    lo = min(b.n.min(), b.n_opt) / 1.3
    hi = max(b.n.max(), b.n_opt) * 1.3
    x = np.geomspace(lo, hi, 200)
    ax.plot(b.n, b.loss, "o", color=color, label=f"C = {b.c:.2g}")
    ax.plot(x, np.polyval(b.coeffs, np.log(x)), "-", color=color, lw=1.2)
    ax.plot(b.n_opt, b.loss_opt, "*", ms=13, color=color if b.inside else "none", mec=color)
  ax.set_xscale("log")
  ax.set_xlabel("parameters N")
  ax.set_ylabel("loss")
  ax.set_title("IsoFLOP profiles (★ vertex = N_opt; hollow: outside sampled N)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_loss_vs_compute(path, *, n, c, loss, curves: Mapping | None = None,
                         envelope: scaling.Envelope | None = None, parametric: scaling.ParametricFit | None = None,
                         flops_per_token: Callable | None = None) -> pathlib.Path:
  """Every run's training curve, the minimum-loss envelope, final points, and Approach 3's frontier."""
  fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
  ref = np.concatenate([n, curves["N"]]) if curves is not None and len(curves["N"]) else n
  if curves is not None:
    names = np.asarray(curves["name"])
    for name in dict.fromkeys(names):
      m = names == name
      order = np.argsort(curves["C"][m])
      ax.plot(curves["C"][m][order], curves["loss"][m][order], "-", lw=0.8, alpha=0.6,
              color=_size_colors(curves["N"][m][:1], ref)[0])
  ax.scatter(c, loss, c=_size_colors(n, ref), edgecolors="k", s=36, zorder=3, label="final points")
  if envelope is not None:
    ax.plot(envelope.c, envelope.loss, ".", color="k", ms=3, label=f"envelope ({envelope.source})")
  if parametric is not None and parametric.has_optimum:
    grid = np.geomspace(np.min(c) / 3, np.max(c) * 10, 40)
    opt = parametric.compute_optimal(grid, flops_per_token, intervals=False)
    how = "exact FLOPs" if flops_per_token else "C = 6ND"
    ax.plot(grid, opt["loss"], "--", color=COLORS["approach3"], lw=1.5, label=f"Approach 3 frontier ({how})")
  sm = plt.cm.ScalarMappable(cmap="viridis", norm=matplotlib.colors.LogNorm(np.min(ref), np.max(ref)))
  fig.colorbar(sm, ax=ax, label="parameters N")
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs C")
  ax.set_ylabel("loss")
  lo, hi = np.min(loss), np.max(loss)
  ax.set_ylim(lo - 0.1 * (hi - lo + 0.1), hi + 0.6 * (hi - lo + 0.1))  # curves start far higher.
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_optimal(path, fits: Mapping, *, c_range: tuple[float, float],
                 flops_per_token: Callable | None = None) -> pathlib.Path:
  """N_opt and D_opt against C: each approach's optima and its power law (Approach 3: its frontier)."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), dpi=110)
  grid = np.geomspace(*c_range, 60)
  for key, fit in fits.items():
    color, label = COLORS[key], LABELS[key]
    if key == "approach3":
      if not fit.has_optimum:
        continue
      opt = fit.compute_optimal(grid, flops_per_token, intervals=False)
      a, b = fit.exponents
      axes[0].plot(grid, opt["N"], "--", color=color, label=f"{label}: a = {a:.3f}")
      axes[1].plot(grid, opt["D"], "--", color=color, label=f"{label}: b = {b:.3f}")
      continue
    if key == "approach1":
      pts = (fit.c, fit.n_opt, fit.d_opt, fit.used)
    else:
      pts = (np.array([x.c for x in fit.budgets]), np.array([x.n_opt for x in fit.budgets]),
             np.array([x.d_opt for x in fit.budgets]), np.ones(len(fit.budgets), bool))
    for ax, y, law, sym in ((axes[0], pts[1], fit.n_law, "a"), (axes[1], pts[2], fit.d_law, "b")):
      ax.plot(pts[0][pts[3]], y[pts[3]], "o", color=color, ms=4 if key == "approach1" else 7)
      ax.plot(pts[0][~pts[3]], y[~pts[3]], "o", color=color, mfc="none", ms=4)
      ax.plot(grid, law(grid), "-", color=color, label=f"{label}: {sym} = {law.exponent:.3f}")
  for ax, what in zip(axes, ("N_opt (parameters)", "D_opt (tokens)")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel(what)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  return _save(fig, path)


def plot_parametric(fit: scaling.ParametricFit, path, *, n, d, c, loss, heldout: Mapping | None = None) -> pathlib.Path:
  """Approach 3: measured against predicted loss (y = x line), and the relative error against C; held-out
  runs (not fitted; `load_results` rows) as red stars."""
  pred = fit.predict(n, d)
  colors = _size_colors(n, n)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), dpi=110)
  if len(fit.boot):
    lo, hi = fit.predict_interval(n, d)
    # Clipped at 0: on near-noiseless points the percentile interval can miss the point by ~1e-8.
    axes[0].errorbar(loss, pred, yerr=np.maximum([pred - lo, hi - pred], 0), fmt="none", ecolor="gray", lw=0.8)
  axes[0].scatter(loss, pred, c=colors, edgecolors="k", s=30, zorder=3)
  span = [min(loss.min(), pred.min()), max(loss.max(), pred.max())]
  if heldout is not None and len(heldout["loss"]):
    h_pred = fit.predict(heldout["N"], heldout["D"])
    h_rel = 100 * (h_pred - heldout["loss"]) / heldout["loss"]
    label = f"held out (error {', '.join(f'{e:+.1f}%' for e in h_rel)})"
    axes[0].scatter(heldout["loss"], h_pred, marker="*", c="red", edgecolors="k", s=140, zorder=4, label=label)
    axes[1].scatter(heldout["C"], h_rel, marker="*", c="red", edgecolors="k", s=140, zorder=4, label="held out")
    axes[1].legend(fontsize=8)
    span = [min(span[0], heldout["loss"].min(), h_pred.min()), max(span[1], heldout["loss"].max(), h_pred.max())]
  axes[0].plot(span, span, "k--", lw=1, label="y = x")
  axes[0].set_xlabel("measured loss")
  axes[0].set_ylabel("predicted loss")
  axes[0].set_title(f"L = {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.3f} + {fit.B:.3g}/D^{fit.beta:.3f}", fontsize=9)
  axes[0].legend(fontsize=8)
  rel = 100 * (pred - loss) / loss
  axes[1].scatter(c, rel, c=colors, edgecolors="k", s=30)
  sm = plt.cm.ScalarMappable(cmap="viridis", norm=matplotlib.colors.LogNorm(np.min(n), np.max(n)))
  fig.colorbar(sm, ax=axes[1], label="parameters N")
  axes[1].axhline(0, color="k", lw=1)
  axes[1].set_xscale("log")
  axes[1].set_xlabel("training FLOPs C")
  axes[1].set_ylabel("(predicted − measured) / measured  [%]")
  axes[1].set_title(f"relative error: mean |·| {np.mean(np.abs(rel)):.2f}%, max {np.max(np.abs(rel)):.2f}%",
                    fontsize=9)
  for ax in axes:
    ax.grid(alpha=0.3, which="both")
  return _save(fig, path)


def plot_all(out, *, n, d, c, loss, curves=None, fits: Mapping, flops_per_token=None,
             heldout: Mapping | None = None) -> list[pathlib.Path]:
  """Every figure the fits in `fits` (keys approach1..3) support, into directory `out`."""
  out = pathlib.Path(out)
  paths = []
  if "approach2" in fits:
    paths.append(plot_isoflop(fits["approach2"], out / "isoflop.png"))
  paths.append(plot_loss_vs_compute(out / "loss_vs_compute.png", n=n, c=c, loss=loss, curves=curves,
                                    envelope=fits.get("approach1"), parametric=fits.get("approach3"),
                                    flops_per_token=flops_per_token))
  if fits:
    lo = min([np.min(c)] + ([np.min(fits["approach1"].c)] if "approach1" in fits else []))
    paths.append(plot_optimal(out / "optimal_n_d.png", fits, c_range=(lo / 3, np.max(c) * 10),
                              flops_per_token=flops_per_token))
  if "approach3" in fits:
    paths.append(plot_parametric(fits["approach3"], out / "parametric_fit.png", n=n, d=d, c=c, loss=loss,
                                 heldout=heldout))
  return paths
