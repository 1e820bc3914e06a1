"""`python -m train.plan`: exact per-device state bytes, FLOPs from train/flops.py, compiled memory, errors."""
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO, require
from model.params import count_params
from train import flops as flops_lib
from train import plan as plan_lib
from train.config import ConfigError, model_config, parse_args

# optax state scalars of the project's AdamW (train/optim.py): scale_by_adam's count and the schedule's
# count (int32 each), apply_if_finite's notfinite_count and total_notfinite (int32) and last_finite (bool).
OPT_SCALAR_BYTES = 4 + 4 + 4 + 4 + 1


def _plan(preset, *overrides, **kw):
  cfg, _ = parse_args([f"--config=configs/lm.py:{preset}", *overrides])
  groups = plan_lib.plan(cfg, **kw)
  return {g["plan"]: g for g in groups}, cfg


def test_state_bytes_per_device_are_exact_on_two_meshes():
  # tiny,smoke: d=64, 2 layers, vocab 512 (from data.vocab_size), fp32 params.
  g, cfg = _plan("tiny,smoke", "--config.mesh.data=8", devices=8, compile_step=False)
  mc = model_config(cfg)
  n = count_params(mc)["total"]
  mem = g["memory"]
  assert mem["mesh"]["data"] == 8
  # Data parallel: every device holds everything; AdamW keeps two fp32 moments per param.
  assert mem["params_bytes"] == 4 * n and mem["grads_bytes"] == 4 * n
  assert mem["opt_state_bytes"] == 8 * n + OPT_SCALAR_BYTES
  assert mem["other_state_bytes"] == 4 + 8  # step int32, rng uint32[2]

  # fsdp=4 × tensor=2: every param has an `embed` axis (64 / 4); all but the RMSNorm scales also have a
  # vocab / heads / mlp axis split over tensor (512, 4 heads, 192 all / 2). Norms: 2 per layer + final.
  g, _ = _plan("tiny,smoke", "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2",
               devices=8, compile_step=False)
  norms = (2 * mc.n_layers + 1) * mc.d_model
  per_device = (n - norms) // 8 + norms // 4
  assert g["memory"]["params_bytes"] == 4 * per_device
  assert g["memory"]["opt_state_bytes"] == 8 * per_device + OPT_SCALAR_BYTES
  # grad_accum adds the accumulator.
  g, _ = _plan("tiny,smoke", "--config.train.grad_accum=2", devices=8, compile_step=False)
  assert g["memory"]["grads_bytes"] == 2 * 4 * n


def test_plans_a_mesh_larger_than_this_machine():
  """Llama-2-7B on 64 devices: all params have d_model=4096 on fsdp=64 (the 7b preset's layout)."""
  g, cfg = _plan("7b", devices=64, device_kind="v5p", compile_step=False)
  n = count_params(model_config(cfg))["total"]
  assert n == 6_738_415_616
  assert g["memory"]["mesh"]["fsdp"] == 64
  assert g["memory"]["params_bytes"] == 4 * n // 64
  assert g["verdict"]["device_kind"] == "TPU v5p" and g["verdict"]["device_memory_gb"] == 95
  assert g["verdict"]["source"] == "estimate" and g["verdict"]["fits"] is True


def test_flops_come_from_train_flops():
  g, cfg = _plan("125m", "--config.train.batch_size=16", devices=8, device_kind="H100", compile_step=False)
  mc = model_config(cfg)
  fpt = flops_lib.flops_per_token(mc, cfg.data.seq_len)
  fl = g["flops"]
  assert fl["flops_per_token"] == fpt and fl["tokens_per_step"] == 16 * 2048
  assert fl["flops_per_step"] == fpt * 16 * 2048
  assert fl["chinchilla_flops_per_token"] == flops_lib.chinchilla_flops_per_token(mc, cfg.data.seq_len)
  assert fl["ideal_step_s"] == pytest.approx(fpt * 16 * 2048 / (8 * 989e12))


def test_activation_estimate_orders_remat_policies():
  act = {}
  for remat in ("none", "save_dots", "full"):
    g, _ = _plan("125m", f"--config.train.remat={remat}", devices=8, compile_step=False)
    act[remat] = g["memory"]["activations_bytes_est"]
    assert f"remat={remat}" in g["memory"]["activation_formula"]
  assert act["full"] < act["save_dots"] < act["none"]
  g2, _ = _plan("125m", "--config.train.remat=none", "--config.train.grad_accum=4", devices=8,
                compile_step=False)
  assert g2["memory"]["activations_bytes_est"] < act["none"] / 3  # a quarter of the micro-batch


