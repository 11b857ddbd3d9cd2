#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for trying the mmt sbatch template and for the tests.
#
#   bash slurm/local_cluster.sh start    # install (Debian/Ubuntu, as root) when missing, configure, start, wait idle
#   eval "$(bash slurm/local_cluster.sh env)"   # point sbatch/squeue/scontrol at it (exports SLURM_CONF)
#   bash slurm/local_cluster.sh status
#   bash slurm/local_cluster.sh stop     # cancel all jobs, scontrol shutdown, stop munged
#
# No systemd: munged runs as the munge user, slurmctld and slurmd as root, all started here. Config, state, logs
# and pid files live in MMT_SLURM_DIR (default /tmp/mmt-slurm); the system's /etc/slurm is not touched.
# MMT_SLURMCTLD_PORT / MMT_SLURMD_PORT (default 6817 / 6818) let a second cluster run beside the first.
# Settings: SlurmUser/SlurmdUser root, munge auth, select/cons_tres with CR_CPU, proctrack/linuxproc, no
# accounting, jobcomp/filetxt (so `sacct -c` works), short credential lifetime so requeued jobs restart in seconds.
set -euo pipefail

state="${MMT_SLURM_DIR:-/tmp/mmt-slurm}"
conf="$state/slurm.conf"
packages=(slurmctld slurmd slurm-client munge)

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "root is needed to run: $* (run as root or install sudo)"
    fi
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is missing; install ${packages[*]}"
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! as_root apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
        as_root apt-get update -q >&2
        as_root apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
}

write_conf() {
    local host cpus mem_mb
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem_mb="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
    mkdir -p "$state/ctld" "$state/spool" "$state/log"
    cat > "$conf.tmp" <<EOF
# Written by slurm/local_cluster.sh: one node, everything local.
ClusterName=mmt-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
SlurmctldPort=${MMT_SLURMCTLD_PORT:-6817}
SlurmdPort=${MMT_SLURMD_PORT:-6818}
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/log/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0,bf_interval=1,sched_interval=2
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$conf.tmp" "$conf"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    as_root mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    as_root chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then as_root mungekey --create --keyfile /etc/munge/munge.key
        else as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
        as_root chown munge:munge /etc/munge/munge.key
        as_root chmod 400 /etc/munge/munge.key
    fi
    as_root runuser -u munge -- /usr/sbin/munged
    touch "$state/munged.started"  # stop only a munged this script started
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_idle() {
    local host state_now
    host="$(hostname -s)"
    for _ in $(seq 300); do
        state_now="$(SLURM_CONF="$conf" sinfo -h -n "$host" -o '%T' 2>/dev/null | head -n1 || true)"
        case "$state_now" in
            idle|mixed|allocated) return 0 ;;
            down*|drain*|fail*)
                SLURM_CONF="$conf" as_root scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    die "node $host did not become idle (state: ${state_now:-unknown}); see $state/log/"
}

start() {
    install_packages
    mkdir -p "$state"
    write_conf
    start_munge
    export SLURM_CONF="$conf"
    if ! pid_alive "$state/slurmctld.pid"; then
        # -c: clear saved state, so leftover jobs from an earlier run do not come back.
        as_root slurmctld -c -f "$conf"
    fi
    if ! pid_alive "$state/slurmd.pid"; then
        as_root slurmd -f "$conf"
    fi
    wait_idle
    log "cluster up: export SLURM_CONF=$conf"
}

stop() {
    export SLURM_CONF="$conf"
    if [ -f "$conf" ] && pid_alive "$state/slurmctld.pid"; then
        scancel --full --signal=KILL --user="$(id -un)" >/dev/null 2>&1 || true
        scancel --user="$(id -un)" >/dev/null 2>&1 || true
        # Give slurmd a moment to tear down the steps it is running; shutdown alone leaves them alive.
        for _ in $(seq 50); do
            [ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    for f in slurmd slurmctld; do
        for _ in $(seq 50); do pid_alive "$state/$f.pid" || break; sleep 0.2; done
        if pid_alive "$state/$f.pid"; then as_root kill "$(cat "$state/$f.pid")" 2>/dev/null || true; fi
    done
    if [ -f "$state/munged.started" ]; then
        as_root munged --stop >/dev/null 2>&1 || true
        rm -f "$state/munged.started"
    fi
    log "cluster stopped"
}

status() {
    export SLURM_CONF="$conf"
    pid_alive "$state/slurmctld.pid" || { echo "slurmctld: not running"; return 1; }
    sinfo
    squeue
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$conf" ;;
    *) echo "usage: $0 start|stop|status|env   (state in \$MMT_SLURM_DIR, default /tmp/mmt-slurm)" >&2; exit 2 ;;
esac
