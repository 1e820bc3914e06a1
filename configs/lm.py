"""Language-model pretraining presets.

Launch:
    python -m train                                        # = configs/lm.py:tiny, CPU, ~6-10 min on 2 cores
    python -m train --config=configs/lm.py:125m --config.mesh.fsdp=-1
    python -m train --config=configs/lm.py:350m,smoke      # any preset shrunk to a CPU-sized model

Presets (params from `model.params.count_params`, pinned in tests/test_model.py; the 1b/7b/70b shapes
are TinyLlama-1.1B, Llama-2-7B and Llama-2-70B and match their published counts exactly):

| preset | d_model | layers | heads (kv) | d_ff  | vocab  | params         | expected result |
|--------|---------|--------|------------|-------|--------|----------------|-----------------|
| tiny   | 256     | 4      | 4 (4)      | 704   | 4096   | 4.26M (tied)   | stdlib corpus, 600 steps, ~7 min on 2 CPU cores |
| 125m   | 768     | 12     | 12 (12)    | 2048  | 32000  | 109.5M (tied)  | GPT-3 Small shape |
| 350m   | 1024    | 24     | 16 (16)    | 2816  | 32000  | 341.1M (tied)  | GPT-3 Medium shape, SwiGLU |
| 1b     | 2048    | 22     | 32 (4)     | 5632  | 32000  | 1,100,048,384  | TinyLlama-1.1B |
| 7b     | 4096    | 32     | 32 (32)    | 11008 | 32000  | 6,738,415,616  | Llama-2-7B |
| 70b    | 8192    | 80     | 64 (8)     | 28672 | 32000  | 68,976,648,192 | Llama-2-70B |

`smoke` (comma-added, e.g. `125m,smoke`) keeps a preset's architecture choices but shrinks widths,
depth, sequence, batch and steps so it trains in seconds on CPU.

`moe` (e.g. `tiny,moe` or `tiny,moe,smoke`) turns every MLP into 8 experts of the same width, top-2
softmax routing renormalized (Mixtral), capacity factor 1.25 (tokens past capacity are dropped), aux
loss 0.01 and router z-loss 1e-3: tiny,moe has 19.4M params, 6.4M active per token. Expert parallelism is a mesh
override, e.g. `python -m train --config=configs/lm.py:tiny,moe --config.mesh.expert=4`.
"""
from __future__ import annotations

from ml_collections import ConfigDict, config_dict

SIZES = {
    # name: (d_model, n_layers, n_heads, n_kv_heads, d_ff, vocab, tie)
    "tiny": (256, 4, 4, 4, 704, 0, True),
    "125m": (768, 12, 12, 12, 2048, 32000, True),
    "350m": (1024, 24, 16, 16, 2816, 32000, True),
    "1b": (2048, 22, 32, 4, 5632, 32000, False),
    "7b": (4096, 32, 32, 32, 11008, 32000, False),
    "70b": (8192, 80, 64, 8, 28672, 32000, False),
}


def base() -> ConfigDict:
  c = ConfigDict()
  c.run = ConfigDict(dict(name="tiny", dir="", seed=0))  # dir "" → runs/<name>.

  c.model = ConfigDict(dict(
      vocab_size=0,  # 0: the tokenizer's vocab rounded up to a multiple of 128.
      d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=0, d_ff=0,
      activation="swiglu", norm="rmsnorm", norm_placement="pre", norm_eps=1e-5, use_bias=False,
      qkv_bias=False, qk_norm=False, positions="rope", rope_theta=10_000.0, rope_scaling="none", rope_factor=1.0,
      rope_original_max_len=8192, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
      yarn_beta_fast=32.0, yarn_beta_slow=1.0, max_seq_len=2048, sliding_window=0,
      tie_embeddings=True, dropout=0.0, init_std=0.02, scaled_residual_init=True, scan_layers=True,
      attention="xla", param_dtype="float32", compute_dtype="bfloat16", logits_dtype="float32",
      mup_base_width=0,  # 0: standard parametrization; w: μP with width multiplier d_model / w.
      mup_output_mult=1.0,
      # Mixture of experts (model/layers/moe.py, fields documented in model/config.py); 0: dense.
      n_experts=0, experts_per_token=2, moe_router="softmax", moe_renormalize=True, capacity_factor=0.0,
      n_shared_experts=0, moe_d_ff=0, moe_every=1, moe_aux_weight=0.01, moe_z_weight=1e-3,
      moe_bias_rate=1e-3))

  c.data = ConfigDict(dict(
      sources="",  # "": the embedded Python-stdlib corpus; else "domain=glob,domain2=glob2".
      manifest="",  # prebuilt shards (e.g. `python -m data.curate`'s <out>/shards); overrides sources.
      weights="",  # "": by token count; else "code=0.5,prose=0.5".
      shuffle_window=1024,  # training chunks shuffled together so one long document doesn't fill
                            # consecutive batches; 0 = off (data/pipeline.py).
      seq_len=512,
      vocab_size=4096,  # tokenizer vocab when one is trained.
      tokenizer="",  # path to an existing SentencePiece .model; "" trains one on the sources.
      tokenizer_sample_chars=20_000_000,
      tokenizer_seed=0,  # the tokenizer's text sample; not run.seed: seed replicates share one vocabulary.
      cache_dir="",  # "": $JAXLM_CACHE or ~/.cache/jaxlm.
      val_fraction=0.01,
      num_workers=0,  # tokenization processes; 0: one per CPU.
      prefetch=2))

  c.optim = ConfigDict(dict(
      name="adamw", peak_lr=3e-4, schedule="cosine",  # cosine | wsd | constant
      warmup_steps=100, final_lr_frac=0.1,  # floor of cosine / end of wsd decay, as a fraction of peak.
      decay_frac=0.2,  # wsd: fraction of steps spent in the final linear decay.
      weight_decay=0.1, clip=1.0, b1=0.9, b2=0.95, eps=1e-8,
      offload=False))  # true: optimizer moments in pinned host memory between steps (train/state.py).

  c.train = ConfigDict(dict(
      steps=1000, batch_size=32,  # global sequences per optimizer step.
      grad_accum=1, log_every=10, eval_every=200, eval_batches=8,
      remat="none",  # none | full | save_dots | offload (save_dots' activations kept in host memory)
      microbatches=1,  # pipeline (mesh.stage > 1) micro-batches M: bubble (stages-1)/(M+stages-1).
      z_loss=1e-4,  # PaLM's auxiliary log(Z)^2 weight: keeps the softmax normalizer near 1.
      max_nonfinite=20,  # abort after this many consecutive skipped (non-finite) updates.
      progress=True))

  c.mesh = ConfigDict(dict(
      data=-1, stage=1, fsdp=1, expert=1, sequence=1, tensor=1,  # -1 fills the remaining devices.
      rules=config_dict.placeholder(tuple),  # ((logical, mesh_axes), ...) prepended to the default table.
      zero1=False,  # ZeRO-1: optimizer state also split over `data` (params, grads replicated there).
  ))

  c.checkpoint = ConfigDict(dict(every=200, keep=3, keep_every=0, async_save=True))

  c.dist = ConfigDict(dict(  # multi-host start-up, train/distributed.py; all unset: detected or one process.
      coordinator="",  # "host:port" of process 0 ("": $JAXLM_COORDINATOR, or the detected cluster's).
      num_processes=0, process_id=-1,  # 0 / -1: $JAXLM_NUM_PROCESSES / $JAXLM_PROCESS_ID, or detected.
      cluster="auto"))  # auto | none | slurm | gcetpu | gketpu | k8s | ompi | mpi4py

  c.eval = ConfigDict(dict(  # train.evaluate tasks run on the live params every `every` steps (0: off).
      tasks=config_dict.placeholder(tuple),  # e.g. ("wikitext2", "gsm8k"); names in train/evaluate.py.
      every=0, limit=0,  # limit: first N examples of each task (0: all).
      batch_size=16, gsm8k_shots=8, humaneval_samples=1,
      max_gen_toks=0))  # 0: min(256, seq_len / 2).

  c.sample = ConfigDict(dict(  # generations written into report.md at the end of a run.
      prompts=("def ", "import ", "The "), max_new_tokens=64, temperature=0.8, top_k=50, top_p=0.95))
  return c


