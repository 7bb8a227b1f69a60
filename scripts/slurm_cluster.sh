#!/usr/bin/env bash
# A throwaway one-node Slurm cluster on this host (munged + slurmctld + slurmd, everything in one folder),
# for trying bytelm's Slurm scripts and for the `slurm`-marked tests (`make test-slurm`).
#
#   scripts/slurm_cluster.sh install         # apt-get install slurm-wlm munge (root; only when missing)
#   scripts/slurm_cluster.sh start DIR       # write DIR/slurm.conf, start the daemons, wait for the node idle
#   source DIR/env                           # SLURM_CONF=DIR/slurm.conf: sbatch, srun, squeue, ... use it
#   scripts/slurm_cluster.sh stop DIR        # stop the daemons this script started (pids in DIR/pids)
#   scripts/slurm_cluster.sh test [ARGS]     # install, then pytest -m slurm (the tests start/stop a cluster)
#
# The cluster: one node (this host, 127.0.0.1, BYTELM_SLURM_CPUS CPUs, default 2), one partition `debug`,
# munge with its own key and socket in DIR, free TCP ports, proctrack/linuxproc, task/none,
# select/cons_tres, no accounting. Daemons run as root in the foreground of their own sessions; only the
# pids recorded in DIR/pids are ever signalled (and only while their command line still names DIR).
# A requeued job may start again after cred_expire seconds (AuthInfo; Slurm's default is 120 s, here 5 s).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
START_TIMEOUT="${BYTELM_SLURM_START_TIMEOUT:-60}"

die() { echo "slurm_cluster: $*" >&2; exit 1; }

have_slurm() {
  local b
  for b in munged mungekey slurmctld slurmd sbatch srun scontrol sinfo squeue scancel; do
    command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || return 1
  done
}

cmd_install() {
  export PATH="$PATH:/usr/sbin:/sbin"
  if have_slurm; then
    echo "slurm_cluster: slurm-wlm and munge are installed ($(slurmctld -V))"
    return 0
  fi
  if [[ "$(id -u)" != 0 ]]; then
    echo "slurm_cluster: cannot install slurm-wlm/munge: not root (apt-get install -y slurm-wlm munge)" >&2
    return 3
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm_cluster: cannot install slurm-wlm/munge: no apt-get on this system" >&2
    return 3
  fi
  local t0=$SECONDS
  echo "slurm_cluster: installing slurm-wlm and munge (apt-get)"
  if ! timeout 600 apt-get update -qq; then
    echo "slurm_cluster: cannot install slurm-wlm/munge: apt-get update failed (no package index?)" >&2
    return 3
  fi
  if ! DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends \
      slurm-wlm munge >/dev/null; then
    echo "slurm_cluster: cannot install slurm-wlm/munge: apt-get install failed" >&2
    return 3
  fi
  have_slurm || { echo "slurm_cluster: slurm-wlm installed but its commands are missing" >&2; return 3; }
  echo "slurm_cluster: installed $(slurmctld -V) in $((SECONDS - t0)) s"
}

