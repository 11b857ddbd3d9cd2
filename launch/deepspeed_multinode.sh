#!/usr/bin/env bash
# Several nodes under the deepspeed launcher (it starts the remote ranks over passwordless ssh/pdsh).
#   bash launch/deepspeed_multinode.sh HOSTFILE CONFIG [key=value ...]
# HOSTFILE lines: "node-a slots=8". The first host is the rendezvous (MASTER_ADDR) unless MASTER_ADDR is set.
# Every node needs the same repository path, venv and data / run-folder paths (shared filesystem).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
[ $# -ge 2 ] || usage_exit "$0 HOSTFILE CONFIG [key=value ...]"
hostfile="$1"; shift
[ -f "$hostfile" ] || { echo "no such hostfile: $hostfile" >&2; exit 2; }
master="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}"
exec "$bin/deepspeed" --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" \
    --module mmt.train "$@"
