#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by start_local_cluster.sh (slurmd, slurmctld, and munged if
# that script started it). Jobs still running are killed with the daemons. `--purge` also removes the
# state directory ($BIDS_POSTOP_SLURM_DIR, default /tmp/bids_postop_slurm).
set -euo pipefail

STATE=${BIDS_POSTOP_SLURM_DIR:-/tmp/bids_postop_slurm}
say() { echo "stop_local_cluster: $*" >&2; }

stop_pidfile() {  # NAME PIDFILE
    local pid
    [[ -f $2 ]] || return 0
    pid=$(cat "$2")
    if kill -0 "$pid" 2>/dev/null; then
        say "stopping $1 (pid $pid)"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$2"
}

if [[ -f $STATE/slurm.conf ]] && command -v scancel >/dev/null 2>&1; then
    SLURM_CONF=$STATE/slurm.conf timeout 5 scancel --user="$(id -un)" 2>/dev/null || true
fi
stop_pidfile slurmd "$STATE/slurmd.pid"
stop_pidfile slurmctld "$STATE/slurmctld.pid"
if [[ -f $STATE/munged.started-here ]]; then
    stop_pidfile munged /run/munge/munged.pid
    rm -f "$STATE/munged.started-here"
fi
if [[ ${1:-} == --purge ]]; then
    rm -rf "$STATE"
fi
say "stopped"
