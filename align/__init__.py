"""Post-training on top of `train/` (and `serve/` for fast rollouts).

Stages: SFT, reward model, the DPO family (DPO, cDPO, rDPO, IPO, SimPO, ORPO, KTO), PPO, GRPO/RLVR,
constitutional self-critique data, LoRA. Each stage has one entry point, `python -m align.<stage>`
(e.g. `python -m align.dpo`). The loss maths shared by all of them lives in `align/losses.py` as pure
JAX functions.
"""
