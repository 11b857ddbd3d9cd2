#!/usr/bin/env bash
# Several nodes under the deepspeed launcher.
#   bash launch/deepspeed_multinode.sh HOSTFILE CONFIG [key=value ...]
#       run once, on the first host: the launcher starts every node's ranks over passwordless ssh (pdsh)
#   bash launch/deepspeed_multinode.sh --no-ssh NODE_RANK HOSTFILE CONFIG [key=value ...]
#       run on every node, NODE_RANK = the node's line in HOSTFILE (0 = first); no ssh needed
# HOSTFILE lines: "node-a slots=8". The first host is the rendezvous (MASTER_ADDR) unless MASTER_ADDR is set.
# Every node needs the same repository path, venv and data / run-folder paths (shared filesystem).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
no_ssh=()
if [ "${1:-}" = "--no-ssh" ]; then
    [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] || usage_exit "$0 --no-ssh NODE_RANK HOSTFILE CONFIG [key=value ...]"
    no_ssh=(--no_ssh --node_rank "$2"); shift 2
fi
[ $# -ge 2 ] || usage_exit "$0 [--no-ssh NODE_RANK] HOSTFILE CONFIG [key=value ...]"
hostfile="$1"; shift
[ -f "$hostfile" ] || { echo "no such hostfile: $hostfile" >&2; exit 2; }
master="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}"
exec "$bin/deepspeed" --hostfile "$hostfile" "${no_ssh[@]}" --master_addr "$master" \
    --master_port "${MASTER_PORT:-29500}" --module mmt.train "$@"
