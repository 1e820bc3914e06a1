"""Parallel layouts train exactly like one device: tensor, sequence and pipeline parallelism, ZeRO-1,
optimizer-state and remat host offload (8 fake CPU devices, `tiny,smoke` in fp32, 3 steps each).

Each layout is a config override of the same run; its losses and updated params must equal the
single-device run's at fp32 tolerances (rtol 1e-5, atol 1e-6; the largest differences measured on a
2-core CPU were 3e-7 relative in the loss and 8e-8 absolute in a param). A second check per layout
makes sure the layout really is in effect (a sharding, a metric or the compiled HLO), so a silently
replicated run cannot pass.
"""
import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import packed_batch, train_on_mesh
from model.config import ModelConfig
from train import pipeline, sharding
from train.config import ConfigError, model_config, parse_args, resolve
from train.state import HOST, check_memory_kind, init_state, make_setup
from train.step import make_train_step

BATCH = (16, 32)  # 16 rows: 4 pipeline micro-batches of 4 rows still split over fsdp=4.
STEPS = 3


def _batch(step: int, vocab: int) -> dict:
  return packed_batch(*BATCH, vocab, step)


def _config(mesh: dict, overrides=()):
  cfg, _ = parse_args(["--config=configs/lm.py:tiny,smoke", "--config.mesh.data=1",
                       *[f"--config.mesh.{k}={v}" for k, v in mesh.items()], *overrides])
  return resolve(cfg, 500)


def _setup(mesh: dict, overrides=()):
  cfg = _config(mesh, overrides)
  n = int(np.prod([cfg.mesh[a] for a in sharding.MESH_AXES]))
  return cfg, make_setup(cfg, model_config(cfg), sharding.make_mesh(cfg.mesh, jax.devices()[:n]))


def _train(mesh: dict, overrides=()) -> dict:
  run = train_on_mesh(mesh, batch=BATCH, overrides=overrides)
  abstract_batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _batch(0, 1))
  return dict(run, hlo=lambda: run["fn"].lower(run["setup"].abstract_state, abstract_batch).compile().as_text())


@pytest.fixture(scope="module")
def single_device():
  return _train({})


