#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests: munged, MariaDB, slurmdbd
# (accounting, which submitit reads through sacct), slurmctld and slurmd, started by hand
# (no systemd), with every file under one state folder and every daemon on 127.0.0.1.
#
#   tools/slurm/local_cluster.sh start    # installs the Debian packages if missing (root + apt)
#   tools/slurm/local_cluster.sh stop     # stops exactly the daemons `start` started, by pid
#   tools/slurm/local_cluster.sh status
#
# Clients (sbatch, sacct, submitit) need `export SLURM_CONF=$MOA_SLURM_STATE/slurm.conf`.
# Settings: MOA_SLURM_STATE (state folder, default /tmp/moa_slurm; `start` wipes it unless the
# daemons run), MOA_SLURM_PORT (first of four ports, default 16817), MOA_SLURM_CPUS (CPUs the
# node offers, default nproc). Exit status 2: this machine cannot run it (no root or no apt).
set -euo pipefail

STATE=${MOA_SLURM_STATE:-/tmp/moa_slurm}
PORT=${MOA_SLURM_PORT:-16817}
CPUS=${MOA_SLURM_CPUS:-$(nproc)}
HOST=$(hostname -s)
CLUSTER=moa
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
BINARIES=(slurmctld slurmd sbatch sacct munged mungekey slurmdbd mariadbd mariadb-install-db)
MARKER=$STATE/.moa_local_cluster
export SLURM_CONF=$STATE/slurm.conf

say() { echo "[local_cluster] $*"; }
die() { echo "[local_cluster] error: $*" >&2; exit 1; }
cannot() { echo "[local_cluster] cannot run here: $*" >&2; exit 2; }

# name:pidfile:binary for every daemon, in start order.
daemons() {
  echo "munged:$STATE/munge/munged.pid:munged"
  echo "mariadbd:$STATE/mysql/mariadbd.pid:mariadbd"
  echo "slurmdbd:$STATE/run/slurmdbd.pid:slurmdbd"
  echo "slurmctld:$STATE/run/slurmctld.pid:slurmctld"
  echo "slurmd:$STATE/run/slurmd.pid:slurmd"
}

# The pid in `pidfile` if that process is alive and runs `binary`, else nothing.
live_pid() {
  local pidfile=$1 binary=$2 pid
  [[ -s $pidfile ]] || return 0
  pid=$(tr -dc '0-9' <"$pidfile")
  [[ -n $pid && -d /proc/$pid ]] || return 0
  local exe
  exe=$(readlink -f "/proc/$pid/exe" 2>/dev/null) || return 0
  # Debian installs slurmctld and slurmd as alternatives of slurmctld-wlm and slurmd-wlm.
  if [[ $exe == */"$binary" || $exe == */"$binary"-wlm ]]; then echo "$pid"; fi
  return 0
}

any_running() {
  local name pidfile binary
  while IFS=: read -r name pidfile binary; do
    [[ -n $(live_pid "$pidfile" "$binary") ]] && return 0
  done < <(daemons)
  return 1
}

install_packages() {
  local missing=()
  for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null || [[ -x /usr/sbin/$b ]] || missing+=("$b")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || cannot "needs root to install ${PACKAGES[*]} (missing: ${missing[*]})"
  command -v apt-get >/dev/null || cannot "needs apt-get to install ${PACKAGES[*]}"
  say "installing ${PACKAGES[*]}"
  # Post-install scripts must not start the services with their default configs.
  local policy=/usr/sbin/policy-rc.d added=""
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${PACKAGES[@]}" >/dev/null
  if [[ -n $added ]]; then rm -f "$policy"; trap - EXIT; fi
}

write_configs() {
  local mem_mb def_mem overrides=""
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024) - 1024}' /proc/meminfo)
  def_mem=$((mem_mb / CPUS))
  [[ $CPUS -gt $(nproc) ]] && overrides="SlurmdParameters=config_overrides"
  cat >"$STATE/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket.2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
ReturnToService=2
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT + 2))
AccountingStoragePass=$STATE/munge/munge.socket.2
JobCompType=jobcomp/none
DependencyParameters=kill_invalid_depend
KillWait=5
$overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$STATE/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket.2
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$STATE/slurmdbd.conf"
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local deadline=$((SECONDS + $1)) what=$2 seconds=$1
  shift 2
  while ((SECONDS < deadline)); do
    timeout 5 "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "$what did not come up within ${seconds} s (logs: $STATE/log, $STATE/mysql/error.log)"
}

start() {
  if any_running; then
    say "already running (state $STATE); export SLURM_CONF=$SLURM_CONF"
    return 0
  fi
  [[ $(id -u) -eq 0 ]] || cannot "needs root (the daemons run as root, munged as munge)"
  install_packages
  if [[ -e $STATE && ! -e $MARKER && -n $(ls -A "$STATE" 2>/dev/null) ]]; then
    die "$STATE exists and is not a local_cluster state folder; set MOA_SLURM_STATE"
  fi
  rm -rf "$STATE"
  mkdir -p "$STATE"/{run,log,ctld,spool,munge,mysql}
  touch "$MARKER"
  chown munge:munge "$STATE/munge" && chmod 755 "$STATE/munge"  # clients reach the socket
  chown mysql:mysql "$STATE/mysql"
  write_configs

  runuser -u munge -- mungekey -c -k "$STATE/munge/munge.key"
  runuser -u munge -- munged --socket="$STATE/munge/munge.socket.2" \
    --key-file="$STATE/munge/munge.key" --pid-file="$STATE/munge/munged.pid" \
    --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"

  mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql/data" \
    --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1
  local sock=$STATE/mysql/mysqld.sock
  setsid mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql/data" --socket="$sock" \
    --pid-file="$STATE/mysql/mariadbd.pid" --bind-address=127.0.0.1 --port=$((PORT + 3)) \
    --log-error="$STATE/mysql/error.log" --innodb-buffer-pool-size=32M \
    </dev/null >/dev/null 2>&1 &
  wait_for 30 "MariaDB" mariadb --no-defaults -S "$sock" -u root -e "SELECT 1"
  mariadb --no-defaults -S "$sock" -u root -e "
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    CREATE USER 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

  slurmdbd
  wait_for 30 "slurmdbd" sacctmgr -n list cluster
  sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
  slurmctld
  wait_for 30 "slurmctld" scontrol ping
  slurmd -N "$HOST"
  wait_for 60 "node $HOST" bash -c "sinfo -h -n '$HOST' -o %t | grep -qx idle"
  say "running: node $HOST with $CPUS CPUs; export SLURM_CONF=$SLURM_CONF"
}

stop() {
  local name pidfile binary pid group
  # Clients first, accounting next, storage and authentication last.
  for group in "slurmd slurmctld" "slurmdbd" "mariadbd munged"; do
    local pids=()
    while IFS=: read -r name pidfile binary; do
      [[ " $group " == *" $name "* ]] || continue
      pid=$(live_pid "$pidfile" "$binary")
      [[ -n $pid ]] && kill -TERM "$pid" && pids+=("$pid") && say "stopping $name (pid $pid)"
    done < <(daemons)
    for pid in "${pids[@]}"; do
      for _ in $(seq 150); do [[ -d /proc/$pid ]] || break; sleep 0.2; done
      if [[ -d /proc/$pid ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
  done
  say "stopped"
}

status() {
  local name pidfile binary pid
  while IFS=: read -r name pidfile binary; do
    pid=$(live_pid "$pidfile" "$binary")
    if [[ -n $pid ]]; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; fi
  done < <(daemons)
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 64 ;;
esac
