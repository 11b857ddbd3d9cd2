#!/usr/bin/env bash
# A Slurm cluster on this machine, for trying the mmt sbatch template and for the tests: one node (default) or
# N nodes, each node a Linux network namespace with its own address, hostname and hosts file.
#
#   bash slurm/local_cluster.sh start [--nodes N] [--ssh]   # install (Debian/Ubuntu, as root) when missing,
#                                                           # configure, start, wait until every node is idle
#   eval "$(bash slurm/local_cluster.sh env)"   # point sbatch/squeue/scontrol at it (exports SLURM_CONF)
#   bash slurm/local_cluster.sh status
#   bash slurm/local_cluster.sh exec node2 CMD ...     # run CMD on a node (its network, hostname, hosts file)
#   bash slurm/local_cluster.sh kill-node node2        # lose a node: SIGKILL its slurmd, job steps and ranks
#   bash slurm/local_cluster.sh revive-node node2      # bring it back (a fresh slurmd, state resumed)
#   bash slurm/local_cluster.sh stop     # cancel all jobs, stop the daemons, remove namespaces, links, bridge
#
# One node (--nodes 1): slurmd runs in this machine's own network as the real hostname (no namespaces).
# N > 1 nodes: a bridge (MMT_CLUSTER_NET.1/24, default 10.77.0.1, a private address range) in this machine's
# namespace, where slurmctld listens; node K ("nodeK") is network namespace mmt-nodeK with eth0 at
# MMT_CLUSTER_NET.(10+K), joined to the bridge by a veth pair. A holder process per node owns the node's UTS
# namespace (hostname nodeK) and mount namespace (a hosts file naming every node bind-mounted on /etc/hosts), so
# `scontrol show hostnames` output works as MASTER_ADDR on every node. slurmd (-N nodeK, own spool, pid and log
# files) and, with --ssh, an sshd (host key and a client key made for the cluster, named in the nodes' own
# /etc/ssh/ssh_config, so `ssh node2` and pdsh work from every node: the deepspeed launcher's pdsh mode) are
# started inside those namespaces with nsenter. One munged serves every node (shared filesystem).
# Note: not `ip netns exec` (it remounts /sys; slurmd then finds no cgroup filesystem).
#
# No systemd: munged runs as the munge user, slurmctld, slurmd and sshd as root, all started here. Config,
# state, logs and pid files live in MMT_SLURM_DIR (default /tmp/mmt-slurm); the system's /etc/slurm is not
# touched. MMT_SLURMCTLD_PORT / MMT_SLURMD_PORT (default 6817 / 6818) let a second cluster run beside the first.
# MMT_SLURMD_TIMEOUT / MMT_SLURM_MESSAGE_TIMEOUT (SlurmdTimeout, MessageTimeout; default 60 / 10 s): how soon a lost
# node is declared DOWN (the tests use 10 / 5 s).
# `stop` is idempotent and also cleans up after a crash (it finds the namespaces and links by their names).
# Settings: SlurmUser/SlurmdUser root, munge auth, select/cons_tres with CR_CPU, proctrack/linuxproc, no
# accounting, jobcomp/filetxt (so `sacct -c` works), short credential lifetime so requeued jobs restart in seconds.
set -euo pipefail
# Daemons started here must not inherit the caller's open files: a lock held around this script (flock FILE bash
# local_cluster.sh start) would otherwise stay held by munged, slurmd, sshd as long as they run.
for fd in /proc/$$/fd/*; do
    fd="${fd##*/}"
    if [ "$fd" -gt 2 ] && [ "$fd" -ne 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done

state="${MMT_SLURM_DIR:-/tmp/mmt-slurm}"
conf="$state/slurm.conf"
net="${MMT_CLUSTER_NET:-10.77.0}"
bridge="mmt-br0"
packages=(slurmctld slurmd slurm-client munge)

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "root is needed to run: $* (run as root or install sudo)"
    fi
}