free_port() {
  "${PY:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# pid of a daemon we started, if it is still the same process (its command line names our folder)
alive() {
  local pid="$1" dir="$2"
  [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir"
}

cmd_stop() {
  local dir="${1:?usage: slurm_cluster.sh stop DIR}"
  dir="$(cd "$dir" && pwd)"
  [[ -f "$dir/pids" ]] || return 0
  local name pid
  # jobs still on the cluster: cancelled through Slurm (slurmd leaves running job steps behind when it stops)
  if alive "$(awk '$1 == "slurmctld" {print $2}' "$dir/pids")" "$dir" 2>/dev/null; then
    export SLURM_CONF="$dir/slurm.conf"
    local jobs
    jobs="$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)"
    if [[ -n "${jobs// /}" ]]; then
      echo "slurm_cluster: cancelling jobs still queued or running: $jobs" >&2
      # shellcheck disable=SC2086
      timeout 10 scancel $jobs || true
      for _ in $(seq 1 60); do
        [[ -z "$(timeout 10 squeue -h -o %A 2>/dev/null || true)" ]] && break
        sleep 0.5
      done
    fi
  fi
  # slurmd first (it ends the job steps it runs), then slurmctld, then munged
  for name in slurmd slurmctld munged; do
    pid="$(awk -v n="$name" '$1 == n {print $2}' "$dir/pids")"
    [[ -n "$pid" ]] || continue
    alive "$pid" "$dir" || continue
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "$pid" "$dir" || break; sleep 0.2; done
    if alive "$pid" "$dir"; then
      echo "slurm_cluster: $name ($pid) still running 10 s after SIGTERM: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  mv "$dir/pids" "$dir/pids.stopped"
  echo "slurm_cluster: stopped the cluster in $dir"
}

write_conf() {
  local dir="$1" host="$2" cpus="$3" ctld_port="$4" slurmd_port="$5"
  cat >"$dir/slurm.conf" <<EOF
# one-node test cluster written by scripts/slurm_cluster.sh (throwaway: $dir)
ClusterName=bytelmtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# munge on our own socket; a requeued job may start again 5 s after the requeue (default 120 s)
AuthInfo=socket=$dir/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
# batch jobs may be requeued (sbatch --requeue / scontrol requeue)
JobRequeue=1
# SIGTERM .. SIGKILL of a killed job; how long a finished job stays visible to scontrol show job
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
# the node's CPU count is this file's, not the host's (the tests need 2 even on a 1-core host)
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

cmd_start() {
  local dir="${1:?usage: slurm_cluster.sh start DIR}"
  export PATH="$PATH:/usr/sbin:/sbin"
  [[ "$(id -u)" == 0 ]] || die "needs root (munged and slurmd run as root here)"
  have_slurm || die "slurm-wlm/munge are not installed (scripts/slurm_cluster.sh install)"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  [[ ! -f "$dir/pids" ]] || die "a cluster is already running in $dir (stop it first)"
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/run" "$dir/log"
  chmod 700 "$dir/munge"
  local host cpus
  host="$(hostname -s)"
  cpus="${BYTELM_SLURM_CPUS:-2}"
  write_conf "$dir" "$host" "$cpus" "$(free_port)" "$(free_port)"
  echo "export SLURM_CONF=$dir/slurm.conf" >"$dir/env"
  : >"$dir/pids"

  mungekey --create --keyfile="$dir/munge/munge.key" --force >/dev/null 2>&1 \
    || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 600 "$dir/munge/munge.key"
  setsid munged --foreground --force --socket="$dir/munge/munge.socket.2" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" \
    </dev/null >>"$dir/log/munged.out" 2>&1 &
  echo "munged $!" >>"$dir/pids"
  local t0=$SECONDS
  until [[ -S "$dir/munge/munge.socket.2" ]]; do
    ((SECONDS - t0 < START_TIMEOUT)) || { cat "$dir/log/munged.out" >&2; cmd_stop "$dir"; die "munged did not start"; }
    sleep 0.1
  done

  export SLURM_CONF="$dir/slurm.conf"
  setsid slurmctld -D -c -i -f "$SLURM_CONF" </dev/null >>"$dir/log/slurmctld.out" 2>&1 &
  echo "slurmctld $!" >>"$dir/pids"
  setsid slurmd -D -f "$SLURM_CONF" </dev/null >>"$dir/log/slurmd.out" 2>&1 &
  echo "slurmd $!" >>"$dir/pids"

  # ready: the node is idle
  local state=""
  while true; do
    state="$(timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true)"
    [[ "$state" == idle ]] && break
    local pid
    for pid in $(awk '{print $2}' "$dir/pids"); do
      alive "$pid" "$dir" || {
        tail -n 20 "$dir"/log/*.log "$dir"/log/*.out >&2 || true
        cmd_stop "$dir"; die "a daemon exited during start-up (logs in $dir/log)"; }
    done
    if ((SECONDS - t0 >= START_TIMEOUT)); then
      tail -n 20 "$dir"/log/*.log >&2 || true
      cmd_stop "$dir"
      die "node not idle after ${START_TIMEOUT} s (state: '${state:-no answer}'; logs in $dir/log)"
    fi
    sleep 0.5
  done
  echo "slurm_cluster: node $host idle ($cpus CPUs) after $((SECONDS - t0)) s; SLURM_CONF=$SLURM_CONF"
}

cmd_test() {
  local rc=0 t0=$SECONDS
  cmd_install || rc=$?
  if ((rc != 0 && rc != 3)); then return "$rc"; fi
  # rc 3: cannot install here; the tests then skip, each with that reason (pytest -rs prints it)
  cd "$ROOT"
  # the tests start the cluster in this folder and stop it; the trap stops it too if pytest itself is killed
  local dir
  dir="$(mktemp -d "${TMPDIR:-/tmp}/bytelm-slurm.XXXXXX")"
  # shellcheck disable=SC2064
  trap "cmd_stop '$dir' >/dev/null 2>&1 || true" EXIT
  rc=0
  # the real-Slurm tests live in tests/test_slurm*.py (collecting the whole suite for -m slurm takes ~20 s)
  BYTELM_SLURM_DIR="$dir" "${PY:-python3}" -m pytest -q -rs -m slurm --durations=0 tests/test_slurm*.py "$@" || rc=$?
  if ((rc == 0)); then
    rm -rf "$dir"
  else
    echo "slurm_cluster: tests failed (exit $rc); the cluster's config and logs are in $dir" >&2
  fi
  echo "slurm_cluster: test-slurm took $((SECONDS - t0)) s"
  return "$rc"
}

case "${1:-}" in
  install) shift; cmd_install "$@" ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  test) shift; cmd_test "$@" ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
