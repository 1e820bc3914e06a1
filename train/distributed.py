"""Multi-host start-up (`jax.distributed.initialize`) and which rows of the global batch this host feeds.

Library module; `python -m train` and the `align.*` stages call `initialize(cfg.dist)` before JAX
touches a device. How the processes find each other, first match wins:

1. Explicit: `--config.dist.coordinator=host:port --config.dist.num_processes=N --config.dist.process_id=i`
   (or env `JAXLM_COORDINATOR`, `JAXLM_NUM_PROCESSES`, `JAXLM_PROCESS_ID`; config wins over env). Start
   the same command on every host, each with its own process id; process 0 serves the coordinator
   on `host:port`. A coordinator with the count or id left unset takes them from the cluster below.
2. Detected by JAX itself (`jax._src.clusters`; we call `jax.distributed.initialize()` with no
   arguments, or with `cluster_detection_method=dist.cluster` when one is named):
   - `gcetpu`: a Cloud TPU VM pod slice (GCE metadata `agent-worker-number`, `worker-network-endpoints`;
     multislice via `MEGASCALE_NUM_SLICES` / `MEGASCALE_SLICE_ID`),
   - `gketpu`: TPUs on GKE (`TPU_WORKER_HOSTNAMES` or `TPU_PROCESS_ADDRESSES`, `TPU_WORKER_ID`),
   - `slurm`: inside `srun` (`SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_NTASKS`, `SLURM_PROCID`,
     `SLURM_LOCALID`): coordinator = first node of the step's node list, port 61440 + job id mod 4096
     (`JAX_COORDINATOR_PORT` overrides), process id = `SLURM_PROCID`, count = `SLURM_NTASKS`, and each
     process sees only GPU `SLURM_LOCALID` (so: one process per GPU, see launch/slurm_gpu.sbatch),
   - `ompi`: `mpirun` of Open MPI (`OMPI_MCA_orte_hnp_uri`, `OMPI_COMM_WORLD_*`),
   - `k8s`: an indexed Kubernetes Job or JobSet (`KUBERNETES_SERVICE_HOST` + `JOB_COMPLETION_INDEX`; needs
     the `kubernetes` package, `pip install jax[k8s]`, and a service account that may read pods),
   - `mpi4py`: only when named (`--config.dist.cluster=mpi4py`), as JAX treats it as opt-in.
3. Otherwise, or when the detected cluster has a single process: nothing to do (one process owns
   all local devices). `--config.dist.cluster=none` turns detection off.

On CPU, cross-process collectives use gloo (`jax_cpu_collectives_implementation`), so two local
processes can share one mesh (tests/test_multihost.py); `$JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi`
keeps MPI instead.

Data: each process reads only the rows of the global batch that its devices hold
(`batch_shard`), and `jax.make_array_from_process_local_data` assembles the global array. Processes
whose devices hold the same rows (a batch replicated over `tensor` across hosts) get the same shard
index and so feed identical data, as that function requires.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Sharding

from configs.loader import ConfigError

ENV = dict(coordinator="JAXLM_COORDINATOR", num_processes="JAXLM_NUM_PROCESSES", process_id="JAXLM_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` will do: `cluster` is "explicit", a JAX cluster name, or None (single process)."""
  cluster: str | None
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def _cluster_types() -> dict:
  from jax._src import clusters  # JAX's own detectors; private, but the only list of them there is.
  return {c.name: c for c in clusters.ClusterEnv._cluster_types if c.name}


def _present(env_cls, environ: Mapping[str, str]) -> bool:
  if env_cls.name == "k8s" and "JOB_COMPLETION_INDEX" not in environ:
    # Every pod has KUBERNETES_SERVICE_HOST; only an indexed Job can be a multi-process launch, and
    # asking the API server about any other pod (a notebook, a dev box) would fail or hang.
    return False
  try:
    return bool(env_cls.is_env_present())
  except Exception:  # a detector that can't even look (no metadata server, no kubernetes package).
    return False


