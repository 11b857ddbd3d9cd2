#!/usr/bin/env bash
# The partitioned order on the local 2-node cluster: each node fetches only its partitions' shards from S3.
#
#   flock /tmp/mmt-slurm.lock bash benchmarks/bench_data_cluster.sh      # as root, ~1 min; the cluster is stopped after
#
# Starts `slurm/local_cluster.sh start --nodes 2` (network namespaces node1, node2 on a bridge, state in a temp
# folder), a moto S3 server on the bridge address, uploads the demo dataset (`mmt shards demo`: 7 shards), and
# runs `mmt train configs/train/demo.yaml` as 2 ranks, one inside each node's namespace (rank 0 on node1 is
# MASTER_ADDR), with data.partitions=2, data.shard_window=1 and a separate cache folder per node, for 20 steps (one
# epoch of the partitioned order is 21 steps). Then prints the shards each node's cache holds (disjoint) and the
# per-node I/O the run logged (node<k>/data_fetched_gb, data_shard_fetches, data_cache_hit_rate, ...).
set -u
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
W="$(mktemp -d /tmp/mmt-data-cluster.XXXXXX)"
export MMT_SLURM_DIR="$W/slurm" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"
MOTO=""
cleanup() {
    [ -n "$MOTO" ] && kill "$MOTO" 2>/dev/null
    bash slurm/local_cluster.sh stop >/dev/null 2>&1
    rm -rf "$W"
}
trap cleanup EXIT
bash slurm/local_cluster.sh start --nodes 2 2>&1 | tail -1
BRIDGE="${MMT_CLUSTER_NET:-10.77.0}.1"
PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('$BRIDGE',0)); print(s.getsockname()[1])")
"$(dirname "$PY")/moto_server" -H "$BRIDGE" -p "$PORT" >"$W/moto.log" 2>&1 &  # log to a file, never a pipe
MOTO=$!
EP="http://$BRIDGE:$PORT"
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_SESSION_TOKEN=testing
export AWS_DEFAULT_REGION=us-east-1 AWS_ENDPOINT_URL="$EP"
for _ in $(seq 100); do curl -s -m 1 -o /dev/null "$EP/moto-api/" && break; sleep 0.2; done
"$PY" -m mmt.cli shards demo "$W/demo" >/dev/null
"$PY" - "$W/demo" <<'PYEOF'
import pathlib, sys
import boto3
s3 = boto3.client("s3")
s3.create_bucket(Bucket="demo")
root = pathlib.Path(sys.argv[1])
for f in sorted(p for p in root.rglob("*") if p.is_file()):
    s3.upload_file(str(f), "demo", str(f.relative_to(root)))
PYEOF
args=(configs/train/demo.yaml "data.train_urls=s3://demo/train/shard-{000000..000006}.tar"
    "data.val_urls=s3://demo/val/shard-000000.tar" data.partitions=2 data.shard_window=1 train.max_steps=20
    train.log_interval=5 "train.run_dir=$W/run" train.checkpoint_interval=0 train.checkpoint_at_end=false
    train.eval_at_end=false tracking.backend=none train.progress_bar=false)
t0=$(date +%s)
pids=()
for r in 0 1; do
    node="node$((r + 1))"
    bash slurm/local_cluster.sh exec "$node" env RANK=$r WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 \
        GROUP_RANK=$r MASTER_ADDR=node1 MASTER_PORT=29641 PYTHONPATH="$REPO" DS_ACCELERATOR=cpu \
        "$PY" -m mmt.train "${args[@]}" "data.cache_dir=$W/cache-$node" >"$W/rank$r.log" 2>&1 &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
echo "2 ranks on node1, node2: exit $rc after $(($(date +%s) - t0)) s; $(grep -h 'mmt: done' "$W/rank0.log")"
[ "$rc" -eq 0 ] || { tail -20 "$W/rank0.log" "$W/rank1.log"; exit 1; }
for n in node1 node2; do
    echo "$n cache: $(ls "$W/cache-$n/shards" | grep '\.tar$' | sed 's/^[0-9a-f]*-//' | sort | tr '\n' ' ')"
done
"$PY" - "$W/run/metrics.jsonl" <<'PYEOF'
import json, sys
row = [json.loads(line) for line in open(sys.argv[1])][-1]
for k in sorted(k for k in row if k.startswith("node")):
    print(f"  step {row['step']}: {k} = {row[k]:.4g}")
PYEOF