def get_config(arg: str | None = None) -> ConfigDict:
  args = [a for a in (arg or "tiny").split(",") if a]
  size = next((a for a in args if a in SIZES), "tiny")
  unknown = [a for a in args if a not in SIZES and a not in ("smoke", "moe")]
  if unknown:
    raise ValueError(f"configs/lm.py: unknown preset args {unknown}; sizes {sorted(SIZES)}, 'moe' and "
                     "'smoke'")
  c = base()
  d, layers, heads, kv, ff, vocab, tie = SIZES[size]
  c.run.name = size
  c.model.update(dict(d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, d_ff=ff,
                      vocab_size=vocab, tie_embeddings=tie))
  if vocab:
    c.data.vocab_size = vocab

  if size == "tiny":
    c.data.seq_len = 256
    c.data.tokenizer_sample_chars = 5_000_000
    # ~3,200 tokens/s on 2 CPU cores (README): 600 steps x 8 x 256 tokens ≈ 7 min of training.
    # eval_batches=40 covers ~all 84k val tokens: 4 batches (8k tokens, one or two documents) read 3.40
    # where the whole split reads 4.58 (LOG.md 2026-11-23).
    c.train.update(dict(steps=600, batch_size=8, log_every=10, eval_every=200, eval_batches=40))
    c.optim.update(dict(peak_lr=2e-3, warmup_steps=30, weight_decay=0.1))
    c.checkpoint.every = 200
  else:
    c.data.seq_len = 2048
    c.model.max_seq_len = 4096 if size in ("1b", "7b", "70b") else 2048
    c.train.update(dict(steps=20_000, batch_size=256, eval_every=1000, eval_batches=16))
    c.optim.update(dict(peak_lr={"125m": 6e-4, "350m": 3e-4, "1b": 4e-4, "7b": 3e-4, "70b": 1.5e-4}[size],
                        warmup_steps=2000))
    c.checkpoint.every = 1000
    c.train.remat = "save_dots" if size in ("1b", "7b", "70b") else "none"
    c.mesh.update(dict(data=1, fsdp=-1))

  if "smoke" in args:
    c.run.name = f"{size}-smoke"
    ratio = max(1, heads // kv)
    c.model.update(dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=max(1, 4 // ratio), d_ff=0,
                        vocab_size=0, max_seq_len=256,
                        compute_dtype="float32"))  # tests compare meshes and resumes at fp32 tolerances.
    c.data.update(dict(seq_len=64, vocab_size=512, tokenizer_sample_chars=1_000_000))
    c.train.update(dict(steps=20, batch_size=8, log_every=5, eval_every=10, eval_batches=2, remat="none"))
    c.optim.update(dict(peak_lr=3e-3, warmup_steps=5))
    c.checkpoint.every = 10
    c.mesh.update(dict(data=-1, fsdp=1))
    c.sample.max_new_tokens = 16

  if "moe" in args:
    c.run.name += "-moe"
    c.model.update(dict(n_experts=8, experts_per_token=2, moe_router="softmax", moe_renormalize=True,
                        capacity_factor=1.25))
  return c
