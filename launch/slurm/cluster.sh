#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for testing the sbatch scripts end to end.
#
#   bash launch/slurm/cluster.sh install          # Debian's slurmctld/slurmd/slurm-client (root, once)
#   bash launch/slurm/cluster.sh up   DIR         # write DIR/slurm.conf, start both daemons, wait for the node
#   export SLURM_CONF=DIR/slurm.conf              # then sbatch/squeue/scontrol/scancel talk to this cluster
#   bash launch/slurm/cluster.sh down DIR         # cancel jobs, stop the daemons, check nothing is left running
#   bash launch/slurm/cluster.sh status DIR       # daemons and node state
#
# Everything lives under DIR (config, state, spool, pid files, logs), on free ports, so several clusters can
# coexist and nothing in /etc is touched. The settings are the minimum that works without root services:
#   - auth/none + cred/none: no munge daemon.
#   - proctrack/linuxproc + task/none: no cgroups (PID 1 need not be systemd).
#   - cred_expire=5: a requeued job may start again 5 s after it ended instead of waiting out the default
#     credential lifetime (~2 min).
#   - RealMemory <= 90% of MemTotal: declaring more than the node has marks it invalid.
# The daemons run as the invoking user (root in CI); jobs run as that user.
set -euo pipefail
# The daemons live in sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

usage() {
  sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
}

log() { echo "[cluster] $*" >&2; }
die() { echo "[cluster] error: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------------------------ install
install_slurm() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
    log "slurm already installed: $(slurmctld -V)"
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "installing Slurm needs root (apt-get install slurmctld slurmd slurm-client)"
  command -v apt-get >/dev/null || die "installing Slurm needs apt-get (Debian/Ubuntu); install slurmctld, slurmd, slurm-client by hand"
  log "installing slurmctld slurmd slurm-client with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  # Two test runs starting at once queue on dpkg's lock instead of failing.
  local apt=(apt-get -o DPkg::Lock::Timeout=300 -y -qq)
  if ! "${apt[@]}" install --no-install-recommends slurmctld slurmd slurm-client >/dev/null 2>&1; then
    # A fresh machine may have no package lists yet.
    "${apt[@]}" update >/dev/null || die "apt-get update failed"
    "${apt[@]}" install --no-install-recommends slurmctld slurmd slurm-client >/dev/null || die "apt-get install failed"
  fi
  command -v slurmctld >/dev/null || die "apt-get finished but slurmctld is not on PATH"
  log "installed $(slurmctld -V)"
}

# ------------------------------------------------------------------------------------------------ helpers
# A TCP port nobody listens on (checked in /proc/net/tcp{,6}: no ss/netstat needed).
port_is_listening() {
  local hex
  hex=$(printf ':%04X' "$1")
  cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }'
}

free_port() {
  local port tries=0
  while :; do
    port=$((20000 + RANDOM % 10000))
    if ! port_is_listening "$port" && ! port_is_listening $((port + 1)); then
      echo "$port"
      return 0
    fi
    tries=$((tries + 1))
    [ "$tries" -lt 200 ] || die "no free TCP port pair found in 20000-29999"
  done
}