def test_compiled_memory_of_the_smoke_preset():
  g, _ = _plan("tiny,smoke", devices=8)
  c, mem = g["compiled"], g["memory"]
  assert "error" not in c and c["target"].startswith("cpu x8")
  state = mem["params_bytes"] + mem["opt_state_bytes"] + mem["other_state_bytes"]
  # The step's arguments are the state and the batch, as the exact count says; the state is donated.
  assert c["argument_bytes"] == pytest.approx(state + mem["batch_bytes"], abs=8)
  assert c["alias_bytes"] == pytest.approx(state, rel=0.01)
  assert c["temp_bytes"] > 0 and c["peak_bytes"] > c["argument_bytes"]
  assert g["verdict"]["source"] == "compiled" and g["verdict"]["fits"] is None  # CPU memory unknown


def test_tpu_topology_compiles_ahead_of_time():
  require(importlib.util.find_spec("libtpu") is not None, "libtpu not installed (pip install -e '.[tpu]')")
  g, _ = _plan("tiny,smoke", "--config.mesh.data=1", "--config.mesh.fsdp=4", topology="v5e:2x2")
  c = g["compiled"]
  assert "error" not in c, c
  assert c["target"].startswith("TPU v5 lite x4")
  state = g["memory"]["params_bytes"] + g["memory"]["opt_state_bytes"]
  assert c["argument_bytes"] >= state
  assert g["verdict"]["source"] == "compiled" and g["verdict"]["fits"] is True


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "train.plan", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120)


def test_cli_prints_json_lines_and_a_table():
  out = _cli("--config=configs/lm.py:350m", "--devices=16", "--device_kind=v5e", "--no_compile")
  assert out.returncode == 0, out.stderr
  groups = [json.loads(line) for line in out.stdout.splitlines()]
  assert [g["plan"] for g in groups] == ["memory", "flops", "verdict"]
  assert "verdict:" in out.stderr and "optimizer state" in out.stderr


@pytest.mark.parametrize("args, match", [
    (("--config=configs/lm.py:tiny,smoke", "--config.mesh.fsdp=3", "--devices=8"), "not divisible"),
    (("--config=configs/lm.py:tiny,smoke", "--config.mesh.fsdpp=2"), "mesh.fsdpp"),
    (("--config=configs/lm.py:tiny,smoke", "--devices=0"), "--devices"),
    (("--config=configs/lm.py:tiny,smoke", "--bogus"), "--bogus"),
])
def test_bad_input_is_one_error_line_and_exit_2(args, match):
  out = _cli(*args)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], out.stderr


def test_device_memory_table():
  assert plan_lib.device_memory_gb("NVIDIA H100 80GB HBM3") == 80
  assert plan_lib.device_memory_gb("H200") == 141
  assert plan_lib.device_memory_gb("TPU v5 lite") == 16 and plan_lib.device_memory_gb("v5e") == 16
  assert plan_lib.device_memory_gb("TPU v5") == 95 and plan_lib.device_memory_gb("v5p") == 95
  assert plan_lib.device_memory_gb("v6e") == 32 and plan_lib.device_memory_gb("cpu") is None
  with pytest.raises(ConfigError, match="devices"):
    plan_lib.plan(parse_args(["--config=configs/lm.py:tiny,smoke", "--config.mesh.data=3"])[0],
                  devices=8, compile_step=False)


# ------------------------------------------------------------------ python -m train.bench --mesh

def test_bench_compares_mesh_layouts():
  out = subprocess.run([sys.executable, "-m", "train.bench", "--config=configs/lm.py:tiny,smoke", "--steps=2",
                        "--warmup=0", "--mesh=data=8; data=2,fsdp=-1"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(line) for line in out.stdout.splitlines()]
  assert [(r["mesh"]["data"], r["mesh"]["fsdp"]) for r in rows] == [(8, 1), (2, 4)]
  assert rows[0]["relative_throughput"] == 1.0
  assert rows[1]["relative_throughput"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"],
                                                         rel=1e-2)
  assert all(r["tokens_per_s"] > 0 and "'fsdp'" in r["setup"] for r in rows)


@pytest.mark.parametrize("mesh, match", [("fsdpp=2", "fsdpp=2"), ("data=3", "needs 3 devices")])
def test_bench_rejects_bad_layouts(mesh, match):
  out = subprocess.run([sys.executable, "-m", "train.bench", "--config=configs/lm.py:tiny,smoke",
                        f"--mesh={mesh}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stderr.startswith("error: --mesh") and match in out.stderr, out.stderr
