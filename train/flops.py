"""FLOPs per token and MFU: the project's one source of both.

Two counts live here, for two uses:

- `flops_per_token` (PaLM) for MFU, comparable with published MFU tables.
- `chinchilla_flops_per_token` (Hoffmann et al. 2022, Appendix F) for scaling-law work: every matmul
  counted from the architecture (embedding lookup as a one-hot matmul, QKV, attention logits, softmax,
  attention·values, output projection, MLP, unembedding), backward = 2× forward. `six_nd` is the common
  C ≈ 6·N·D approximation beside it.

MFU follows PaLM (Chowdhery et al. 2022, Appendix B): model FLOPs per token = 6N + 12·L·H·Q·T, with
N the non-embedding params (matmul params, incl. the output head; `model.params.count_params`),
L layers, H query heads, Q head dim, T sequence length. Attention is counted in full (no causal
halving), as published MFU tables do. Remat recomputation is *not* counted (that would be HFU).

Mixture of experts: N is the *active* non-embedding count (`model.params.active_params`): each MoE layer
counts its router (d·E), k experts and the shared experts, not all E, i.e.
N = N_non_embedding − L_moe · (E − k) · m · d · f_e with m = 3 gated / 2 plain, f_e = the expert width.
Capacity padding (c > 1 computes up to c× the routed slots) and dropped tokens are not counted: model
FLOPs, as MFU defines them.
"""
from __future__ import annotations

import jax

from model.config import ModelConfig
from model.params import active_params

# Dense bf16 peak FLOP/s per chip, from vendor datasheets (no sparsity).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # Trillium / v6e
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,  # SXM; the PCIe card is 756e12, matched first below.
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10G": 125e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training (forward + backward) model FLOPs per token, PaLM Appendix B."""
  n = active_params(cfg)  # == count_params(cfg)["non_embedding"] for a dense model.
  return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.hd * seq_len


def chinchilla_flops_breakdown(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
  """Forward FLOPs per token by component, Chinchilla Appendix F divided by seq_len.

  The paper's formulas are per sequence of length T for multi-head attention with a 2-matrix MLP; here
  K/V use n_kv_heads (GQA/MQA) and a gated MLP (SwiGLU/GeGLU) counts its three matrices. With n_kv_heads
  == n_heads and a non-gated MLP this is the paper's count exactly. Attention logits and values are
  counted over the full T×T square (no causal halving), as the paper does.
  """
  d, v, t = cfg.d_model, cfg.vocab_size, seq_len
  q_width, kv_width = cfg.n_heads * cfg.hd, cfg.n_kv_heads * cfg.hd
  attention = dict(
      qkv=2.0 * d * (q_width + 2 * kv_width),
      attn_logits=2.0 * t * q_width,
      softmax=3.0 * cfg.n_heads * t,
      attn_values=2.0 * t * q_width,
      attn_out=2.0 * q_width * d)
  m = 3 if cfg.gated else 2
  mlp = 2.0 * m * d * cfg.ff
  # MoE layer: router logits + the k routed and the shared experts a token goes through.
  moe = 2.0 * d * cfg.n_experts + 2.0 * m * d * cfg.moe_ff * (cfg.experts_per_token + cfg.n_shared_experts)
  n_moe = cfg.n_moe_layers
  out = dict(embeddings=2.0 * v * d)
  out.update({k: cfg.n_layers * x for k, x in attention.items()})
  out["mlp"] = (cfg.n_layers - n_moe) * mlp + n_moe * moe
  out["logits"] = 2.0 * d * v
  return out


def chinchilla_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3 × forward), Chinchilla Appendix F."""
  return 3.0 * sum(chinchilla_flops_breakdown(cfg, seq_len).values())


def six_nd(n_params: float, tokens: float) -> float:
  """The C ≈ 6·N·D approximation (Kaplan et al. 2020, eq. 2.2 with the attention term dropped)."""
  return 6.0 * n_params * tokens


def peak_flops(device: jax.Device | None = None) -> float | None:
  """Peak bf16 FLOP/s of one device, or None where unknown (CPU: MFU is reported as null)."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  if "H100" in kind and "PCIe" in kind:
    return 756e12
  for name, value in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name) or name in kind:
      return value
  return None


def mfu(tokens_per_s: float, flops_token: float, n_devices: int, peak: float | None) -> float | None:
  if not peak:
    return None
  return tokens_per_s * flops_token / (n_devices * peak)