# Process state letter (R, S, Z, ...) or empty when the pid does not exist. Zombies count as gone: an exited
# daemon that was re-parented to a PID 1 which does not reap stays in the table as Z. (Bash builtins only:
# teardown checks many processes and forks are slow on a loaded machine.)
proc_state() {
  local stat
  { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 0
  stat=${stat##*) }   # after the parenthesised command name, which may contain spaces
  echo "${stat%% *}"
}

proc_alive() {
  local s
  s=$(proc_state "$1")
  [ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ]
}

# Live processes of this cluster: the two daemons (started with HGRN_SLURM_CLUSTER=DIR in their environment),
# the slurmstepd daemons of its jobs (they start with an empty environment, but work in DIR/log), and all
# their descendants (job processes). Neither test matches a client, so the caller is never included.
cluster_pids() {
  local dir=$1 file pid ppid rest comm changed
  local -A parent=() keep=()
  # One grep over every environment (NUL-separated records, whole-record match) finds the marked processes.
  while IFS= read -r -d '' file; do
    file=${file#/proc/}
    keep[${file%%/*}]=1
  done < <(grep -lsxzF --null "HGRN_SLURM_CLUSTER=$dir" /proc/[0-9]*/environ 2>/dev/null)
  # One find over every working directory finds the slurm* processes working inside DIR.
  while IFS= read -r -d '' file; do
    pid=${file#/proc/}
    pid=${pid%%/*}
    { read -r comm <"/proc/$pid/comm"; } 2>/dev/null || continue
    [[ $comm == slurm* ]] && keep[$pid]=1
  done < <(find /proc/[0-9]*/cwd -maxdepth 0 \( -lname "$dir" -o -lname "$dir/*" \) -print0 2>/dev/null)
  for file in /proc/[0-9]*/stat; do
    { read -r rest <"$file"; } 2>/dev/null || continue
    pid=${rest%% *}
    rest=${rest##*) }
    rest=${rest#* }
    ppid=${rest%% *}
    parent[$pid]=$ppid
  done
  # Close over descendants: repeat until no new child of a kept process appears.
  changed=1
  while [ "$changed" = 1 ]; do
    changed=0
    for pid in "${!parent[@]}"; do
      if [ -z "${keep[$pid]:-}" ] && [ -n "${keep[${parent[$pid]}]:-}" ]; then keep[$pid]=1; changed=1; fi
    done
  done
  for pid in "${!keep[@]}"; do
    [ "$pid" != "$$" ] && proc_alive "$pid" && echo "$pid"
  done | sort -n
  return 0
}

read_pidfile() { [ -s "$1" ] && tr -dc '0-9' <"$1" || true; }

# Wait up to $2 seconds for pid $1 to be gone (or a zombie).
wait_gone() {
  local pid=$1 deadline=$((SECONDS + $2))
  while proc_alive "$pid"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# ------------------------------------------------------------------------------------------------ up
write_conf() {
  local dir=$1 conf=$1/slurm.conf cpus mem_mb ctld_port slurmd_port
  cpus=$(nproc)
  # RealMemory at most 90% of MemTotal (kB -> MB): a node declaring more than it has is put in INVAL state.
  mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
  ctld_port=${HGRN_SLURMCTLD_PORT:-$(free_port)}
  slurmd_port=$((ctld_port + 1))
  mkdir -p "$dir"/{state,spool,run,log}
  cat >"$conf.tmp" <<EOF
# Single-node test cluster written by launch/slurm/cluster.sh; see that script for why each setting.
ClusterName=hgrntest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
# Keep finished jobs visible to scontrol for 10 minutes (tests read their state and restart count).
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmdTimeout=120
MessageTimeout=20
MailProg=/bin/true
PlugStackConfig=$dir/plugstack.conf
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  : >"$dir/plugstack.conf"
  mv "$conf.tmp" "$conf"
}

node_state() {
  SLURM_CONF=$1 sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true
}

cluster_up() {
  local dir conf deadline state
  [ $# -eq 1 ] || usage
  mkdir -p "$1"
  dir=$(cd "$1" && pwd)
  conf=$dir/slurm.conf
  install_slurm
  if [ -f "$dir/run/slurmctld.pid" ] && proc_alive "$(read_pidfile "$dir/run/slurmctld.pid")"; then
    die "a cluster is already running in $dir (bash $0 down $dir first)"
  fi
  write_conf "$dir"
  export SLURM_CONF=$conf
  # -c: start from a clean state (no jobs from an earlier cluster in the same directory).
  # The marker variable identifies this cluster's daemons and their children at teardown.
  HGRN_SLURM_CLUSTER=$dir slurmctld -c -f "$conf" || die "slurmctld failed to start; see $dir/log/slurmctld.log"
  HGRN_SLURM_CLUSTER=$dir slurmd -f "$conf" || die "slurmd failed to start; see $dir/log/slurmd.log"
  deadline=$((SECONDS + ${HGRN_SLURM_START_TIMEOUT:-60}))
  while :; do
    state=$(node_state "$conf")
    case "$state" in
      idle) break ;;
      *inval* | *drain* | *down* | *fail*)
        if [ "$SECONDS" -ge $((deadline - 50)) ]; then
          die "node state '$state'; reason: $(SLURM_CONF=$conf sinfo -h -R -o '%E' 2>/dev/null); logs in $dir/log"
        fi ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || die "node not idle after ${HGRN_SLURM_START_TIMEOUT:-60} s (state '$state'); logs in $dir/log"
    sleep 0.3
  done
  log "up: $conf (slurmctld pid $(read_pidfile "$dir/run/slurmctld.pid"), slurmd pid $(read_pidfile "$dir/run/slurmd.pid"), $(nproc) CPUs)"
  echo "export SLURM_CONF=$conf"
}

# ------------------------------------------------------------------------------------------------ down
cluster_down() {
  local dir conf pid name left
  [ $# -eq 1 ] || usage
  [ -d "$1" ] || die "no cluster directory $1"
  dir=$(cd "$1" && pwd)
  conf=$dir/slurm.conf
  export SLURM_CONF=$conf
  # Cancel jobs first so their steps end while slurmd can still clean up after them.
  if pid=$(read_pidfile "$dir/run/slurmctld.pid") && [ -n "$pid" ] && proc_alive "$pid"; then
    scancel --quiet --full --signal=KILL --state=RUNNING "--user=$(id -un)" 2>/dev/null || true
    scancel --quiet "--user=$(id -un)" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while [ -n "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && [ "$SECONDS" -lt "$deadline" ]; do
      sleep 0.3
    done
  fi
  for name in slurmd slurmctld; do
    pid=$(read_pidfile "$dir/run/$name.pid")
    [ -n "$pid" ] || continue
    if proc_alive "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      wait_gone "$pid" 15 || { log "$name ($pid) ignored SIGTERM; killing"; kill -KILL "$pid" 2>/dev/null || true; wait_gone "$pid" 5 || true; }
    fi
  done
  # Anything else of this cluster (a slurmstepd or job process that outlived its job).
  left=$(cluster_pids "$dir")
  if [ -n "$left" ]; then
    log "stopping leftover processes of this cluster: $(echo $left)"
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
    for pid in $left; do wait_gone "$pid" 5 || true; done
    left=$(cluster_pids "$dir")
    [ -z "$left" ] || die "processes still running after teardown: $(echo $left)"
  fi
  log "down: $dir"
}

cluster_status() {
  local dir name pid
  [ $# -eq 1 ] || usage
  dir=$(cd "$1" && pwd)
  for name in slurmctld slurmd; do
    pid=$(read_pidfile "$dir/run/$name.pid")
    if [ -n "$pid" ] && proc_alive "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; fi
  done
  echo "node: $(node_state "$dir/slurm.conf")"
  echo "cluster processes: $(cluster_pids "$dir" | tr '\n' ' ')"
}

case "${1:-}" in
  install) install_slurm ;;
  up) shift; cluster_up "$@" ;;
  down) shift; cluster_down "$@" ;;
  status) shift; cluster_status "$@" ;;
  *) usage ;;
esac