apt_install() {
    command -v apt-get >/dev/null || die "$* missing and apt-get is not available; install them"
    log "installing $* with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! as_root apt-get install -y -q --no-install-recommends "$@" >&2; then
        as_root apt-get update -q >&2
        as_root apt-get install -y -q --no-install-recommends "$@" >&2
    fi
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    if [ "$nodes" -gt 1 ]; then
        command -v ip >/dev/null || missing+=(iproute2)
        command -v nsenter >/dev/null || missing+=(util-linux)
    fi
    if [ "$ssh" = 1 ]; then
        [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
        command -v ssh >/dev/null || missing+=(openssh-client)
        command -v pdsh >/dev/null || missing+=(pdsh)
    fi
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

node_names() { local k; for k in $(seq "$nodes"); do echo "node$k"; done; }
node_addr() { echo "$net.$((10 + ${1#node}))"; }
node_ns() { echo "mmt-$1"; }
node_link() { echo "mmt-v${1#node}"; }

write_conf() {
    local host cpus mem_mb ctld_addr node_lines names
    host="$(hostname -s)"
    cpus="$(nproc)"
    # Every node claims all cores (they share them); memory is split so the nodes together fit in 90 % of RAM.
    mem_mb="$(awk -v n="$nodes" '/MemTotal/ {printf "%d", $2 / 1024 * 0.9 / n}' /proc/meminfo)"
    mkdir -p "$state/ctld" "$state/log"
    if [ "$nodes" -eq 1 ]; then
        mkdir -p "$state/spool"
        ctld_addr=127.0.0.1
        node_lines="NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
        names="$host"
        spool="$state/spool"; slurmd_pid="$state/slurmd.pid"; slurmd_log="$state/log/slurmd.log"
    else
        ctld_addr="$net.1"
        node_lines=""
        for n in $(node_names); do
            mkdir -p "$state/spool$n"
            node_lines+="NodeName=$n NodeAddr=$(node_addr "$n") CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"$'\n'
        done
        names="node[1-$nodes]"
        spool="$state/spool%n"; slurmd_pid="$state/slurmd-%n.pid"; slurmd_log="$state/log/slurmd-%n.log"
    fi
    cat > "$conf.tmp" <<EOF
# Written by slurm/local_cluster.sh: $nodes node(s) on one machine.
ClusterName=mmt-local
SlurmctldHost=$host($ctld_addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
SlurmctldPort=${MMT_SLURMCTLD_PORT:-6817}
SlurmdPort=${MMT_SLURMD_PORT:-6818}
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$slurmd_pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$slurmd_log
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
SlurmdTimeout=${MMT_SLURMD_TIMEOUT:-60}
MessageTimeout=${MMT_SLURM_MESSAGE_TIMEOUT:-10}
${node_lines%$'\n'}
PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
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

# ------------------------------------------------------------------------------------------------ the nodes
start_network() {
    as_root ip link show "$bridge" >/dev/null 2>&1 || as_root ip link add "$bridge" type bridge
    as_root ip addr replace "$net.1/24" dev "$bridge"
    as_root ip link set "$bridge" up
    local n ns link
    for n in $(node_names); do
        ns="$(node_ns "$n")"; link="$(node_link "$n")"
        [ -e "/var/run/netns/$ns" ] || as_root ip netns add "$ns"
        if ! as_root ip link show "$link" >/dev/null 2>&1; then
            as_root ip link add "$link" type veth peer name eth0 netns "$ns"
        fi
        as_root ip link set "$link" master "$bridge" up
        as_root ip -n "$ns" addr replace "$(node_addr "$n")/24" dev eth0
        as_root ip -n "$ns" link set eth0 up
        as_root ip -n "$ns" link set lo up
    done
}

write_hosts() {
    {
        echo "127.0.0.1 localhost"
        echo "$net.1 $(hostname -s)"
        for n in $(node_names); do echo "$(node_addr "$n") $n"; done
    } > "$state/hosts"
}

# A process that keeps node $1's hostname and hosts file (its UTS and mount namespaces) for the daemons.
start_holder() {
    local n="$1" pidf="$state/holder-$1.pid" ssh_conf=""
    pid_alive "$pidf" && return 0
    # With --ssh, the node's ssh client config names the cluster key: plain `ssh nodeK` (and pdsh) work.
    [ "$ssh" = 1 ] && ssh_conf="mount --bind '$state/ssh/ssh_config' /etc/ssh/ssh_config &&"
    as_root nsenter --net="/var/run/netns/$(node_ns "$n")" \
        unshare --uts --mount --propagation private \
        sh -c "hostname $n && mount --bind '$state/hosts' /etc/hosts && $ssh_conf echo \$\$ > '$pidf.tmp' && \
               mv '$pidf.tmp' '$pidf' && exec sleep infinity" </dev/null >/dev/null 2>&1 &
    for _ in $(seq 50); do pid_alive "$pidf" && return 0; sleep 0.05; done
    die "node $n: its namespace holder did not start"
}

in_node() {  # in_node NODE CMD...: run CMD in the node's network, UTS and mount namespaces
    local n="$1"; shift
    pid_alive "$state/holder-$n.pid" || die "node $n is not running (no holder in $state)"
    as_root nsenter -t "$(cat "$state/holder-$n.pid")" --net --uts --mount "$@"
}

start_slurmd_on() {
    pid_alive "$state/slurmd-$1.pid" && return 0
    in_node "$1" slurmd -f "$conf" -N "$1"
}

start_sshd_on() {
    pid_alive "$state/sshd-$1.pid" && return 0
    in_node "$1" /usr/sbin/sshd -h "$state/ssh/host_key" -o "ListenAddress=$(node_addr "$1")" \
        -o "PidFile=$state/sshd-$1.pid" -o "AuthorizedKeysFile=$state/ssh/authorized_keys" \
        -o PermitRootLogin=prohibit-password -o StrictModes=no -o PasswordAuthentication=no
}

setup_ssh() {
    mkdir -p "$state/ssh"
    [ -s "$state/ssh/host_key" ] || ssh-keygen -q -t ed25519 -N '' -C mmt-local-host -f "$state/ssh/host_key"
    [ -s "$state/ssh/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C mmt-local-cluster -f "$state/ssh/id_ed25519"
    cp "$state/ssh/id_ed25519.pub" "$state/ssh/authorized_keys"
    cat > "$state/ssh/ssh_config" <<EOF
# Bind-mounted on /etc/ssh/ssh_config inside the nodes of the local cluster only.
Host *
    IdentityFile $state/ssh/id_ed25519
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
EOF
    as_root mkdir -p /run/sshd /etc/ssh
    [ -e /etc/ssh/ssh_config ] || touch /etc/ssh/ssh_config
}

wait_ssh() {
    local n
    for n in $(node_names); do
        for _ in $(seq 100); do
            # shellcheck disable=SC2046
            [ "$(in_node node1 ssh -o ConnectTimeout=2 "$n" hostname 2>/dev/null)" = "$n" ] && continue 2
            sleep 0.1
        done
        die "sshd on $n does not answer (ssh $n from node1)"
    done
}

# ------------------------------------------------------------------------------------------------ start / stop
wait_idle() {
    local names n state_now
    if [ "$nodes" -eq 1 ]; then names="$(hostname -s)"; else names="$(node_names)"; fi
    for n in $names; do
        for _ in $(seq 300); do
            state_now="$(SLURM_CONF="$conf" sinfo -h -n "$n" -o '%T' 2>/dev/null | head -n1 || true)"
            case "$state_now" in
                idle|mixed|allocated) continue 2 ;;
                down*|drain*|fail*)
                    SLURM_CONF="$conf" as_root scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true ;;
            esac
            sleep 0.2
        done
        die "node $n did not become idle (state: ${state_now:-unknown}); see $state/log/"
    done
}

parse_start_args() {
    nodes=1; ssh=0
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) [ $# -ge 2 ] || die "--nodes needs a number"; nodes="$2"; shift 2 ;;
            --nodes=*) nodes="${1#--nodes=}"; shift ;;
            --ssh) ssh=1; shift ;;
            *) die "start: unknown option $1 (use --nodes N, --ssh)" ;;
        esac
    done
    [[ "$nodes" =~ ^[0-9]+$ ]] && [ "$nodes" -ge 1 ] && [ "$nodes" -le 200 ] || die "--nodes $nodes: give 1..200"
    [ "$ssh" = 0 ] || [ "$nodes" -gt 1 ] || die "--ssh needs --nodes 2 or more (sshd runs inside the nodes)"
}

