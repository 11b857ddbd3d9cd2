#!/usr/bin/env bash
# Several nodes under torchrun with c10d rendezvous; run the same command on every node:
#   bash launch/torchrun_multinode.sh NNODES NPROC_PER_NODE RDZV_HOST:PORT CONFIG [key=value ...]
# RDZV_ID (default "mmt") must be the same on all nodes and differ between concurrent jobs.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
[ $# -ge 4 ] || usage_exit "$0 NNODES NPROC_PER_NODE RDZV_HOST:PORT CONFIG [key=value ...]"
nnodes="$1"; nproc="$2"; endpoint="$3"; shift 3
exec "$bin/torchrun" --nnodes "$nnodes" --nproc_per_node "$nproc" --rdzv_backend c10d \
    --rdzv_endpoint "$endpoint" --rdzv_id "${RDZV_ID:-mmt}" -m mmt.train "$@"
