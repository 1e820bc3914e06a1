"""Multi-host training on one machine: two local processes (jax.distributed on localhost, gloo CPU
collectives, 4 fake CPU devices each) train, checkpoint and resume, and match one process with 8 devices.

Also: how `train.distributed` decides to start (explicit / SLURM / none), which batch rows each host
feeds, and the launch templates in `launch/` parse.
"""
import collections
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, require, shared_data
from train import distributed
from train.config import ConfigError, parse_args
from train.metrics import read_metrics

# data×fsdp×tensor = 2×2×2 over 2 processes × 4 devices: `data` crosses the processes (gradients are
# all-reduced over gloo), fsdp and tensor shard params inside each process; the batch splits into 2
# parts, one per process.
MESH = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  src = shared_data() / "text" / "tinyshakespeare.txt"
  require(src.exists(), f"missing {src}")
  out = tmp_path_factory.mktemp("corpus")
  paragraphs = [p for p in src.read_text().split("\n\n") if p.strip()][:2000]  # ~1/4: quick tokenizer
  with open(out / "shakespeare.jsonl", "w") as f:
    for i, p in enumerate(paragraphs):
      f.write(json.dumps({"id": f"p{i}", "text": p}) + "\n")
  return out / "shakespeare.jsonl"


def _args(run_dir, corpus, cache):
  return ["--config=configs/lm.py:tiny,smoke", f"--config.data.sources=text={corpus}",
          f"--config.run.dir={run_dir}", f"--config.data.cache_dir={cache}", "--config.train.progress=false",
          "--config.checkpoint.async_save=false", f"--config.train.steps={STEPS}", "--config.checkpoint.every=3",
          "--config.checkpoint.keep=10", "--config.train.log_every=1", f"--config.train.eval_every={STEPS}",
          "--config.sample.max_new_tokens=0", *MESH]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(run_dir) -> dict:
  return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


def _val_loss(run_dir) -> float:
  return next(r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r)


def _two_processes(args) -> None:
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-m", "train", *args, f"--config.dist.coordinator=127.0.0.1:{port}",
                             "--config.dist.num_processes=2", f"--config.dist.process_id={i}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"


def _as_two_hosts(train_iterator):
  """The loop's `train_iterator`, but one process feeds the two parts two hosts would feed, in order."""
  def make(manifest, *, batch_size, process_index, process_count, **kw):
    assert (process_index, process_count) == (0, 1)
    parts = [train_iterator(manifest, batch_size=batch_size // 2, process_index=i, process_count=2, **kw)
             for i in range(2)]
    return ({k: np.concatenate([b[k] for b in bs]) for k in bs[0]} for bs in zip(*parts))
  return make


def test_two_processes_train_resume_and_match_one_process(tmp_path, corpus, monkeypatch):
  cache = tmp_path / "cache"
  # Reference: this process, 8 devices, the same mesh, fed the same rows as the two hosts.
  from train import loop
  monkeypatch.setattr(loop, "train_iterator", _as_two_hosts(loop.train_iterator))
  cfg, _ = parse_args(_args(tmp_path / "ref", corpus, cache) + ["--config.checkpoint.every=0"])
  loop.run(cfg)
  ref = _losses(tmp_path / "ref")

  run_dir = tmp_path / "two"
  _two_processes(_args(run_dir, corpus, cache))
  first, first_val = _losses(run_dir), _val_loss(run_dir)
  cfg_json = json.loads((run_dir / "config.json").read_text())
  assert cfg_json["provenance"]["process_count"] == 2 and len(cfg_json["provenance"]["devices"]) == 8
  assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [3, 6]
  # Grain's iterator state is saved per process.
  assert len(list((run_dir / "checkpoints" / "3" / "data").glob("process_*"))) == 2

  # Killed after step 3: the second invocation restores step 3 (params, optimizer, both hosts' data
  # iterators) and replays steps 4-6 as before.
  shutil.rmtree(run_dir / "checkpoints" / "6")
  # This time with samples in the report: the sampler runs on every process (params span both).
  _two_processes(_args(run_dir, corpus, cache) + ["--config.sample.max_new_tokens=4"])
  resumed = _losses(run_dir)
  assert sorted(resumed) == list(range(1, STEPS + 1))  # rows past step 3 replaced, none duplicated
  assert "## Samples" in (run_dir / "report.md").read_text()

  for step in range(1, STEPS + 1):
    np.testing.assert_allclose(first[step]["loss"], ref[step]["loss"], rtol=1e-5, err_msg=f"step {step}")
    np.testing.assert_allclose(first[step]["grad_norm"], ref[step]["grad_norm"], rtol=1e-5)
  for step in range(4, STEPS + 1):
    np.testing.assert_allclose(resumed[step]["loss"], first[step]["loss"], rtol=1e-6, err_msg=f"step {step}")
  np.testing.assert_allclose(first_val, _val_loss(tmp_path / "ref"), rtol=1e-5)
  assert first[STEPS]["loss"] < first[1]["loss"]


# ------------------------------------------------------------------ start-up decisions

_CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                 "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX",
                 "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "JAX_COORDINATOR_PORT", *distributed.ENV.values())


@pytest.fixture
def clean_env(monkeypatch):
  for k in _CLUSTER_VARS:
    monkeypatch.delenv(k, raising=False)
  return monkeypatch


def _dist(**kw):
  cfg, _ = parse_args([f"--config.dist.{k}={v}" for k, v in kw.items()])
  return cfg.dist


def test_single_process_is_a_no_op(clean_env):
  assert distributed.plan(_dist()) == distributed.Plan(None)
  assert distributed.initialize(_dist()).cluster is None  # does not start jax.distributed


def test_slurm_is_detected_by_jax(clean_env):
  for k, v in dict(SLURM_JOB_ID="1234", SLURM_STEP_NODELIST="gpu[007-010],gpu020", SLURM_NTASKS="32",
                   SLURM_PROCID="9", SLURM_LOCALID="1").items():
    clean_env.setenv(k, v)
  assert distributed.plan(_dist()) == distributed.Plan("slurm", num_processes=32, process_id=9)
  from jax._src.clusters import SlurmCluster
  # JAX's own address: the step's first node, port 61440 + job id mod 4096.
  assert SlurmCluster.get_coordinator_address(None, None) == f"gpu007:{61440 + 1234 % 4096}"
  assert distributed.plan(_dist(cluster="none")) == distributed.Plan(None)
  clean_env.setenv("SLURM_NTASKS", "1")  # a one-task allocation: nothing to start
  assert distributed.plan(_dist()) == distributed.Plan(None)


def test_explicit_settings_from_config_or_env(clean_env):
  assert distributed.plan(_dist(coordinator="10.0.0.1:1234", num_processes=4, process_id=3)) == \
      distributed.Plan("explicit", "10.0.0.1:1234", 4, 3)
  clean_env.setenv("JAXLM_COORDINATOR", "host0:999")
  clean_env.setenv("JAXLM_NUM_PROCESSES", "2")
  clean_env.setenv("JAXLM_PROCESS_ID", "1")
  assert distributed.plan(_dist()) == distributed.Plan("explicit", "host0:999", 2, 1)
  assert distributed.plan(_dist(process_id=0)).process_id == 0  # config wins over env


@pytest.mark.parametrize("kw, match", [
    (dict(coordinator="nohostport", num_processes=2, process_id=0), "host:port"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), "process_id=2"),
    (dict(num_processes=2, process_id=1), "without dist.coordinator"),
    (dict(cluster="slurmm"), "dist.cluster='slurmm'"),
    (dict(cluster="slurm"), "not present"),
])
def test_bad_settings_are_one_clear_error(clean_env, kw, match):
  with pytest.raises(ConfigError, match=re.escape(match)):
    distributed.plan(_dist(**kw))