load_layout() {  # what `start` made: node count and ssh flag, for stop/exec/env
    nodes=1; ssh=0
    # shellcheck disable=SC1091
    [ -f "$state/cluster.env" ] && . "$state/cluster.env"
    return 0
}

start() {
    parse_start_args "$@"
    install_packages
    mkdir -p "$state"
    if [ -f "$state/cluster.env" ] && pid_alive "$state/slurmctld.pid"; then
        local want="nodes=$nodes ssh=$ssh"
        grep -qx "nodes=$nodes" "$state/cluster.env" && grep -qx "ssh=$ssh" "$state/cluster.env" ||
            die "a cluster with another shape runs in $state ($(tr '\n' ' ' < "$state/cluster.env")); stop it first to start $want"
    fi
    printf 'nodes=%s\nssh=%s\n' "$nodes" "$ssh" > "$state/cluster.env"
    write_conf
    start_munge
    export SLURM_CONF="$conf"
    if [ "$nodes" -gt 1 ]; then
        start_network
        write_hosts
        [ "$ssh" = 0 ] || setup_ssh
        for n in $(node_names); do start_holder "$n"; done
    fi
    if ! pid_alive "$state/slurmctld.pid"; then
        # -c: clear saved state, so leftover jobs from an earlier run do not come back.
        as_root slurmctld -c -f "$conf"
    fi
    if [ "$nodes" -eq 1 ]; then
        pid_alive "$state/slurmd.pid" || as_root slurmd -f "$conf"
    else
        for n in $(node_names); do start_slurmd_on "$n"; done
        if [ "$ssh" = 1 ]; then
            for n in $(node_names); do start_sshd_on "$n"; done
            wait_ssh
        fi
    fi
    wait_idle
    log "cluster up ($nodes node(s)$([ "$ssh" = 1 ] && echo ', sshd on each')): eval \"\$(bash $0 env)\""
}

