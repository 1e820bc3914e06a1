#!/usr/bin/env bash
# Train on a Cloud TPU pod slice (v4/v5e/v5p/v6e, any number of hosts): run from your workstation.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a RUN_DIR=/mnt/shared/runs/1b \
#     launch/tpu_pod.sh --config=configs/lm.py:1b --config.train.steps=20000
#
# It sends one command to every worker (`gcloud compute tpus tpu-vm ssh --worker=all`): clone or update
# the repo at $REF, `pip install -e ".[tpu]"`, then `python -m train` with the arguments given here.
# Every worker runs one process that owns its 4 (v4/v5p) or 8 (v5e/v6e) chips; `jax.distributed`
# needs no settings on a pod: JAX reads the worker list and this worker's id from the TPU VM's
# metadata (train/distributed.py). Each host feeds only its rows of the global batch.
#
# RUN_DIR (checkpoints from every host, metrics/config/report from host 0) and JAXLM_CACHE (tokenizer
# and token shards, built by host 0 first) must be one filesystem all workers mount at the same
# path: Filestore NFS or a gcsfuse mount. A local path works on a one-host slice only.
#
# Optional: PROJECT (default: gcloud's), REPO_URL/REF (default: this checkout's origin and commit),
# DETACH=1 (run under nohup with a log per worker in ~/jaxlm-train.log, so a dropped ssh session does
# not kill the run; watch it with `tail -f $RUN_DIR/metrics.jsonl`), EXTRA_PIP (extra packages).
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME to the TPU VM name}
ZONE=${ZONE:?set ZONE, e.g. us-east5-a}
RUN_DIR=${RUN_DIR:?set RUN_DIR to a path on a filesystem every worker mounts}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}
HERE=$(cd "$(dirname "$0")/.." && pwd)
REPO_URL=${REPO_URL:-$(git -C "$HERE" remote get-url origin)}
REF=${REF:-$(git -C "$HERE" rev-parse HEAD)}
JAXLM_CACHE=${JAXLM_CACHE:-$(dirname "$RUN_DIR")/cache}
DETACH=${DETACH:-0}
EXTRA_PIP=${EXTRA_PIP:-}

# Arguments of `python -m train`, quoted for the remote shell.
TRAIN_ARGS=$(printf ' %q' "$@" "--config.run.dir=$RUN_DIR")

read -r -d '' WORKER_CMD <<CMD || true
set -euo pipefail
if [ ! -d ~/jaxlm/.git ]; then git clone -q $(printf %q "$REPO_URL") ~/jaxlm; fi
cd ~/jaxlm && git fetch -q origin && git checkout -q $(printf %q "$REF")
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q -U pip && pip install -q -e ".[tpu]" $EXTRA_PIP
export JAXLM_CACHE=$(printf %q "$JAXLM_CACHE")
if [ "$DETACH" = 1 ]; then
  nohup python -m train$TRAIN_ARGS > ~/jaxlm-train.log 2>&1 &
  echo "worker \$(hostname): training in the background, log ~/jaxlm-train.log"
else
  python -m train$TRAIN_ARGS
fi
CMD

exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all \
  --command="$WORKER_CMD"
