#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM slice: one JAX process per host.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_vm.sh \
#       recsys train --config configs/quickstart.py --workdir /mnt/shared/runs/r1
#   DRY_RUN=1 TPU_NAME=... ZONE=... launch/tpu_vm.sh recsys ...   # print the command, run nothing
#
# Needs the checkout and its virtualenv at the same path on every worker (REPO_DIR, default
# ~/recsys; VENV, default .venv inside it) and a --workdir every worker can write (a shared
# filesystem: Filestore/NFS or a GCS FUSE mount). RECSYS_DISTRIBUTED=auto makes recsys call
# jax.distributed.initialize(), which reads the slice's workers from the TPU VM metadata.
# Optional: PROJECT (gcloud --project).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM slice name}"
: "${ZONE:?set ZONE to the slice zone}"
if [ "$#" -eq 0 ]; then
  echo "usage: TPU_NAME=... ZONE=... $0 recsys <command> [args...]" >&2
  exit 2
fi
REPO_DIR="${REPO_DIR:-~/recsys}"  # left unexpanded: each worker expands its own ~
VENV="${VENV:-.venv}"

printf -v user_command '%q ' "$@"
remote="cd ${REPO_DIR} && source ${VENV}/bin/activate && RECSYS_DISTRIBUTED=auto ${user_command% }"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$remote")
if [ -n "${PROJECT:-}" ]; then
  cmd+=(--project="$PROJECT")
fi

if [ -n "${DRY_RUN:-}" ]; then
  printf -v line '%q ' "${cmd[@]}"
  echo "${line% }"
else
  exec "${cmd[@]}"
fi
