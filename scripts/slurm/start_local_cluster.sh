#!/usr/bin/env bash
# Bring up a single-node Slurm cluster on localhost (for CI and for trying the job-array scripts).
#
#   eval "$(scripts/slurm/start_local_cluster.sh)"      # starts it (or finds it running), exports SLURM_CONF
#   sinfo; sbatch ...; scripts/slurm/stop_local_cluster.sh
#
# Needs root and Debian's `apt-get install -y slurm-wlm munge`. No systemd: munged runs as user munge,
# slurmctld (-i: ignore saved state) and slurmd as root, all configured from a state directory
# ($BIDS_POSTOP_SLURM_DIR, default /tmp/bids_postop_slurm) that holds slurm.conf, spool, state and logs.
# Idempotent: when the cluster answers already it only prints the export line (well under a second).
# stdout is exactly one line, `export SLURM_CONF=...`; messages go to stderr. Exit 0 once `sinfo` shows the
# node idle (or busy), non-zero when it cannot be started (see the logs in the state directory).
#
# Environment: BIDS_POSTOP_SLURM_DIR (state dir), BIDS_POSTOP_SLURM_CPUS (default: nproc),
# BIDS_POSTOP_SLURM_MEM_MB (default: 90 % of MemTotal), BIDS_POSTOP_SLURM_PORT (slurmctld; slurmd uses +1;
# default 6817), BIDS_POSTOP_SLURM_TIMEOUT (seconds to wait for the node, default 60).
set -euo pipefail

STATE=${BIDS_POSTOP_SLURM_DIR:-/tmp/bids_postop_slurm}
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF
NODE=$(hostname -s)
PORT=${BIDS_POSTOP_SLURM_PORT:-6817}
TIMEOUT=${BIDS_POSTOP_SLURM_TIMEOUT:-60}

say() { echo "start_local_cluster: $*" >&2; }
node_ready() {
    # idle, mixed or allocated (a trailing * or ~ would mean not responding / powered down)
    local state
    state=$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1) || return 1
    [[ $state =~ ^(idle|mixed|allocated|completing)$ ]]
}
finish() { echo "export SLURM_CONF=$CONF"; exit 0; }
running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin
    command -v "$tool" >/dev/null 2>&1 || { say "$tool not found: apt-get install -y slurm-wlm munge"; exit 1; }
done

# already running (ours): nothing to do
if [[ -f $CONF ]] && running "$STATE/slurmctld.pid" && running "$STATE/slurmd.pid" && node_ready; then
    say "cluster already up (SLURM_CONF=$CONF)"
    finish
fi
if [[ $(id -u) -ne 0 ]]; then
    say "must run as root (munged runs as user munge, slurmd as root)"
    exit 1
fi

mkdir -p "$STATE"/{spool,state,log}
chmod 755 "$STATE"

# --- munge ----------------------------------------------------------------------------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    say "starting munged"
    # --force: a stale socket/pid file left by a killed munged does not stop a fresh one
    if command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- munged --force
    else
        su -s /bin/sh munge -c "munged --force"
    fi
    touch "$STATE/munged.started-here"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || { say "munged does not answer"; exit 1; }
fi

# --- slurm.conf -----------------------------------------------------------------------------------------
CPUS=${BIDS_POSTOP_SLURM_CPUS:-$(nproc)}
MEM=${BIDS_POSTOP_SLURM_MEM_MB:-$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)}
cat >"$CONF.tmp" <<EOF
# written by scripts/slurm/start_local_cluster.sh: a single-node cluster on localhost
ClusterName=bidspostop
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# jobs without --mem must not take the whole node's memory (that would run them one at a time)
DefMemPerCPU=1000
# the node's hardware may differ from what is declared here (e.g. CPUs=2 on a larger CI runner)
SlurmdParameters=config_overrides
ReturnToService=2
# keep finished jobs visible to scontrol show job for 10 minutes (there is no accounting database)
MinJobAge=600
SchedulerType=sched/backfill
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
mv "$CONF.tmp" "$CONF"

# --- daemons --------------------------------------------------------------------------------------------
if ! running "$STATE/slurmctld.pid"; then
    say "starting slurmctld"
    slurmctld -i -f "$CONF"
fi
for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
if ! running "$STATE/slurmd.pid"; then
    say "starting slurmd"
    slurmd -f "$CONF" -N "$NODE"
fi

deadline=$((SECONDS + TIMEOUT))
until node_ready; do
    if ((SECONDS > deadline)); then
        say "the node did not become idle in ${TIMEOUT} s:"
        sinfo -N -l >&2 || true
        tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
        exit 1
    fi
    # a node left down/drained by an earlier cluster comes back with an explicit resume
    state=$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1 || true)
    if [[ $state == down* || $state == drain* ]]; then
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.5
done
say "cluster up: node $NODE, $CPUS CPUs, $MEM MB (SLURM_CONF=$CONF)"
finish
