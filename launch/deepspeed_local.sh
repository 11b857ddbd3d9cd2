#!/usr/bin/env bash
# N processes on this machine under the deepspeed launcher: bash launch/deepspeed_local.sh N CONFIG [key=value ...]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
[ $# -ge 2 ] || usage_exit "$0 NPROC CONFIG [key=value ...]"
nproc="$1"; shift
exec "$bin/deepspeed" --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" --module mmt.train "$@"