def test_cli_reports_a_bad_coordinator_in_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "train", "--config=configs/lm.py:tiny,smoke",
                        f"--config.run.dir={tmp_path / 'r'}", "--config.dist.coordinator=h:1",
                        "--config.dist.num_processes=2", "--config.dist.process_id=5"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stderr.startswith("error: dist.process_id=5")
  assert "Traceback" not in out.stderr and not (tmp_path / "r").exists()


# ------------------------------------------------------------------ which rows each host feeds

_Device = collections.namedtuple("_Device", "id process_index")


class _FakeSharding:
  """`devices_indices_map` of a batch over 8 devices of 2 hosts with a given row layout."""

  def __init__(self, rows_of_device):  # device -> (start, stop) rows
    self.rows = rows_of_device

  def devices_indices_map(self, shape):
    return {_Device(d, d // 4): (slice(a, b), slice(None))
            for d, (a, b) in self.rows.items()}


@pytest.mark.parametrize("layout, parts", [
    ({d: (d, d + 1) for d in range(8)}, {0: (0, 2), 1: (1, 2)}),                  # data=8
    ({d: (d % 4 * 2, d % 4 * 2 + 2) for d in range(8)}, {0: (0, 1), 1: (0, 1)}),   # tensor=2 across hosts
    ({d: ((d % 2) * 4 + (d // 4) * 2, (d % 2) * 4 + (d // 4) * 2 + 2) for d in range(8)},
     {0: (0, 2), 1: (1, 2)}),                                                     # rows interleaved
])
def test_batch_shard_gives_each_host_its_rows(monkeypatch, layout, parts):
  import jax
  for process, expected in parts.items():
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    assert distributed.batch_shard(_FakeSharding(layout), (8, 16)) == expected


def test_batch_shard_rejects_unequal_parts(monkeypatch):
  import jax
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  layout = {d: (0, 6) if d < 4 else (6, 8) for d in range(8)}
  with pytest.raises(ConfigError, match="overlapping or unequal"):
    distributed.batch_shard(_FakeSharding(layout), (8, 16))


def test_batch_shard_on_a_real_mesh():
  """One process holds every row: one part, whatever the mesh."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from train import sharding
  cfg, _ = parse_args(list(MESH))
  mesh = sharding.make_mesh(cfg.mesh)
  assert distributed.batch_shard(sharding.batch_sharding((8, 64), mesh, sharding.RULES), (8, 64)) == (0, 1)
  assert distributed.batch_shard(NamedSharding(mesh, P()), (8, 64)) == (0, 1)
  assert jax.process_count() == 1


# ------------------------------------------------------------------ launch templates

def test_launch_templates_parse_and_run_train():
  tpu, slurm = REPO / "launch" / "tpu_pod.sh", REPO / "launch" / "slurm_gpu.sbatch"
  for path in (tpu, slurm):
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "python -m train" in path.read_text()
  text = slurm.read_text()
  sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
  assert {"nodes", "ntasks-per-node", "gpus-per-node", "time", "job-name"} <= set(sbatch), sbatch
  assert sbatch["ntasks-per-node"] == sbatch["gpus-per-node"]  # one process per GPU, as JAX assumes
  assert re.search(r"^srun .*python -m train", text, re.M)
  text = tpu.read_text()
  assert "--worker=all" in text and '.[tpu]' in text and "gcloud compute tpus tpu-vm ssh" in text
