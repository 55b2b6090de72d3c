#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and for trying the templates.
#
#   eval "$(bash slurm/cluster.sh up)"    start munged, slurmctld and slurmd; prints `export SLURM_CONF=...`
#   bash slurm/cluster.sh status          sinfo + squeue of the running cluster
#   bash slurm/cluster.sh down            cancel every job, stop the daemons, delete the state
#
# Needs root (slurmd starts jobs as their users) and Debian's packages:
#   apt-get install slurmctld slurmd slurm-client munge
# Everything lives in one state folder, $RLHF_SLURM_DIR (default ${TMPDIR:-/tmp}/rlhf-slurm):
# slurm.conf, the munge key and socket, spool and state folders, logs, pid files. Nothing is
# written to /etc, so the cluster is found through SLURM_CONF only. Daemons run as plain
# background processes (no systemd): munged as the munge user, slurmctld and slurmd as root.
# The node is `hostname -s` with CPUs=2 (override: RLHF_SLURM_CPUS), process tracking by
# /proc (proctrack/linuxproc), no task binding (task/none), select/cons_tres; no accounting.
# Ports are free ones picked at start-up, so the cluster does not clash with a real one.
set -euo pipefail

dir="${RLHF_SLURM_DIR:-${TMPDIR:-/tmp}/rlhf-slurm}"
conf="$dir/slurm.conf"
node="$(hostname -s)"
cpus="${RLHF_SLURM_CPUS:-2}"

die() { echo "slurm/cluster.sh: $*" >&2; exit 1; }
log() { echo "slurm/cluster.sh: $*" >&2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

wait_idle() {  # the node registered and can take jobs
  local deadline=$((SECONDS + ${1:-60})) state=""
  while [ $SECONDS -lt $deadline ]; do
    state="$(SLURM_CONF="$conf" sinfo -h -n "$node" -o %T 2>/dev/null || true)"
    case "$state" in idle*|mixed*|allocated*) return 0 ;; esac
    sleep 0.3
  done
  die "node $node did not become idle within ${1:-60}s (state '${state:-none}'); logs in $dir/log"
}

up() {
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd starts jobs as their users)"
  for bin in munged slurmctld slurmd sinfo sbatch; do
    command -v "$bin" >/dev/null || die "$bin not found: apt-get install slurmctld slurmd slurm-client munge"
  done
  if alive "$dir/slurmctld.pid" && alive "$dir/slurmd.pid" && alive "$dir/munge/munged.pid"; then
    wait_idle 30
    log "already up ($dir)"
    echo "export SLURM_CONF=$conf"
    return 0
  fi
  down_quiet  # leftovers of a crashed cluster
  mkdir -p "$dir"/{state,spool,log,munge}
  chmod 755 "$dir"
  # munge: a fresh key, everything in a folder only the munge user can enter.
  dd if=/dev/urandom bs=1 count=1024 of="$dir/munge/munge.key" status=none
  chown -R munge:munge "$dir/munge"
  chmod 700 "$dir/munge"
  chmod 400 "$dir/munge/munge.key"
  runuser -u munge -- munged --force \
    --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munged.seed" \
    || die "munged failed to start; see $dir/munge/munged.log"

  local mem
  mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
  cat > "$conf" <<EOF
# Written by slurm/cluster.sh: a single-node test cluster.
ClusterName=rlhf-test
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  SLURM_CONF="$conf" slurmctld -i || die "slurmctld failed to start; see $dir/log/slurmctld.log"
  SLURM_CONF="$conf" slurmd || die "slurmd failed to start; see $dir/log/slurmd.log"
  wait_idle 60
  log "up: node $node, $cpus CPUs, state in $dir"
  echo "export SLURM_CONF=$conf"
}

stop_pidfile() {
  local f="$1" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

down_quiet() {
  if alive "$dir/slurmctld.pid"; then
    # Cancel every job first so that slurmd ends their processes before it stops.
    local jobs
    jobs="$(SLURM_CONF="$conf" squeue -h -o %i 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      SLURM_CONF="$conf" scancel $jobs 2>/dev/null || true
      for _ in $(seq 100); do
        [ -z "$(SLURM_CONF="$conf" squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.2
      done
    fi
  fi
  stop_pidfile "$dir/slurmd.pid"
  stop_pidfile "$dir/slurmctld.pid"
  stop_pidfile "$dir/munge/munged.pid"
  rm -rf "$dir"
}

case "${1:-}" in
  up) up ;;
  down) down_quiet; log "down" ;;
  status)
    alive "$dir/slurmctld.pid" || die "not running (no slurmctld for $dir)"
    SLURM_CONF="$conf" sinfo
    SLURM_CONF="$conf" squeue
    ;;
  *) echo "usage: bash slurm/cluster.sh up|down|status   (state folder: \$RLHF_SLURM_DIR, now $dir)" >&2; exit 2 ;;
esac
