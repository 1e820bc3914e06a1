"""IsoFLOP sweep on 2 CPU cores, second design: 4 budgets × ladder sizes, 1k-token batches, piloted LRs.

Launch in this order (all points land in runs/sweeps/isoflop_cpu_v2; the pilot's best-LR runs *are* the
sweep's smallest-budget points, same names and overrides, so the sweep skips them), then fit:
    python -m train.sweep --sweep=configs/sweeps/isoflop_cpu_v2.py:pilot --out=runs/sweeps/isoflop_cpu_v2
    python -m train.sweep --sweep=configs/sweeps/isoflop_cpu_v2.py
    python -m train.scaling --results runs/sweeps/isoflop_cpu_v2/results.csv --predict N:D
Held-out point at 4× the largest budget (one run, the size Approach 3 calls compute-optimal there; its own
--out, so the sweep's results.csv keeps only the fitted points):
    python -m train.sweep --sweep=configs/sweeps/isoflop_cpu_v2.py:heldout --out=runs/sweeps/isoflop_cpu_v2_heldout

What changed from `isoflop_cpu.py` (whose smallest model won at every budget, LOG.md 2026-11-23):
- batch fixed at 8 × 128 = 1,024 tokens (was 1.8–3.3k from DeepSeek's rule): every point takes ≥ 234
  optimizer steps, the largest model at the smallest budget included (was 25);
- the learning rate of each size comes from a pilot (`:pilot`, three LRs per size at the smallest
  budget), not the 1/√width rule that lowered the larger models' LR;
- vocabulary 512 (was 1,024; 266 ids are reserved, so it cannot go much lower) and seq 128 (was 256):
  the tied embedding and the attention square cost less of each small model's FLOPs;
- ladder aspect 16 / head_dim 16 as before (d_model 16·dial, dial layers), dials 1–4 (12k, 49k, 108k,
  246k params incl. the 512-piece embedding); the pilot's dials 5–6 (477k, 714k) were dropped.
Budgets 5e11–4e12 FLOPs (×2 apart, Chinchilla Appendix F count): 16 points, 3.0e13 FLOPs, ~25 min on
2 shared cores (~1.5–2.5e10 FLOP/s plus ~9 s of start-up per point) after the 11-min pilot; the held-out
run (1.6e13) ~20 min. Result: an interior IsoFLOP minimum at every budget (README, LOG.md 2026-11-24).
"""
from train import design

BASE = "configs/lm.py:tiny"
BUDGETS = (5e11, 1e12, 2e12, 4e12)
HELDOUT_BUDGET = 4 * BUDGETS[-1]
DIALS = (1, 2, 3, 4)
PILOT_DIALS = (1, 2, 3, 4, 5, 6)  # the pilot was stopped after dial 4: see LR below.
LADDER = dict(aspect=16, head_dim=16)
BATCH_TOKENS = 1024
EXTRA = {"model.vocab_size": 512, "data.vocab_size": 512, "data.seq_len": 128, "model.compute_dtype": "float32",
         "checkpoint.every": 0, "sample.max_new_tokens": 0}
PILOT_LRS = (3e-3, 6e-3, 1.2e-2)
# Per-size peak LR: the best of PILOT_LRS at BUDGETS[0] (val loss, LOG.md 2026-11-24):
#   dial 1: 3.618 / 3.564 / 3.619   dial 2: 3.741 / 3.599 / 3.569   dial 3: 3.999 / 3.784 / 4.037
#   dial 4: 4.1140 / 4.1141 / 4.547  (for 3e-3 / 6e-3 / 1.2e-2).
# Dial 3 already lost to dials 1–2 by 0.2 nats and dial 4 by 0.55, so the pilot was stopped before dials
# 5–6 (they would sit far on the right arm of every parabola) and the sweep keeps dials 1–4. Dial 2's best
# is the grid's top value; the differences (≤ 0.03 nats between the two best LRs) are near seed noise.
LR = {1: 6e-3, 2: 1.2e-2, 3: 6e-3, 4: 3e-3}
HELDOUT_DIAL = 3  # Approach 3 on the first 12 points: N_opt(1.6e13) = 94k; dial 3 has 108k (LOG.md).


def _point(c: float, dial: int, lr: float) -> dict:
  model = design.ladder(dial, **LADDER)
  fpt = design.flops_per_token(BASE, {**model, **EXTRA})
  return design.point(BASE, model, c / fpt, name=f"C{c:.1e}-L{dial}-lr{lr:.1e}".replace("+", ""), lr=lr,
                      batch_tokens=BATCH_TOKENS, extra=EXTRA)


def get_sweep(arg=None):
  if arg == "pilot":
    return [_point(BUDGETS[0], dial, lr) for dial in PILOT_DIALS for lr in PILOT_LRS]
  if arg == "heldout":
    if HELDOUT_DIAL is None:
      raise ValueError("isoflop_cpu_v2: fit the sweep first and set HELDOUT_DIAL")
    return [_point(HELDOUT_BUDGET, HELDOUT_DIAL, LR[HELDOUT_DIAL])]
  if arg:
    raise ValueError(f"isoflop_cpu_v2: unknown arg {arg!r} (use nothing, 'pilot' or 'heldout')")
  return [_point(c, dial, LR[dial]) for c in BUDGETS for dial in DIALS]