def plan(dist=None, environ: Mapping[str, str] | None = None) -> Plan:
  """Decides how to start (see module docstring) without starting anything; pure but for detection."""
  environ = os.environ if environ is None else environ
  get = (lambda k, d: dist.get(k, d)) if dist is not None else (lambda k, d: d)
  coordinator = get("coordinator", "") or environ.get(ENV["coordinator"], "")
  try:
    num = int(get("num_processes", 0) or environ.get(ENV["num_processes"], 0) or 0)
    pid = get("process_id", -1)
    pid = int(environ.get(ENV["process_id"], -1)) if pid is None or pid < 0 else int(pid)
  except ValueError as e:
    raise ConfigError(f"dist: {ENV['num_processes']} / {ENV['process_id']} must be integers ({e})") from None
  cluster = get("cluster", "auto") or "auto"
  types = _cluster_types()
  if cluster not in ("auto", "none") and cluster not in types:
    raise ConfigError(f"dist.cluster={cluster!r}: expected auto, none or one of {sorted(types)}")

  if coordinator:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise ConfigError(f"dist.coordinator={coordinator!r}: expected host:port")
    if num and not 0 <= pid < num:
      raise ConfigError(f"dist.process_id={pid} is not in [0, dist.num_processes={num})")
    if num == 1:
      return Plan(None)
    return Plan("explicit", coordinator, num or None, pid if pid >= 0 else None)
  if num > 1 or pid >= 0:
    raise ConfigError(f"dist.num_processes/process_id given without dist.coordinator (or "
                      f"${ENV['coordinator']}): every process must know process 0's host:port")
  if cluster == "none":
    return Plan(None)
  if cluster == "auto":
    found = next((c for c in types.values() if not c.opt_in_only_method and _present(c, environ)), None)
  else:
    found = types[cluster] if _present(types[cluster], environ) else None
    if found is None:
      raise ConfigError(f"dist.cluster={cluster}: that environment is not present on this machine")
  if found is None:
    return Plan(None)
  count = found.get_process_count()
  if count <= 1:
    return Plan(None)
  return Plan(found.name, num_processes=count, process_id=found.get_process_id())


def initialize(dist=None) -> Plan:
  """Starts `jax.distributed` as `plan` decides; a no-op for one process or when already started."""
  if jax.distributed.is_initialized():
    return Plan("already", num_processes=jax.process_count(), process_id=jax.process_index())
  p = plan(dist)
  if p.cluster is None:
    return p
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    # Gloo over TCP: the CPU backend's collectives between processes (GPU/TPU use NCCL/ICI).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if p.cluster == "explicit":
      # Fully explicit: keep JAX's detection from also restricting local devices (it would on SLURM).
      method = "deactivate" if None not in (p.num_processes, p.process_id) else None
      jax.distributed.initialize(p.coordinator, p.num_processes, p.process_id,
                                 cluster_detection_method=method)
    elif (dist.get("cluster", "auto") if dist is not None else "auto") == "auto":
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(cluster_detection_method=p.cluster)
  except (ValueError, RuntimeError) as e:
    raise ConfigError(f"jax.distributed.initialize ({p.cluster}) failed: {e}") from None
  if jax.process_index() == 0:
    print(f"distributed: {jax.process_count()} processes ({p.cluster}), {jax.device_count()} devices",
          file=sys.stderr)
  return p


def batch_shard(sharding: Sharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
  """(index, count): this process feeds rows `index` of `count` equal, disjoint parts of the batch.

  Parts are numbered by their first row. Raises ConfigError when the processes' rows don't split the
  batch into equal disjoint parts (an exotic device order no loader could feed).
  """
  rows: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
    start, stop, _ = index[0].indices(global_shape[0])
    rows.setdefault(device.process_index, set()).update(range(start, stop))
  parts = sorted({tuple(sorted(r)) for r in rows.values()})
  flat = sorted(i for p in parts for i in p)
  if flat != list(range(global_shape[0])) or len({len(p) for p in parts}) != 1:
    raise ConfigError(f"the batch sharding {sharding} gives processes overlapping or unequal rows "
                      f"of the {global_shape[0]}-row batch; change the mesh")
  return parts.index(tuple(sorted(rows[jax.process_index()]))), len(parts)


def global_batch(local: dict[str, np.ndarray], sharding: Sharding, global_shape: tuple[int, ...]) -> dict:
  """This process's rows (see `batch_shard`) → global `jax.Array`s of `global_shape`."""
  return {k: jax.make_array_from_process_local_data(sharding, v, global_shape) for k, v in local.items()}


def barrier(name: str) -> None:
  """All processes wait here (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
