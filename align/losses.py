"""Every alignment loss as a pure JAX function on arrays (no model code, no config objects).

They are called inside jitted train steps (`align.sft`, `align.dpo`, `align.ppo`, `align.grpo`, ...):

    tl = token_logps(logits, targets)                        # [B, T] fp32 log p(target)
    logp, n = sequence_logps(tl, response_mask)              # [B] summed log-probs, [B] token counts
    loss, metrics = preference_loss("dpo", dict(policy_chosen=..., policy_rejected=...,
                                                ref_chosen=..., ref_rejected=...), beta=0.1)
    adv = grpo_advantages(rewards, group_size=8)             # [B*G]
    loss, metrics = grpo_loss(logp_tok, old_tok, ref_tok, adv, mask, beta_kl=0.04)

Conventions:
  * math in fp32 whatever the input dtype (bf16 log-probs lose ~3 significant digits, and DPO's
    log-ratio is a difference of two ~-100 numbers);
  * every loss returns `(scalar loss, metrics)`; metrics are scalars (means over the batch, or over
    valid tokens) for logging;
  * things that must not carry gradient (reference and old log-probs, advantages, returns, the KTO
    reference point) are wrapped in `stop_gradient` here, so a caller cannot forget it;
  * hyper-parameters are Python numbers, validated at trace time with one clear `ValueError`.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

_F32 = jnp.float32
# exp() of a log-ratio above ~88 overflows fp32; 20 (ratio 4.9e8) is far outside any clip range and is
# the bound verl uses for PPO ratios and the k3 estimator.
_MAX_LOG_RATIO = 20.0


def _f32(x):
  return None if x is None else jnp.asarray(x, _F32)


def _const(x):
  return None if x is None else jax.lax.stop_gradient(_f32(x))


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _is_number(x) -> bool:
  return isinstance(x, (int, float))


def _masked_mean(x, mask):
  return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


# ----------------------------------------------------------------------------------------------------
# Sequence log-probs
# ----------------------------------------------------------------------------------------------------

def token_logps(logits, targets):
  """log p(targets) per token, [B, T, V] x [B, T] -> [B, T] fp32.

  log_softmax gathered at the target as `logit[target] - logsumexp(logits)` (as train/step.py's
  cross_entropy), so no [B, T, V] log-prob tensor is kept besides the fp32 logits.
  """
  logits = logits.astype(_F32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logit - log_z


def sequence_logps(token_logps, mask):
  """(sum of masked token log-probs [B], number of masked tokens [B]) over the last axis."""
  mask = _f32(mask)
  return (_f32(token_logps) * mask).sum(-1), mask.sum(-1)


# ----------------------------------------------------------------------------------------------------
# Preference optimization (paired)
# ----------------------------------------------------------------------------------------------------

# Per-pair inputs, each [B]: summed response log-probs under the policy and the frozen reference,
# response token counts, and (ORPO) the policy's chosen NLL per token.
PREFERENCE_KEYS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected",
                   "chosen_len", "rejected_len", "chosen_nll", "policy_kl", "ref_kl")


def _need(batch: Mapping, key: str, loss: str):
  value = batch.get(key)
  _check(value is not None, f"preference loss {loss!r} needs batch[{key!r}]")
  return _f32(value)


def _lengths(batch: Mapping, loss: str):
  # A zero-length response would divide by 0; it has no tokens to average, so count it as 1.
  return (jnp.maximum(_need(batch, "chosen_len", loss), 1.0),
          jnp.maximum(_need(batch, "rejected_len", loss), 1.0))


def _log_ratios(batch: Mapping, loss: str):
  """log pi(y)/pi_ref(y) for chosen and rejected; the reference is frozen."""
  chosen = _need(batch, "policy_chosen", loss) - jax.lax.stop_gradient(_need(batch, "ref_chosen", loss))
  rejected = (_need(batch, "policy_rejected", loss)
              - jax.lax.stop_gradient(_need(batch, "ref_rejected", loss)))
  return chosen, rejected


def _reward_metrics(chosen, rejected) -> dict:
  chosen, rejected = jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)
  return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
          "rewards/accuracy": (chosen > rejected).astype(_F32).mean(),
          "rewards/margin": (chosen - rejected).mean()}


def _check_smoothing(eps, loss: str) -> None:
  if _is_number(eps):
    _check(0.0 <= eps < 0.5, f"{loss}: label_smoothing (label-flip rate) must be in [0, 0.5), got {eps}")


def _smoothed_sigmoid_loss(z, eps):
  """(1-eps)·(-log σ(z)) + eps·(-log σ(-z)): the preferred label is wrong with probability eps."""
  return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def dpo_loss(batch: Mapping, *, beta: float = 0.1, label_smoothing: float = 0.0):
  """DPO, Rafailov et al. 2023 eq. 7: -log σ(β·h), h = log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l).

  With label_smoothing = ε > 0 it is conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy
  preferences", TRL's loss_type="sigmoid" with label_smoothing): (1−ε)·ℓ(h) + ε·ℓ(−h) with
  ℓ(h) = −log σ(βh). β=0.1 is the paper's and TRL's default.
  """
  _check_smoothing(label_smoothing, "dpo")
  chosen, rejected = _log_ratios(batch, "dpo")
  loss = _smoothed_sigmoid_loss(beta * (chosen - rejected), label_smoothing).mean()
  return loss, _reward_metrics(beta * chosen, beta * rejected)


def robust_dpo_loss(batch: Mapping, *, beta: float = 0.1, label_smoothing: float = 0.1):
  """Robust DPO (rDPO), Chowdhury et al. 2024: ((1−ε)·ℓ(h) − ε·ℓ(−h)) / (1−2ε).

  An unbiased estimate of the clean-label DPO loss when each preference is flipped with known
  probability ε = label_smoothing (default 0.1, i.e. a 10% flip rate); ε = 0 is plain DPO.
  """
  _check_smoothing(label_smoothing, "robust")
  eps = label_smoothing
  chosen, rejected = _log_ratios(batch, "robust")
  z = beta * (chosen - rejected)
  per_pair = (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)
  return per_pair.mean(), _reward_metrics(beta * chosen, beta * rejected)


def ipo_loss(batch: Mapping, *, tau: float = 0.1, ipo_average: bool = True):
  """IPO, Azar et al. 2023 eq. 17: (h − 1/(2τ))², h the difference of policy/reference log-ratios.

  ipo_average=True (default) divides each response's log-ratio by its token count before taking h,
  as TRL does for loss_type="ipo" (so 1/(2τ) = 5 at τ = 0.1 is a per-token margin, independent of
  response length); ipo_average=False uses summed log-probs as written in the paper. Reward metrics
  are τ·log-ratio (TRL passes IPO's τ as `beta`).
  """
  if _is_number(tau):
    _check(tau > 0, f"ipo: tau must be > 0, got {tau}")
  chosen, rejected = _log_ratios(batch, "ipo")
  if ipo_average:
    len_w, len_l = _lengths(batch, "ipo")
    chosen, rejected = chosen / len_w, rejected / len_l
  loss = jnp.square(chosen - rejected - 1.0 / (2.0 * tau)).mean()
  return loss, _reward_metrics(tau * chosen, tau * rejected)


def simpo_loss(batch: Mapping, *, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0):
  """SimPO, Meng et al. 2024: −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ); no reference.

  Defaults β=2.0, γ=1.0 are the SimPO repository's (γ/β = 0.5); label_smoothing as in cDPO (the
  repository supports it too). Rewards are the implicit β·(average log-prob).
  """
  _check_smoothing(label_smoothing, "simpo")
  len_w, len_l = _lengths(batch, "simpo")
  chosen = beta * _need(batch, "policy_chosen", "simpo") / len_w
  rejected = beta * _need(batch, "policy_rejected", "simpo") / len_l
  loss = _smoothed_sigmoid_loss(chosen - rejected - gamma, label_smoothing).mean()
  return loss, _reward_metrics(chosen, rejected)


_LN2 = math.log(2.0)


def log1mexp(x):
  """log(1 − exp(x)) for x < 0, accurate and finite from x = −1e-30 to −1e4 (Mächler 2012).

  log(−expm1(x)) near 0 (where 1 − exp(x) cancels), log1p(−exp(x)) below −log 2. Each branch only
  sees inputs where it is finite, so the branch `where` drops cannot put NaN into the gradient;
  x ≥ 0 is clamped just below 0 (a probability of 1 would have infinite odds).
  """
  x = jnp.minimum(_f32(x), -jnp.finfo(_F32).tiny)
  near = x > -_LN2
  a = jnp.log(-jnp.expm1(jnp.where(near, x, -1.0)))
  b = jnp.log1p(-jnp.exp(jnp.where(near, -1.0, x)))
  return jnp.where(near, a, b)


def orpo_loss(batch: Mapping, *, lam: float = 0.1):
  """ORPO, Hong et al. 2024 eq. 6-7: NLL_chosen + λ·(−log σ(log odds(y_w) − log odds(y_l))).

  odds(y) = p/(1−p) with log p the length-averaged log-prob, so log odds = log p − log(1 − p),
  computed stably with `log1mexp` (TRL's log1p(−exp(·)) is −inf once p rounds to 1). NLL_chosen is
  batch["chosen_nll"] (per-token NLL of the chosen response) when given, else −log p(y_w). λ=0.1 as
  in the paper's experiments (and TRL's `beta`); named `lam` because `lambda` is a Python keyword.
  Rewards are λ·(average log-prob), as TRL logs them.
  """
  len_w, len_l = _lengths(batch, "orpo")
  avg_w = _need(batch, "policy_chosen", "orpo") / len_w
  avg_l = _need(batch, "policy_rejected", "orpo") / len_l
  log_odds = (avg_w - log1mexp(avg_w)) - (avg_l - log1mexp(avg_l))
  ratio_loss = -jax.nn.log_sigmoid(log_odds)
  nll = _f32(batch.get("chosen_nll"))
  nll = -avg_w if nll is None else nll
  loss = (nll + lam * ratio_loss).mean()
  metrics = _reward_metrics(lam * avg_w, lam * avg_l)
  metrics.update({"orpo/nll": jax.lax.stop_gradient(nll).mean(),
                  "orpo/ratio_loss": jax.lax.stop_gradient(ratio_loss).mean(),
                  "orpo/log_odds": jax.lax.stop_gradient(log_odds).mean()})
  return loss, metrics


def kto_pair_loss(batch: Mapping, *, beta: float = 0.1, lambda_d: float = 1.0, lambda_u: float = 1.0):
  """KTO on paired data (`kto_loss` below): each chosen reply is a desirable example, each rejected one
  an undesirable example (Ethayarajh et al. 2024 §4.2 trains on paired data this way), and the reference
  point z0 comes from `policy_kl` / `ref_kl`, the summed log-probs of mismatched (prompt, reply) rows
  (`data.preference.mismatched_arrays`)."""
  policy = jnp.concatenate([_need(batch, "policy_chosen", "kto"), _need(batch, "policy_rejected", "kto")])
  ref = jnp.concatenate([_need(batch, "ref_chosen", "kto"), _need(batch, "ref_rejected", "kto")])
  n = batch["policy_chosen"].shape[0]
  desirable = jnp.arange(2 * n) < n
  z0 = kto_kl_estimate(_need(batch, "policy_kl", "kto"), _need(batch, "ref_kl", "kto"))
  loss, metrics = kto_loss(policy, ref, desirable, z0, beta=beta, lambda_d=lambda_d, lambda_u=lambda_u)
  margins = jax.lax.stop_gradient(beta * ((policy[:n] - ref[:n]) - (policy[n:] - ref[n:])))
  metrics["rewards/accuracy"] = (margins > 0).astype(_F32).mean()
  return loss, metrics


PREFERENCE_LOSSES: dict[str, Callable] = {
    "dpo": dpo_loss,
    "robust": robust_dpo_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "kto": kto_pair_loss,
}


def _lookup(name: str) -> Callable:
  fn = PREFERENCE_LOSSES.get(name)
  _check(fn is not None, f"unknown preference loss {name!r}; known: {', '.join(PREFERENCE_LOSSES)}")
  return fn


def preference_hparams(name: str) -> dict:
  """{hyper-parameter: paper default} of a registered preference loss, e.g. to pick config values."""
  params = inspect.signature(_lookup(name)).parameters.values()
  return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def preference_loss(name: str, batch: Mapping, **hp):
  """Dispatch to PREFERENCE_LOSSES[name](batch, **hp); unknown names, keys and hyper-parameters raise."""
  allowed = preference_hparams(name)
  unknown = sorted(set(hp) - set(allowed))
  _check(not unknown, f"preference loss {name!r} takes hyper-parameters {sorted(allowed)}; "
                      f"unknown: {unknown}")
  extra = sorted(set(batch) - set(PREFERENCE_KEYS))
  _check(not extra, f"unknown preference batch keys {extra}; known: {list(PREFERENCE_KEYS)}")
  return PREFERENCE_LOSSES[name](batch, **hp)


# ----------------------------------------------------------------------------------------------------
# KTO (unpaired)
# ----------------------------------------------------------------------------------------------------

def kto_kl_estimate(policy_logps_mismatched, ref_logps_mismatched):
  """KTO's reference point z0 = max(0, mean log π(y'|x)/π_ref(y'|x)) over mismatched pairs (x, y'),
  Ethayarajh et al. 2024; detached (the paper does not backpropagate through it)."""
  kl = (_f32(policy_logps_mismatched) - _f32(ref_logps_mismatched)).mean()
  return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_loss(policy_logps, ref_logps, desirable, kl_ref_point, *, beta: float = 0.1,
             lambda_d: float = 1.0, lambda_u: float = 1.0):
  """KTO, Ethayarajh et al. 2024: mean over examples of λ_y − v(x, y), r = log π(y|x)/π_ref(y|x).

  v = λ_D·σ(β(r − z0)) for desirable y, λ_U·σ(β(z0 − r)) for undesirable y, z0 = kl_ref_point
  (from `kto_kl_estimate`, detached here too). Defaults β = 0.1, λ_D = λ_U = 1 (the paper suggests
  λ_D·n_D / (λ_U·n_U) in [1, 4/3] when the classes are imbalanced).
  """
  r = _f32(policy_logps) - _const(ref_logps)
  z0 = _const(kl_ref_point)
  good = jnp.asarray(desirable).astype(bool)
  value = jnp.where(good, lambda_d * jax.nn.sigmoid(beta * (r - z0)),
                    lambda_u * jax.nn.sigmoid(beta * (z0 - r)))
  loss = (jnp.where(good, lambda_d, lambda_u) - value).mean()
  reward = jax.lax.stop_gradient(beta * r)
  g, b = good.astype(_F32), 1.0 - good.astype(_F32)
  chosen, rejected = _masked_mean(reward, g), _masked_mean(reward, b)
  return loss, {"rewards/chosen": chosen, "rewards/rejected": rejected,
                "rewards/margin": chosen - rejected, "kto/kl_ref_point": z0}


# ----------------------------------------------------------------------------------------------------
# Reward model
# ----------------------------------------------------------------------------------------------------

def bradley_terry_loss(r_chosen, r_rejected, margin=None):
  """Bradley-Terry reward-model loss −log σ(r_c − r_r − m) (Ouyang et al. 2022 eq. 1; the margin m
  is Llama 2's (Touvron et al. 2023 eq. 2), larger for pairs rated "significantly better")."""
  diff = _f32(r_chosen) - _f32(r_rejected)
  z = diff if margin is None else diff - _const(margin)
  loss = -jax.nn.log_sigmoid(z).mean()
  diff = jax.lax.stop_gradient(diff)
  return loss, {"rewards/chosen": jax.lax.stop_gradient(_f32(r_chosen)).mean(),
                "rewards/rejected": jax.lax.stop_gradient(_f32(r_rejected)).mean(),
                "rewards/accuracy": (diff > 0).astype(_F32).mean(), "rewards/margin": diff.mean()}


# ----------------------------------------------------------------------------------------------------
# RL: KL estimators, GAE, PPO, GRPO
# ----------------------------------------------------------------------------------------------------

def _k1(r):
  return -r


def _k2(r):
  return 0.5 * jnp.square(r)


def _k3(r):
  # expm1(r) − r ≥ 0 exactly in floating point (expm1(r) ≥ r and rounding is monotone), where
  # exp(r) − 1 − r goes slightly negative for |r| ~ 1e-4 in fp32.
  r = jnp.clip(r, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
  return jnp.expm1(r) - r


KL_ESTIMATORS: dict[str, Callable] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_penalty(logp, ref_logp, kind: str = "k3"):
  """Per-token estimate of KL(π‖π_ref) from tokens sampled from π (Schulman 2020, "Approximating KL
  divergence"), r = ref_logp − logp: k1 = −r (unbiased, can be < 0), k2 = r²/2 (biased, low variance),
  k3 = exp(r) − 1 − r (unbiased, ≥ 0; DeepSeekMath/GRPO eq. 4). r is clipped to ±20 for k3 (verl)."""
  fn = KL_ESTIMATORS.get(kind)
  _check(fn is not None, f"unknown KL estimator {kind!r}; known: {', '.join(KL_ESTIMATORS)}")
  return fn(_const(ref_logp) - _f32(logp))


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95, last_value=None):
  """Generalized advantage estimation (Schulman et al. 2016 eq. 16) -> (advantages, returns), [B, T].

  values is [B, T + 1] (the last column bootstraps each sequence) or [B, T] plus last_value [B]
  (default 0: the response ended, as in RLHF). A backward `lax.scan` skips masked positions —
  they get 0 and pass the next valid value and advantage through (verl's masked GAE), so padding
  after the end of a sequence, or a masked hole inside it, does not cut the recursion.
  returns = advantages + values (the value-function target). gamma=1, lam=0.95 are TRL's PPO defaults.
  Both outputs are detached: they are targets.
  """
  rewards, mask, values = _const(rewards), _const(mask), _const(values)
  _check(rewards.ndim == 2 and mask.shape == rewards.shape,
         f"gae: rewards and mask must be [B, T], got {rewards.shape} and {mask.shape}")
  b, t = rewards.shape
  if values.shape == (b, t + 1):
    _check(last_value is None, "gae: pass last_value only with [B, T] values")
    values, bootstrap = values[:, :t], values[:, t]
  else:
    _check(values.shape == (b, t), f"gae: values must be [B, T+1] or [B, T], got {values.shape} "
                                   f"for rewards {rewards.shape}")
    bootstrap = jnp.zeros((b,), _F32) if last_value is None else _const(last_value)

  def step(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    adv = r + gamma * next_value - v + gamma * lam * next_adv
    valid = m > 0
    carry = (jnp.where(valid, v, next_value), jnp.where(valid, adv, next_adv))
    return carry, jnp.where(valid, adv, 0.0)

  _, adv = jax.lax.scan(step, (bootstrap, jnp.zeros((b,), _F32)), (rewards.T, values.T, mask.T),
                        reverse=True)
  adv = adv.T
  return adv, (adv + values) * mask


def whiten(x, mask, eps: float = 1e-8):
  """(x − mean) / std over the valid tokens of `mask` ([B, T]; population std), 0 elsewhere: PPO's
  advantage normalization across the batch (TRL's `masked_whiten`, Huang et al. 2024 detail 7). Detached."""
  x, mask = _const(x), _const(mask)
  mean = _masked_mean(x, mask)
  var = _masked_mean(jnp.square(x - mean), mask)
  return (x - mean) * jax.lax.rsqrt(var + eps) * mask


AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def aggregate(per_token, mask, mode: str = "token_mean", max_len: int | None = None):
  """Reduce a per-token loss [B, T] over the valid tokens of `mask` to a scalar.

  "seq_mean_token_mean": mean over each sequence's tokens, then over sequences that have any (GRPO,
    Shao et al. 2024 eq. 3) — long responses weigh as much as short ones;
  "token_mean": sum over all tokens / number of tokens (DAPO, Yu et al. 2025) — every token
    weighs the same;
  "seq_mean_token_sum_norm": sum over tokens / max_len, then mean over sequences (Dr.GRPO, Liu et al.
    2025 — a constant divisor, so no length bias); max_len defaults to T.
  """
  _check(mode in AGGREGATIONS, f"unknown aggregation {mode!r}; known: {', '.join(AGGREGATIONS)}")
  per_token, mask = _f32(per_token), _const(mask)
  sums, counts = (per_token * mask).sum(-1), mask.sum(-1)
  if mode == "token_mean":
    return sums.sum() / jnp.maximum(counts.sum(), 1.0)
  if mode == "seq_mean_token_mean":
    has = (counts > 0).astype(_F32)
    return (sums / jnp.maximum(counts, 1.0)).sum() / jnp.maximum(has.sum(), 1.0)
  max_len = per_token.shape[-1] if max_len is None else max_len
  if _is_number(max_len):
    _check(max_len > 0, f"aggregate: max_len must be > 0, got {max_len}")
  return (sums / max_len).mean()


def _clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high):
  """PPO's per-token −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)·A), plus ratio diagnostics."""
  clip_high = clip_low if clip_high is None else clip_high
  if _is_number(clip_low) and _is_number(clip_high):
    _check(0 < clip_low < 1 and clip_high > 0,
           f"clip_low must be in (0, 1) and clip_high > 0, got {clip_low}, {clip_high}")
  log_ratio = jnp.clip(_f32(logp) - _const(old_logp), -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
  ratio = jnp.exp(log_ratio)
  advantages = _const(advantages)
  if advantages.ndim == log_ratio.ndim - 1:  # one advantage per sequence (GRPO): broadcast over tokens
    advantages = advantages[..., None]
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  return jnp.maximum(unclipped, clipped), ratio, log_ratio, clipped > unclipped


def _ratio_metrics(prefix, ratio, log_ratio, is_clipped, mask) -> dict:
  ratio, log_ratio = jax.lax.stop_gradient(ratio), jax.lax.stop_gradient(log_ratio)
  # approx KL(old‖new) = E_old[(ρ − 1) − log ρ]: the k3 estimator, ≥ 0 (Schulman 2020).
  return {f"{prefix}/clip_frac": _masked_mean(is_clipped.astype(_F32), mask),
          f"{prefix}/approx_kl": _masked_mean(ratio - 1.0 - log_ratio, mask),
          f"{prefix}/ratio": _masked_mean(ratio, mask)}


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_low: float = 0.2,
                    clip_high: float | None = None, aggregation: str = "token_mean",
                    max_len: int | None = None):
  """PPO clipped surrogate (Schulman et al. 2017 eq. 7), per token −min(ρA, clip(ρ, 1−ε_l, 1+ε_h)·A).

  ρ = exp(logp − old_logp); advantages are [B, T] (or [B], broadcast). clip_high=None uses clip_low;
  setting it higher is DAPO's "clip-higher" (Yu et al. 2025: ε_l = 0.2, ε_h = 0.28) which lets
  low-probability tokens grow. Where the clipped branch is taken the gradient is zero.
  """
  mask = _const(mask)
  per_token, ratio, log_ratio, is_clipped = _clipped_surrogate(logp, old_logp, advantages, clip_low,
                                                               clip_high)
  loss = aggregate(per_token, mask, aggregation, max_len)
  return loss, _ratio_metrics("policy", ratio, log_ratio, is_clipped, mask)


def value_loss(values, old_values, returns, mask, clip: float | None = 0.2,
               aggregation: str = "token_mean"):
  """PPO clipped value loss 0.5·max((V − R)², (V_old + clip(V − V_old, ±c) − R)²) (Schulman et al.
  2017's baselines ppo2; TRL's `cliprange_value` = 0.2); clip=None is plain 0.5·(V − R)²."""
  values, old_values, returns, mask = _f32(values), _const(old_values), _const(returns), _const(mask)
  unclipped = jnp.square(values - returns)
  if clip is None:
    per_token, is_clipped = unclipped, jnp.zeros_like(unclipped, bool)
  else:
    v_clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    clipped = jnp.square(v_clipped - returns)
    per_token, is_clipped = jnp.maximum(unclipped, clipped), clipped > unclipped
  loss = 0.5 * aggregate(per_token, mask, aggregation)
  values = jax.lax.stop_gradient(values)
  return loss, {"value/clip_frac": _masked_mean(is_clipped.astype(_F32), mask),
                "value/mean": _masked_mean(values, mask),
                "value/abs_error": _masked_mean(jnp.abs(values - returns), mask)}


def grpo_advantages(rewards, group_size: int, scale: str = "std", eps: float = 1e-6):
  """Group-relative advantages (Shao et al. 2024 §4.1.2): (r − mean_group) / (std_group + eps).

  rewards are [B*G] (consecutive groups of `group_size` samples of one prompt) or [B, G]; the output
  has the same shape. scale="std" divides by the unbiased (ddof=1) group std as TRL and verl do
  (torch.std); scale="none" only centres (Dr.GRPO, Liu et al. 2025: the std division over-weights
  prompts that are nearly always right or wrong). Centring subtracts the group's first reward before
  averaging, so a group of identical rewards gives exactly 0 (not rounding noise / eps). Detached.
  """
  _check(scale in ("std", "none"), f"grpo_advantages: scale must be 'std' or 'none', got {scale!r}")
  rewards = _const(rewards)
  _check(rewards.ndim in (1, 2), f"grpo_advantages: rewards must be [B*G] or [B, G], got {rewards.shape}")
  _check(isinstance(group_size, int) and group_size >= 1 and rewards.size % group_size == 0
         and (rewards.ndim == 1 or rewards.shape[1] == group_size),
         f"grpo_advantages: {rewards.shape} rewards do not split into groups of {group_size}")
  groups = rewards.reshape(-1, group_size)
  shifted = groups - groups[:, :1]
  centred = shifted - shifted.mean(-1, keepdims=True)
  if scale == "std":
    std = jnp.std(centred, axis=-1, keepdims=True, ddof=1) if group_size > 1 else jnp.zeros_like(centred)
    centred = centred / (std + eps)
  return centred.reshape(rewards.shape)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_low: float = 0.2,
              clip_high: float | None = None, beta_kl: float = 0.04,
              aggregation: str = "seq_mean_token_mean", max_len: int | None = None):
  """GRPO objective (Shao et al. 2024 eq. 3) as a loss, per token
  −min(ρ·Â, clip(ρ, 1−ε_l, 1+ε_h)·Â) + β·k3(π‖π_ref), with Â the sequence's advantage [B] on each
  of its tokens.

  old_logp=None means one update per rollout batch (ρ = 1 but the gradient is Â·∇log π, TRL's
  default); ref_logp may be None when beta_kl = 0 (DAPO and Dr.GRPO drop the KL term). β = 0.04 and
  seq-mean-token-mean are the paper's; aggregation="token_mean" with clip_high=0.28 is DAPO,
  "seq_mean_token_sum_norm" with grpo_advantages(scale="none") is Dr.GRPO.
  """
  logp, mask = _f32(logp), _const(mask)
  old_logp = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
  per_token, ratio, log_ratio, is_clipped = _clipped_surrogate(logp, old_logp, advantages, clip_low,
                                                               clip_high)
  metrics = _ratio_metrics("policy", ratio, log_ratio, is_clipped, mask)
  metrics["policy/pg_loss"] = jax.lax.stop_gradient(aggregate(per_token, mask, aggregation, max_len))
  use_kl = not (_is_number(beta_kl) and beta_kl == 0)
  if use_kl:
    _check(ref_logp is not None, "grpo_loss: ref_logp is needed when beta_kl != 0")
    kl = kl_penalty(logp, ref_logp, "k3")
    per_token = per_token + beta_kl * kl
    metrics["kl"] = jax.lax.stop_gradient(_masked_mean(kl, mask))
  return aggregate(per_token, mask, aggregation, max_len), metrics
