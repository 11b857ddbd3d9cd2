#!/usr/bin/env bash
# N processes on this machine under torchrun: bash launch/torchrun_local.sh N CONFIG [key=value ...]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
[ $# -ge 2 ] || usage_exit "$0 NPROC CONFIG [key=value ...]"
nproc="$1"; shift
exec "$bin/torchrun" --standalone --nproc_per_node "$nproc" -m mmt.train "$@"
