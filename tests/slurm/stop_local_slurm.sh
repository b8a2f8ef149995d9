#!/usr/bin/env bash
# stop_local_slurm.sh - stop the daemons started by start_local_slurm.sh, each by the PID
# in its pidfile (and only if that PID's name matches). --purge also wipes Slurm state
# and the accounting database (job ids restart at 1).
#
# Origin: copied from /work/shared/tools/local-slurm/stop_local_slurm.sh so that the test
# suite (tests/slurm_cluster.py) does not depend on that folder. Changes from the original:
#   - DAEMON arguments stop only those daemons: slurmd-n<i> (one node), slurmd (every node),
#     slurmctld, slurmdbd, mariadbd, munged. Whatever order they are given in, they stop in
#     dependency order: slurmd, slurmctld, slurmdbd, mariadbd, munged. With names the queue
#     is left alone (the caller cancels its own jobs first); --purge needs a full stop;
#   - the exit status is 1 when a daemon is still alive after SIGKILL, 2 on a bad argument.
# With no arguments it behaves as the original: cancel every queued job, stop everything.
#
# Usage: stop_local_slurm.sh [--purge | DAEMON...]
set -uo pipefail
log() { echo "[stop_local_slurm $(date +%T)] $*" >&2; }
usage() {
  echo "usage: $0 [--purge | DAEMON...]" >&2
  echo "  DAEMON: slurmd-n<i> slurmd slurmctld slurmdbd mariadbd munged" >&2
  exit "${1:-2}"
}

PURGE=0
ALL=1
declare -A WANT=()  # daemon name -> 1; slurmd-n<i> names are kept one by one
for arg in "$@"; do
  case "$arg" in
    --purge) PURGE=1 ;;
    -h|--help) usage 0 ;;
    slurmd|slurmctld|slurmdbd|mariadbd|munged) WANT[$arg]=1; ALL=0 ;;
    slurmd-n[0-9]*) [[ "$arg" =~ ^slurmd-n[0-9]+$ ]] || usage; WANT[$arg]=1; ALL=0 ;;
    *) log "unknown daemon: $arg"; usage ;;
  esac
done
if [ "$PURGE" = 1 ] && [ "$ALL" = 0 ]; then log "--purge stops everything: give no daemon names"; usage; fi
wanted() { [ "$ALL" = 1 ] || [ -n "${WANT[$1]:-}" ]; }

FAILED=0
stop_pidfile() {  # PIDFILE COMM-PREFIX
  local f=$1 want=$2 pid comm
  [ -s "$f" ] || return 0
  pid=$(tr -dc '0-9' < "$f")
  if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [[ "$(cat /proc/$pid/comm)" == "$want"* ]]; then
    log "stopping $want pid $pid ($f)"
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid still alive, SIGKILL"; kill -9 "$pid"
      for _ in $(seq 1 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null; then log "ERROR: pid $pid survived SIGKILL"; FAILED=1; fi
    fi
  fi
  rm -f "$f"
}

# cancel remaining jobs of this local cluster so no slurmstepd is left behind
if [ "$ALL" = 1 ] && command -v squeue >/dev/null && scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then log "cancelling jobs: $jobs"; scancel $jobs; sleep 2; fi
fi
for f in /run/slurmd-n*.pid; do
  [ -e "$f" ] || continue
  node=$(basename "$f" .pid)  # slurmd-n<i>
  if wanted slurmd || wanted "$node"; then stop_pidfile "$f" slurmd; fi
done
wanted slurmctld && stop_pidfile /run/slurmctld.pid slurmctld
wanted slurmdbd && stop_pidfile /run/slurmdbd.pid slurmdbd
if [ "$PURGE" = 1 ] && mysqladmin ping >/dev/null 2>&1; then
  mysql -e "DROP DATABASE IF EXISTS slurm_acct_db" && log "dropped slurm_acct_db"
fi
wanted mariadbd && stop_pidfile /run/mysqld/mysqld.pid mariadbd
wanted munged && stop_pidfile /run/munge/munged.pid munged
if [ "$PURGE" = 1 ]; then rm -rf /var/spool/slurm; log "removed /var/spool/slurm"; fi
if [ "$ALL" = 1 ]; then log "stopped"; else log "stopped: ${!WANT[*]}"; fi
exit "$FAILED"
