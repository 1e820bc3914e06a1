"""Training core without the data pipeline: configs, sharding rules, meshes, step, optimizer, FLOPs, sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P
from ml_collections import ConfigDict

from conftest import packed_batch, train_on_mesh
from configs.lm import SIZES, get_config
from model.config import ModelConfig
from model.params import count_params
from train import flops, sharding
from train.config import ConfigError, load_preset, model_config, parse_args, resolve
from train.optim import SCHEDULES, decay_mask
from train.sample import filter_logits
from train.state import init_state, make_setup
from train.step import cross_entropy, make_train_step


# ------------------------------------------------------------------ configs

def test_unknown_config_key_is_an_error_naming_it():
  with pytest.raises(ConfigError, match="optim.peak_lrr"):
    parse_args(["--config.optim.peak_lrr=1e-3"])
  with pytest.raises(ConfigError, match="unknown config key: optm"):
    parse_args(["--config.optm.peak_lr=1e-3"])


def test_wrong_type_is_an_error_naming_the_key():
  with pytest.raises(ConfigError, match="train.steps"):
    parse_args(["--config.train.steps=many"])
  with pytest.raises(ConfigError, match="train.progress"):
    parse_args(["--config.train.progress=maybe"])


def test_overrides_parse_by_type():
  cfg, rest = parse_args(["--config=configs/lm.py:tiny", "--config.optim.peak_lr=1e-3",
                          "--config.train.steps=7", "--config.model.qk_norm=true",
                          "--config.optim.peak_lr=2", "--config.mesh.rules=(('mlp', None),)",
                          "--config.sample.prompts=('a', 'b')", "--other"])
  assert cfg.optim.peak_lr == 2.0 and isinstance(cfg.optim.peak_lr, float)
  assert cfg.train.steps == 7 and cfg.model.qk_norm is True
  assert cfg.mesh.rules == (("mlp", None),) and cfg.sample.prompts == ("a", "b")
  assert rest == ["--other"]


def test_missing_config_file_and_bad_preset():
  with pytest.raises(ConfigError, match="not found"):
    load_preset("configs/nope.py:tiny")
  with pytest.raises(ConfigError, match="unknown preset"):
    load_preset("configs/lm.py:tiny,huge")


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_preset_and_its_smoke_variant_resolve(size):
  for arg in (size, f"{size},smoke"):
    cfg = get_config(arg)
    resolve(cfg, 4000)
    mc = model_config(cfg)
    assert mc.vocab_size >= 4000 and mc.hd * mc.n_heads > 0
    assert cfg.data.seq_len <= mc.max_seq_len


def test_seq_len_beyond_model_max_is_an_error():
  cfg, _ = parse_args(["--config.data.seq_len=4096", "--config.model.max_seq_len=1024"])
  with pytest.raises(ConfigError, match="seq_len"):
    resolve(cfg, 1000)


def test_tokenizer_bigger_than_model_vocab_is_an_error():
  cfg, _ = parse_args(["--config.model.vocab_size=256"])
  with pytest.raises(ConfigError, match="vocab"):
    resolve(cfg, 1000)


# ------------------------------------------------------------------ sharding rules

def _mesh(data, fsdp, tensor):
  devs = np.asarray(jax.devices()[:data * fsdp * tensor]).reshape(data, 1, fsdp, 1, 1, tensor)
  return Mesh(devs, sharding.MESH_AXES)


def test_rules_use_each_mesh_axis_once_and_replicate_indivisible_dims():
  mesh = _mesh(2, 2, 2)
  rules = sharding.RULES
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh, rules) == P("fsdp", "tensor")
  # Activation: batch takes data+fsdp, so embed (also → fsdp) stays replicated.
  assert sharding.logical_to_spec(("batch", "length", "embed"), (8, 16, 64), mesh, rules) == \
      P(("data", "fsdp"), None, None)
  # One KV head can't be split over tensor=2: replicated rather than an error.
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh, rules) == \
      P("fsdp", None, None)
  override = (("mlp", None),) + rules
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh, override) == P("fsdp", None)


def test_make_mesh_fills_and_validates():
  cfg = ConfigDict(dict(data=-1, fsdp=2, tensor=1, rules=None))
  assert dict(sharding.make_mesh(cfg).shape) == {"data": 4, "stage": 1, "fsdp": 2, "expert": 1, "sequence": 1,
                                                 "tensor": 1}
  with pytest.raises(ValueError, match="needs"):
    sharding.make_mesh(ConfigDict(dict(data=3, fsdp=1, tensor=1, rules=None)))


# ------------------------------------------------------------------ step on meshes

_batch = packed_batch


def _smoke_state(n_devices: int):
  cfg, _ = parse_args(["--config=configs/lm.py:tiny,smoke"])
  cfg.mesh.data = n_devices
  resolve(cfg, 500)
  setup = make_setup(cfg, model_config(cfg), sharding.make_mesh(cfg.mesh, jax.devices()[:n_devices]))
  return cfg, setup, init_state(setup, 0)


def _train(mesh_shape, steps=3, overrides=()):
  run = train_on_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)), steps=steps, overrides=overrides)
  return run["losses"], run["params"], run["state"]


def test_same_loss_and_params_on_every_mesh():
  ref_losses, ref_params, _ = _train((1, 1, 1))
  for mesh in [(8, 1, 1), (2, 4, 1), (1, 2, 4)]:
    losses, params, state = _train(mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # And the layout really is sharded: the (1,2,4) MLP weight is split over fsdp and tensor.
  assert state["params"]["blocks"]["mlp"]["w_in"].sharding.spec == P(None, "fsdp", "tensor")


def test_grad_accumulation_equals_one_big_batch():
  a, pa, _ = _train((1, 1, 1))
  b, pb, _ = _train((1, 1, 1), overrides=["--config.train.grad_accum=4"])
  np.testing.assert_allclose(a, b, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_nonfinite_gradients_skip_the_update_and_are_counted():
  cfg, setup, state = _smoke_state(n_devices=1)
  fn = make_train_step(setup, cfg, (8, 32))
  bad = _batch(8, 32, 500, 0)
  bad["loss_mask"] = bad["loss_mask"] * np.float32(np.nan)
  before = jax.tree.map(np.asarray, state["params"])
  state, m = fn(state, bad)
  assert int(m["nonfinite"]) == 1 and int(m["nonfinite_total"]) == 1
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(x, np.asarray(y))
  state, m = fn(state, _batch(8, 32, 500, 1))
  assert int(m["nonfinite"]) == 0 and int(m["nonfinite_total"]) == 1


def test_cross_entropy_with_mask_and_z_loss():
  logits = jnp.asarray([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
  targets = jnp.asarray([[0, 2]])
  mask = jnp.asarray([[1.0, 0.0]])
  ce, z, n = cross_entropy(logits, targets, mask, 1e-2)
  log_z = np.log(np.exp(2) + 1 + np.exp(-1))
  assert float(ce) == pytest.approx(log_z - 2.0, rel=1e-6)
  assert float(z) == pytest.approx(1e-2 * log_z ** 2, rel=1e-6)
  assert float(n) == 1.0


# ------------------------------------------------------------------ optimizer

def test_schedules_warmup_peak_and_floor():
  o = get_config("tiny").optim
  o.unlock()
  o.update(dict(peak_lr=1.0, warmup_steps=10, final_lr_frac=0.1, decay_frac=0.2))
  cos = SCHEDULES["cosine"](o, 100)
  assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
  assert float(cos(100)) == pytest.approx(0.1) and float(cos(500)) == pytest.approx(0.1)
  assert float(cos(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-3)  # cosine midpoint
  wsd = SCHEDULES["wsd"](o, 100)
  assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(80)) == pytest.approx(1.0)
  assert float(wsd(90)) == pytest.approx(0.55, rel=1e-3) and float(wsd(100)) == pytest.approx(0.1)


def test_weight_decay_skips_norms_and_biases():
  axes = {"w": ("layers", "embed", "mlp"), "scale": ("layers", "embed"), "b": ("mlp",),
          "embed": ("vocab", "embed")}
  assert decay_mask(axes) == {"w": True, "scale": False, "b": False, "embed": True}


# ------------------------------------------------------------------ FLOPs

def test_flops_per_token_palm_formula_by_hand():
  cfg = ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=704)
  n = 4 * (4 * 256 * 256 + 3 * 256 * 704 + 2 * 256) + 256 + 4096 * 256  # tied head counts once
  assert count_params(cfg)["non_embedding"] == n
  assert flops.flops_per_token(cfg, 256) == 6 * n + 12 * 4 * 4 * 64 * 256
  untied = ModelConfig(vocab_size=100, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16,
                       tie_embeddings=False, activation="gelu")
  # embed excluded, head included: attn 8*8 + 2*8*4 + 8*8, mlp 2*8*16, norms 3*8, head 8*100
  assert count_params(untied)["non_embedding"] == 64 + 64 + 64 + 256 + 24 + 800
  assert flops.mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)
  assert flops.mfu(1000.0, 1e9, 2, None) is None


# ------------------------------------------------------------------ sampling filters

def test_top_k_and_top_p_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  k2 = np.asarray(filter_logits(logits, 2, 1.0))
  assert np.isfinite(k2[0, :2]).all() and (k2[0, 2:] < -1e30).all()
  p = np.asarray(filter_logits(logits, 0, 0.8))  # 0.5+0.2 < 0.8 → keep 3 tokens
  assert (p[0, :3] > -1e30).all() and (p[0, 3:] < -1e30).all()
  p = np.asarray(filter_logits(logits, 0, 0.3))  # the top token alone has mass ≥ 0.3
  assert (p[0, :1] > -1e30).all() and (p[0, 1:] < -1e30).all()


def test_eval_step_loss_equals_train_step_loss_on_the_same_batch():
  from train.step import make_eval_step
  cfg, setup, state = _smoke_state(n_devices=2)
  batch = _batch(8, 32, 500, 3)
  token_bytes = jnp.ones((setup.model_cfg.vocab_size,), jnp.int32)
  ce, nbytes, n = make_eval_step(setup, (8, 32))(state["params"], batch, token_bytes)
  _, m = make_train_step(setup, cfg, (8, 32))(state, batch)
  assert float(ce / n) == pytest.approx(float(m["loss"]), rel=1e-5)
  assert float(nbytes) == float(n) == batch["loss_mask"].sum()


def test_checkpoints_keep_last_k_plus_every_mth(tmp_path):
  from train.checkpoint import Checkpointer
  ccfg = ConfigDict(dict(every=1, keep=2, keep_every=4, async_save=True))
  ckpt = Checkpointer(tmp_path / "ckpt", ccfg)
  state = {"w": jnp.arange(4.0), "step": jnp.int32(0)}
  for step in range(1, 11):
    ckpt.save(step, {"w": state["w"] + step, "step": jnp.int32(step)}, None, {"note": step})
  ckpt.close()
  assert sorted(ckpt.all_steps()) == [4, 8, 9, 10]
  again = Checkpointer(tmp_path / "ckpt", ccfg)
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
  restored, meta = again.restore(None, abstract)
  assert meta == {"note": 10} and int(restored["step"]) == 10
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0) + 10)
  again.close()
