#!/usr/bin/env bash
# start_local_slurm.sh - bring up a real single-machine Slurm cluster on loopback
# (munged + [mariadb + slurmdbd] + slurmctld + N x slurmd) on Debian 12, as root.
# Idempotent: re-running with everything healthy is a no-op; missing daemons are started.
#
# Origin: copied from /work/shared/tools/local-slurm/start_local_slurm.sh so that the test
# suite (tests/slurm_cluster.py) does not depend on that folder. Changes from the original:
#   - the fast path ("already running") also requires every slurmd pidfile and, with
#     accounting, mariadbd and slurmdbd to be alive; the original returned early with a dead
#     slurmdbd, which leaves sacct (and so submitit) broken;
#   - a policy-rc.d created for the apt install is removed by a trap even when apt fails;
#   - the node names n1..nN resolve (to 127.0.0.1, in /etc/hosts), as node names do on a real
#     cluster: jobs use the first node's name as the rendezvous host.
#   - slurm.conf has preemption (PreemptType=preempt/partition_prio, PreemptMode=REQUEUE) and
#     two more partitions over the same nodes, low (preempted, GraceTime) and high; so a
#     cluster started by the original copy is restarted by this one (its slurm.conf differs).
#   - AuthInfo=cred_expire=5 (the original has 10): a requeued job waits cred_expire + 1 s
#     before it may start again, and 5 is the least slurmctld accepts (below, it logs
#     "cred_expire=4 invalid" and falls back to 120).
# Everything else, including SchedulerParameters=sched_interval=2,bf_interval=1 and accounting
# through MariaDB + slurmdbd, is unchanged. Stop the daemons with stop_local_slurm.sh next to
# this file.
#
# Env knobs:
#   SLURM_LOCAL_NODES=2        number of slurmd "nodes" (n1..nN) on this one machine
#   SLURM_LOCAL_ACCOUNTING=1   1 = slurmdbd + MariaDB (sacct works; submitit needs it to see
#                              job states / failures), 0 = no accounting (faster, sacct fails)
#   SLURM_LOCAL_WAIT=120       seconds to wait for all nodes to become idle
#   SLURM_LOCAL_PARTITION=debug
#   SLURM_LOCAL_PREEMPTIBLE=low   partition whose jobs are preempted (PreemptMode=REQUEUE)
#   SLURM_LOCAL_PREEMPTING=high   partition whose jobs preempt them (PriorityTier=10)
#   SLURM_LOCAL_GRACE_S=20        GraceTime of the preemptible partition: SIGTERM, then this
#                                 many seconds, then SIGKILL
set -euo pipefail

NODES=${SLURM_LOCAL_NODES:-2}
ACCT=${SLURM_LOCAL_ACCOUNTING:-1}
WAIT=${SLURM_LOCAL_WAIT:-120}
PART=${SLURM_LOCAL_PARTITION:-debug}
PREEMPT_LOW=${SLURM_LOCAL_PREEMPTIBLE:-low}
PREEMPT_HIGH=${SLURM_LOCAL_PREEMPTING:-high}
GRACE=${SLURM_LOCAL_GRACE_S:-20}
CLUSTER=localcluster
CONF=/etc/slurm/slurm.conf
DBDCONF=/etc/slurm/slurmdbd.conf
SPOOL=/var/spool/slurm
LOGDIR=/var/log/slurm
BASE_PORT=17000
DBPASS=slurmlocal