kill_pidfile() {  # SIGTERM, wait, then SIGKILL the process in pid file $1
    pid_alive "$1" || return 0
    local pid; pid="$(cat "$1")"
    as_root kill "$pid" 2>/dev/null || true
    for _ in $(seq 25); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    as_root kill -9 "$pid" 2>/dev/null || true
}

kill_namespace() {  # SIGKILL every process in network namespace $1 (daemons, job steps, ranks, the holder)
    local pids
    for _ in $(seq 20); do
        pids="$(as_root ip netns pids "$1" 2>/dev/null || true)"
        [ -n "$pids" ] || return 0
        # shellcheck disable=SC2086
        as_root kill -9 $pids 2>/dev/null || true
        sleep 0.1
    done
}

stop() {
    load_layout
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
    for f in "$state"/slurmd*.pid "$state/slurmctld.pid"; do  # they exit on `scontrol shutdown`
        [ -e "$f" ] || continue
        for _ in $(seq 50); do pid_alive "$f" || break; sleep 0.2; done
        kill_pidfile "$f"
    done
    for f in "$state"/sshd-*.pid; do
        if [ -e "$f" ]; then kill_pidfile "$f"; fi
    done
    # A multi-node cluster's namespaces and links, found by name (also those a crashed start left). Whatever still
    # runs inside a node (a step stuck in a rendezvous outlives `scontrol shutdown`) is killed first: a namespace
    # with a live process keeps its veth.
    # The sweep is by name and runs whatever this state folder recorded: a cluster started with another
    # MMT_SLURM_DIR (or a crashed test's) is still removed.
    local ns link
    for ns in $(as_root ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^mmt-node[0-9]+$' || true); do
        kill_namespace "$ns"
        as_root ip netns del "$ns" 2>/dev/null || true
    done
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^mmt-v[0-9]+$' || true); do
        as_root ip link del "$link" 2>/dev/null || true
    done
    as_root ip link del "$bridge" 2>/dev/null || true
    rm -f "$state"/holder-*.pid
    stop_munge
    log "cluster stopped"
}

stop_munge() {
    if [ -f "$state/munged.started" ]; then
        as_root munged --stop >/dev/null 2>&1 || true
        rm -f "$state/munged.started"
    fi
}

kill_node() {  # lose a node the way a machine dies: everything on it gets SIGKILL, nothing says goodbye
    load_layout
    [ "$nodes" -gt 1 ] || die "kill-node needs a multi-node cluster (start --nodes N)"
    local n="$1" ns pids
    ns="$(node_ns "$n")"
    [ -e "/var/run/netns/$ns" ] || die "no node $n"
    pids="$(as_root ip netns pids "$ns" | grep -vx "$(cat "$state/holder-$n.pid" 2>/dev/null || echo -)" || true)"
    # shellcheck disable=SC2086
    [ -z "$pids" ] || as_root kill -9 $pids 2>/dev/null || true
    # Its address stops answering too (no RST from a dead machine).
    as_root ip -n "$ns" link set eth0 down
    log "node $n lost (killed: $(echo $pids))"
}

revive_node() {
    load_layout
    local n="$1"
    as_root ip -n "$(node_ns "$n")" link set eth0 up
    export SLURM_CONF="$conf"
    start_slurmd_on "$n"
    [ "$ssh" = 1 ] && start_sshd_on "$n"
    scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
    for _ in $(seq 300); do
        case "$(sinfo -h -n "$n" -o '%T' 2>/dev/null | head -n1)" in idle|mixed|allocated) log "node $n back"; return 0 ;; esac
        sleep 0.2
    done
    die "node $n did not come back idle; see $state/log/slurmd-$n.log"
}

status() {
    export SLURM_CONF="$conf"
    pid_alive "$state/slurmctld.pid" || { echo "slurmctld: not running"; return 1; }
    sinfo
    squeue
}

env_lines() {
    load_layout
    echo "export SLURM_CONF=$conf"
}

action="${1:-}"
[ $# -gt 0 ] && shift
case "$action" in
    start) start "$@" ;;
    stop) stop ;;
    status) status ;;
    env) env_lines ;;
    exec) [ $# -ge 2 ] || die "usage: $0 exec NODE CMD ..."; load_layout; n="$1"; shift; in_node "$n" "$@" ;;
    kill-node) [ $# -eq 1 ] || die "usage: $0 kill-node NODE"; kill_node "$1" ;;
    revive-node) [ $# -eq 1 ] || die "usage: $0 revive-node NODE"; revive_node "$1" ;;
    *) echo "usage: $0 start [--nodes N] [--ssh] | stop | status | env | exec NODE CMD... | kill-node NODE |" \
            "revive-node NODE   (state in \$MMT_SLURM_DIR, default /tmp/mmt-slurm)" >&2; exit 2 ;;
esac
