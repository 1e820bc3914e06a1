"""Architecture config of the decoder-only transformer.

`ModelConfig` is a frozen dataclass so model code gets typed, validated fields; presets in
`configs/` build it from the `model` subtree of the run config with `ModelConfig.from_dict`.
Nothing here knows about devices or meshes.

μP (maximal update parametrization; Yang et al. 2022, "Tensor Programs V", Table 3 for Adam, in the
`mup` library's MuReadout output-multiplier form) is on when `mup_base_width > 0`. With the width
multiplier m = d_model / mup_base_width:
  - hidden matrices (q, k, v, o, MLP in/gate/out: fan-in grows with width) init with std / sqrt(m)
    (`hidden_init_std`); input embeddings (and an untied lm_head) keep `init_std`;
  - logits are multiplied by mup_output_mult / m (`logits_mult`), tied or untied, like MuSharedReadout;
  - attention logits use sqrt(base_head_dim) / head_dim instead of 1 / sqrt(head_dim) (`attn_q_mult`),
    with base_head_dim = head_dim / m: width grows at a fixed head count, head_dim ∝ d_model (the `mup`
    library's GPT-2 convention); the `mup` library picks 8 / head_dim instead, we keep the SP value at m = 1;
  - `train/optim.py` multiplies the Adam updates of hidden matrices by 1 / m.
At d_model == mup_base_width (m = 1) every factor is exactly 1.0, so μP is SP bit for bit.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")
NORMS = ("rmsnorm", "layernorm")
NORM_PLACEMENTS = ("pre", "post")
POSITIONS = ("rope", "alibi", "learned", "sinusoidal", "none")
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")
REMAT_POLICIES = ("none", "full", "save_dots", "offload")  # model/transformer.py
DTYPES = ("float32", "bfloat16", "float16")
MOE_ROUTERS = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 4096
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 4  # == n_heads: MHA; 1: MQA; in between: GQA.
  head_dim: int = 0  # 0: d_model // n_heads.
  d_ff: int = 0  # 0: 4*d_model (gelu/relu) or 8/3*d_model rounded to 64 (gated), same params.
  activation: str = "swiglu"
  norm: str = "rmsnorm"
  norm_placement: str = "pre"
  norm_eps: float = 1e-5
  use_bias: bool = False  # biases on every linear layer (GPT-2; Llama's attention_bias + mlp_bias).
  qkv_bias: bool = False  # biases on the q/k/v projections only (Qwen2); implied by use_bias.
  qk_norm: bool = False
  positions: str = "rope"
  rope_theta: float = 10_000.0
  rope_scaling: str = "none"
  rope_factor: float = 1.0  # context extension factor for linear / llama3 / yarn.
  rope_original_max_len: int = 8192  # pre-extension context length (llama3, yarn).
  rope_low_freq_factor: float = 1.0  # llama3.
  rope_high_freq_factor: float = 4.0  # llama3.
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  max_seq_len: int = 2048  # learned/sinusoidal table size, and the bound checked against data.seq_len.
  sliding_window: int = 0  # 0: full causal attention; w: each query sees the last w keys (itself included).
  tie_embeddings: bool = True
  dropout: float = 0.0
  init_std: float = 0.02
  scaled_residual_init: bool = True  # output projections get std / sqrt(2 * n_layers) (GPT-2).
  scan_layers: bool = True
  remat: str = "none"
  attention: str = "xla"  # xla | cudnn | pallas | auto: registered kernels in model.layers.attention.
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"
  logits_dtype: str = "float32"
  mup_base_width: int = 0  # 0: standard parametrization; w > 0: μP with width multiplier d_model / w.
  mup_output_mult: float = 1.0  # μP: logits × mup_output_mult / m (tuned at base width, then transferred).
  # Mixture of experts (model/layers/moe.py); n_experts = 0: a dense MLP in every layer.
  n_experts: int = 0
  experts_per_token: int = 2  # k of top-k routing.
  moe_router: str = "softmax"  # softmax (Switch, Mixtral) | sigmoid + selection bias (DeepSeek-V3).
  moe_renormalize: bool = True  # the k routing weights sum to 1 (Mixtral, DeepSeek-V3); Switch: false.
  capacity_factor: float = 0.0  # 0: dropless; c > 0: an expert takes ceil(k·T·c / E) tokens per sequence.
  n_shared_experts: int = 0  # DeepSeekMoE always-on experts: one MLP of width n_shared_experts · moe_ff.
  moe_d_ff: int = 0  # hidden width of one expert; 0: the dense `ff`.
  moe_every: int = 1  # layer i (0-based) is MoE when (i + 1) % moe_every == 0; scan_layers needs 1.
  moe_aux_weight: float = 0.01  # Switch load-balancing loss weight α (Fedus et al. 2021, §2.2).
  moe_z_weight: float = 1e-3  # router z-loss weight (Zoph et al. 2022, ST-MoE eq. 5).
  moe_bias_rate: float = 1e-3  # sigmoid router: bias update speed γ per step (DeepSeek-V3 §2.1.2).

  def __post_init__(self):
    def check(ok: bool, msg: str):
      if not ok:
        raise ValueError(f"model config: {msg}")

    check(self.activation in ACTIVATIONS, f"activation={self.activation!r} not in {ACTIVATIONS}")
    check(self.norm in NORMS, f"norm={self.norm!r} not in {NORMS}")
    check(self.norm_placement in NORM_PLACEMENTS, f"norm_placement={self.norm_placement!r} not in {NORM_PLACEMENTS}")
    check(self.positions in POSITIONS, f"positions={self.positions!r} not in {POSITIONS}")
    check(self.rope_scaling in ROPE_SCALINGS, f"rope_scaling={self.rope_scaling!r} not in {ROPE_SCALINGS}")
    check(self.remat in REMAT_POLICIES, f"remat={self.remat!r} not in {REMAT_POLICIES}")
    for name in ("param_dtype", "compute_dtype", "logits_dtype"):
      check(getattr(self, name) in DTYPES, f"{name}={getattr(self, name)!r} not in {DTYPES}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
      check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
    check(self.n_heads % self.n_kv_heads == 0,
          f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
    check(self.head_dim > 0 or self.d_model % self.n_heads == 0,
          f"d_model={self.d_model} not divisible by n_heads={self.n_heads}; set head_dim")
    check(self.positions != "rope" or self.hd % 2 == 0, f"rope needs an even head_dim, got {self.hd}")
    check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
    check(self.sliding_window >= 0, f"sliding_window must be >= 0, got {self.sliding_window}")
    check(not (self.attention == "pallas" and self.positions == "alibi"),
          "attention=pallas has no additive-bias (ALiBi) path; use attention=xla, cudnn or auto with alibi")
    check(self.mup_base_width >= 0, f"mup_base_width must be >= 0 (0 = off), got {self.mup_base_width}")
    check(self.mup_output_mult > 0, f"mup_output_mult must be positive, got {self.mup_output_mult}")
    check(self.mup or self.mup_output_mult == 1.0,
          f"mup_output_mult={self.mup_output_mult} has no effect without μP; set mup_base_width > 0")
    check(self.n_experts >= 0, f"n_experts must be >= 0 (0 = dense MLP), got {self.n_experts}")
    if self.n_experts:
      check(1 <= self.experts_per_token <= self.n_experts,
            f"experts_per_token={self.experts_per_token} must be in [1, n_experts={self.n_experts}]")
      check(self.moe_router in MOE_ROUTERS, f"moe_router={self.moe_router!r} not in {MOE_ROUTERS}")
      # Renormalizing one weight makes it 1.0: the router would learn from the aux losses alone.
      check(not (self.moe_renormalize and self.experts_per_token == 1),
            "moe_renormalize with experts_per_token=1 sets every routing weight to 1 (no router "
            "gradient); set moe_renormalize=false (Switch Transformer)")
      check(self.capacity_factor >= 0,
            f"capacity_factor must be >= 0 (0 = dropless), got {self.capacity_factor}")
      for name in ("n_shared_experts", "moe_d_ff", "moe_aux_weight", "moe_z_weight", "moe_bias_rate"):
        check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
      check(self.moe_every >= 1, f"moe_every must be >= 1, got {self.moe_every}")
      check(not (self.scan_layers and self.moe_every != 1),
            f"moe_every={self.moe_every} mixes MoE and dense layers, which scan_layers cannot stack; "
            "set scan_layers=false or moe_every=1")
      check(not self.use_bias, "use_bias is not supported with MoE experts (n_experts > 0)")

  @property
  def hd(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def ff(self) -> int:
    if self.d_ff:
      return self.d_ff
    if self.activation in ("swiglu", "geglu"):
      # 2/3 of 4*d keeps params equal to a 4*d non-gated MLP (LLaMA); round up to 64 for MXU tiles.
      return 64 * -(-int(8 * self.d_model / 3) // 64)
    return 4 * self.d_model

  @property
  def moe_ff(self) -> int:
    """Hidden width of one expert."""
    return self.moe_d_ff or self.ff

  def is_moe_layer(self, i: int) -> bool:
    return self.n_experts > 0 and (i + 1) % self.moe_every == 0

  @property
  def n_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.n_layers))

  @property
  def gated(self) -> bool:
    return self.activation in ("swiglu", "geglu")

  @property
  def mup(self) -> bool:
    return self.mup_base_width > 0

  @property
  def mup_width_mult(self) -> float:
    """μP width multiplier m = d_model / mup_base_width; 1.0 in standard parametrization."""
    return self.d_model / self.mup_base_width if self.mup else 1.0

  @property
  def hidden_init_std(self) -> float:
    """Init std of hidden matrices: init_std / sqrt(m) (variance ∝ 1 / fan-in under μP)."""
    return self.init_std / self.mup_width_mult ** 0.5

  @property
  def out_init_std(self) -> float:
    """Residual output projections (attention wo, MLP w_out): also / sqrt(2 · n_layers) (GPT-2)."""
    std = self.hidden_init_std
    return std / (2 * self.n_layers) ** 0.5 if self.scaled_residual_init else std

  @property
  def attn_q_mult(self) -> float:
    """Factor on q so the kernel's 1/sqrt(hd) becomes μP's sqrt(hd / m) / hd: 1 / sqrt(m) (1.0 in SP)."""
    return (1.0 / self.mup_width_mult) ** 0.5

  @property
  def logits_mult(self) -> float:
    """μP readout multiplier mup_output_mult / m (MuReadout); 1.0 in SP."""
    return self.mup_output_mult / self.mup_width_mult

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"model config: unknown keys {unknown}")
    return cls(**dict(d))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