log() { echo "[start_local_slurm $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

# pid_ok PIDFILE COMM-PREFIX : pidfile exists, process alive, and its name matches
pid_ok() {
  local f=$1 want=$2 pid comm
  [ -s "$f" ] || return 1
  pid=$(tr -dc '0-9' < "$f"); [ -n "$pid" ] || return 1
  [ -r "/proc/$pid/comm" ] || return 1
  comm=$(cat "/proc/$pid/comm")
  [[ "$comm" == "$want"* ]]
}

all_idle() {
  local out
  out=$(sinfo -h -N -p "$PART" -o '%N %T' 2>/dev/null) || return 1  # a node once, not once a partition
  [ "$(echo "$out" | grep -c .)" -eq "$NODES" ] || return 1
  ! echo "$out" | grep -v -E ' (idle|mixed|allocated|completing)$' | grep -q .
}

# ---------------------------------------------------------------- 1. packages
PKGS="munge slurmctld slurmd slurm-client"
[ "$ACCT" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing:$missing"
  export DEBIAN_FRONTEND=noninteractive
  # keep postinst scripts from starting services themselves (we start them below)
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # removed even when apt fails (set -e exits)
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
  if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi

# ---------------------------------------------------------------- 2. config
HOST=$(hostname -s)
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
# Node names resolve on a real cluster; jobs use them as the rendezvous host (MASTER_ADDR).
for i in $(seq 1 "$NODES"); do
  getent hosts "n$i" >/dev/null || echo "127.0.0.1 n$i" >> /etc/hosts
done
# hardware as slurmd sees it: "NodeName=x CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
HW=$(slurmd -C | head -1)
hw() { echo "$HW" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
CPUS=$(hw CPUs); SOCK=$(hw SocketsPerBoard); CORES=$(hw CoresPerSocket); THR=$(hw ThreadsPerCore)
MEM=$(( $(hw RealMemory) * 9 / 10 ))   # memory is not a consumable resource (CR_Core), so every node may claim it

mkdir -p "$SPOOL/ctld" "$LOGDIR" /etc/slurm
for i in $(seq 1 "$NODES"); do mkdir -p "$SPOOL/d-n$i"; done

if [ "$ACCT" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi
NODE_LINES=""
for i in $(seq 1 "$NODES"); do
  NODE_LINES+="NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((BASE_PORT + i)) CPUs=$CPUS Sockets=$SOCK CoresPerSocket=$CORES ThreadsPerCore=$THR RealMemory=$MEM State=UNKNOWN
"
done

NEWCONF=$(cat <<EOF
# generated by start_local_slurm.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs become eligible again after cred_expire + 1 s (default 120; 5 is the least
# slurmctld accepts): each requeue of the tests waits it out
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
SlurmctldPort=6817
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d-%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
$ACCT_LINES
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
# Preemption as clusters configure it: a job in $PREEMPT_HIGH takes the nodes of a job in
# $PREEMPT_LOW, which gets SIGTERM, GraceTime s to stop, then SIGKILL and a requeue. Jobs in
# $PART are never preempted.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
${NODE_LINES}PartitionName=$PART Nodes=ALL Default=YES MaxTime=INFINITE State=UP PreemptMode=OFF
PartitionName=$PREEMPT_LOW Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE
PartitionName=$PREEMPT_HIGH Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
)

conf_changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEWCONF" ]; then conf_changed=1; fi

# every daemon of this cluster alive, each by its pidfile
all_alive() {
  pid_ok /run/munge/munged.pid munged && pid_ok /run/slurmctld.pid slurmctld || return 1
  if [ "$ACCT" = 1 ]; then
    pid_ok /run/mysqld/mysqld.pid mariadbd && pid_ok /run/slurmdbd.pid slurmdbd || return 1
  fi
  for i in $(seq 1 "$NODES"); do pid_ok "/run/slurmd-n$i.pid" slurmd || return 1; done
}

# fast path: everything up and config unchanged
if [ "$conf_changed" = 0 ] && all_alive && all_idle; then
  log "already running: $(sinfo -h -o '%P %a %D %T %N' | tr '\n' ' ')"
  exit 0
fi

if [ "$conf_changed" = 1 ]; then
  # slurm daemons must restart to pick up node changes: stop only ours, by pidfile
  for f in /run/slurmd-n*.pid /run/slurmctld.pid; do
    [ -e "$f" ] || continue
    if pid_ok "$f" slurm; then pid=$(cat "$f"); log "config changed: stopping pid $pid ($f)"; kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done; fi
    rm -f "$f"
  done
  printf '%s\n' "$NEWCONF" > "$CONF"
fi

# ---------------------------------------------------------------- 3. munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
if ! pid_ok /run/munge/munged.pid munged; then
  mkdir -p /run/munge; chown munge:munge /run/munge; chmod 755 /run/munge
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
munge -n | unmunge >/dev/null || die "munge not working"

# ---------------------------------------------------------------- 4. accounting (MariaDB + slurmdbd)
if [ "$ACCT" = 1 ]; then
  cat > /etc/mysql/mariadb.conf.d/90-slurm-local.cnf <<'EOF'
[mysqld]
skip-networking
innodb_buffer_pool_size=256M
innodb_lock_wait_timeout=900
EOF
  if ! pid_ok /run/mysqld/mysqld.pid mariadbd; then
    mkdir -p /run/mysqld; chown mysql:mysql /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
    log "starting mariadbd"
    setsid nohup /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
      >"$LOGDIR/mariadb.log" 2>&1 < /dev/null &
  fi
  for _ in $(seq 1 150); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.2; done
  mysqladmin ping >/dev/null 2>&1 || die "mariadb did not start (see $LOGDIR/mariadb.log)"
  mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > "$DBDCONF" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$LOGDIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DBDCONF"
  if ! pid_ok /run/slurmdbd.pid slurmdbd; then log "starting slurmdbd"; slurmdbd; fi
  for _ in $(seq 1 150); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
  sacctmgr -n list cluster >/dev/null 2>&1 || die "slurmdbd not answering (see $LOGDIR/slurmdbd.log)"
fi

# ---------------------------------------------------------------- 5. slurmctld + slurmd(s)
if ! pid_ok /run/slurmctld.pid slurmctld; then log "starting slurmctld"; slurmctld; fi
for _ in $(seq 1 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
for i in $(seq 1 "$NODES"); do
  if ! pid_ok "/run/slurmd-n$i.pid" slurmd; then log "starting slurmd -N n$i"; slurmd -N "n$i"; fi
done

# ---------------------------------------------------------------- 6. wait for idle nodes
deadline=$((SECONDS + WAIT))
until all_idle; do
  # nodes left DOWN/DRAIN from an earlier run: resume them
  for n in $(sinfo -h -N -p "$PART" -o '%N %T' 2>/dev/null | awk '$2 ~ /down|drain/ {print $1}'); do
    scontrol update NodeName="$n" State=RESUME 2>/dev/null || true
  done
  [ $SECONDS -lt $deadline ] || { sinfo -N -l >&2; die "nodes not idle after ${WAIT}s (see $LOGDIR)"; }
  sleep 0.5
done
log "cluster up: $(sinfo -h -o '%P %a %D %T %N' | tr '\n' ' ')"