def _assert_same_run(run, ref):
  np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(run["params"]) == jax.tree.structure(ref["params"])
  for a, b in zip(jax.tree.leaves(run["params"]), jax.tree.leaves(ref["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _spec(run, *path, tree="params"):
  x = run["state"][tree]
  for p in path:
    x = x[p]
  return x.sharding.spec


# ------------------------------------------------------------------ layouts = one device

def test_data_fsdp_tensor_2x2x2(single_device):
  run = _train(dict(data=2, fsdp=2, tensor=2))
  _assert_same_run(run, single_device)
  assert _spec(run, "blocks", "mlp", "w_in") == P(None, "fsdp", "tensor")  # [layers, embed, mlp]
  assert _spec(run, "blocks", "attn", "wo") == P(None, "tensor", None, "fsdp")  # [layers, heads, hd, embed]


def test_tensor_4_x_data_2(single_device):
  # tensor=8 does not divide the smoke model's 4 heads (they would be replicated), so 4 × 2 data.
  run = _train(dict(data=2, tensor=4))
  _assert_same_run(run, single_device)
  assert _spec(run, "blocks", "attn", "wq") == P(None, None, "tensor", None)
  assert _spec(run, "embed") == P("tensor", None)  # vocab-parallel embedding and (tied) logits


def test_sequence_parallel_fsdp_2_x_sequence_4(single_device):
  run = _train(dict(fsdp=2, sequence=4))
  _assert_same_run(run, single_device)
  assert sharding.batch_sharding(BATCH, run["setup"].mesh, run["setup"].rules).spec == P("fsdp", "sequence")
  # Attention logits per device are [batch/2, heads, 32/4 queries, all 32 keys]: Q split, K/V gathered.
  assert "f32[8,4,8,32]" in run["hlo"]()


def test_pipeline_stage_2_x_fsdp_4_with_4_microbatches_and_remat_offload(single_device):
  run = _train(dict(stage=2, fsdp=4), ["--config.train.microbatches=4", "--config.train.remat=offload"])
  _assert_same_run(run, single_device)
  assert _spec(run, "blocks", "mlp", "w_in") == P("stage", "fsdp", None)  # layer l on stage l // 1
  assert float(run["metrics"]["pipeline/bubble"]) == pytest.approx(1 / 5)
  hlo = run["hlo"]()
  # The stage buffer moves between the stages' devices: a collective-permute over `stage`.
  assert "collective-permute" in hlo


def test_zero1_data_8_with_optimizer_offload(single_device):
  kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
  overrides = ["--config.mesh.zero1=true", "--config.optim.offload=true"]
  if HOST not in kinds:  # this backend cannot offload: the option must refuse, and ZeRO-1 runs without.
    with pytest.raises(ConfigError, match="optim.offload=true needs 'pinned_host'"):
      _setup(dict(data=8), overrides)
    overrides = overrides[:1]
  run = _train(dict(data=8), overrides)
  _assert_same_run(run, single_device)
  mu = optax.tree.get(run["state"]["opt_state"], "mu")  # Adam's first moment, a tree like the params
  assert _spec(run, "blocks", "mlp", "w_in") == P(None, None, None)  # params replicated over data...
  assert mu["blocks"]["mlp"]["w_in"].sharding.spec == P(None, "data", None)  # ...their moments split
  assert mu["embed"].sharding.spec == P(None, "data")
  if HOST in kinds:
    assert mu["blocks"]["mlp"]["w_in"].sharding.memory_kind == HOST
    assert run["state"]["params"]["embed"].sharding.memory_kind == "device"


# ------------------------------------------------------------------ tensor parallelism = Megatron

def test_tensor_parallel_has_one_all_reduce_per_attention_and_mlp():
  """1 layer on tensor=4: column-parallel q/k/v and MLP in/gate, row-parallel wo and MLP out.

  Forward: one all-reduce after wo and one after the MLP out projection. Backward: one after the q/k/v
  projections' input gradient and one after the MLP in/gate's (XLA's combiner merges their partial sums
  into one tuple all-reduce). Outside the layer: the vocab-parallel embedding (fwd) and logits (bwd), two
  [B, T, D] all-reduces, and scalars (softmax max/sum over vocab shards, grad norm, finiteness). Weights are
  never gathered: no all-gather or reduce-scatter at all.
  """
  cfg, setup = _setup(dict(tensor=4), ["--config.model.n_layers=1"])
  abstract_batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _batch(0, 1))
  hlo = make_train_step(setup, cfg, BATCH).lower(setup.abstract_state, abstract_batch).compile().as_text()
  ops = re.findall(r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(.*?"
                   r'op_name="([^"]*)"', hlo)
  assert {kind for _, kind, _ in ops} == {"all-reduce"}
  in_layer = [name for _, _, name in ops if "while/body" in name]  # the scanned layer
  forward = [n for n in in_layer if "transpose(" not in n]
  backward = [n for n in in_layer if "transpose(" in n]
  assert len(forward) == 2 and any("btnh,nhd->btd" in n for n in forward), forward  # wo + MLP out
  assert len(backward) == 2 and any("btd,dnh->btnh" in n for n in backward), backward  # q/k/v + MLP in
  btd = f"f32[{BATCH[0]},{BATCH[1]},{setup.model_cfg.d_model}]"
  activations = [t for t, _, name in ops if "while/body" not in name and t.startswith(btd)]
  assert len(activations) == 2  # embedding gather (fwd) and logits → hidden (bwd)


# ------------------------------------------------------------------ pipeline schedule and errors

def test_bubble_fraction():
  assert pipeline.bubble_fraction(1, 8) == 0.0
  assert pipeline.bubble_fraction(2, 4) == pytest.approx(1 / 5)
  assert pipeline.bubble_fraction(4, 4) == pytest.approx(3 / 7)
  assert pipeline.bubble_fraction(4, 16) == pytest.approx(3 / 19)


@pytest.mark.parametrize("mesh, overrides, message", [
    (dict(stage=4, data=2), ["--config.model.n_layers=2"], "mesh.stage=4 does not divide model.n_layers=2"),
    (dict(stage=2), ["--config.model.scan_layers=false"], "needs model.scan_layers=true"),
    (dict(stage=2), ["--config.train.microbatches=3"], "microbatches=3 does not divide the 16 rows"),
    (dict(data=2), ["--config.train.microbatches=4"], "needs mesh.stage > 1"),
])
def test_pipeline_config_errors(mesh, overrides, message):
  cfg = _config(mesh, ["--config.train.batch_size=16", *overrides])
  with pytest.raises(ConfigError, match=re.escape(message)):
    make_setup(cfg, model_config(cfg), sharding.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(
        [cfg.mesh[a] for a in sharding.MESH_AXES]))]))


def test_host_offload_refused_on_a_backend_without_pinned_host():
  class Memory:
    def __init__(self, kind):
      self.kind = kind

  class Device:
    platform = "fake"
    def addressable_memories(self):
      return [Memory("device")]

  with pytest.raises(ConfigError, match=r"optim.offload=true needs 'pinned_host' memory, which fake "
                                        r"devices do not offer \(they have \['device'\]\)"):
    check_memory_kind(Device(), HOST, "optim.offload=true")
  check_memory_kind(jax.devices()[0], "device", "x")  # every backend has device memory


def test_remat_offload_policy_moves_saved_activations_to_host():
  from flax import nnx

  from model.transformer import Transformer
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, remat="offload",
                    compute_dtype="float32")
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens = np.zeros((2, 8), np.int32)
  loss = lambda p: nnx.merge(graphdef, p)(tokens).sum()
  # The policy's residuals are device_put to host memory (`<host>` avals) and back for the backward.
  assert "<host>" in str(jax.make_jaxpr(jax.grad(loss))(params))
