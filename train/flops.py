"""FLOPs per token and MFU: the project's one source of both.

MFU follows PaLM (Chowdhery et al. 2022, Appendix B): model FLOPs per token = 6N + 12·L·H·Q·T, with
N the non-embedding params (matmul params, incl. the output head; `model.params.count_params`),
L layers, H query heads, Q head dim, T sequence length. Attention is counted in full (no causal
halving), as published MFU tables do. Remat recomputation is *not* counted (that would be HFU).
"""
from __future__ import annotations

import jax

from model.config import ModelConfig
from model.params import count_params

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
  n = count_params(cfg)["non_embedding"]
  return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.hd * seq_len


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
