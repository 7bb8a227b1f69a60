#!/usr/bin/env bash
# A throwaway Slurm cluster on this host (munged + slurmctld + one slurmd, or two in network namespaces with
# start2; everything in one folder), for trying bytelm's Slurm scripts and for the `slurm`-marked tests
# (`make test-slurm`).
#
#   scripts/slurm_cluster.sh install         # apt-get install slurm-wlm munge iproute2 (root; when missing)
#   scripts/slurm_cluster.sh start DIR       # write DIR/slurm.conf, start the daemons, wait for the node idle
#   source DIR/env                           # SLURM_CONF=DIR/slurm.conf: sbatch, srun, squeue, ... use it
#   scripts/slurm_cluster.sh stop DIR        # stop the daemons this script started (pids in DIR/pids)
#   scripts/slurm_cluster.sh start2 DIR      # a two-node cluster: one slurmd per network namespace (below)
#   scripts/slurm_cluster.sh test [ARGS]     # install, then pytest -m slurm (the tests start/stop a cluster)
#
# The cluster: one node (this host, 127.0.0.1, BYTELM_SLURM_CPUS CPUs, default 2), one partition `debug`,
# munge with its own key and socket in DIR, free TCP ports, proctrack/linuxproc, task/none,
# select/cons_tres, no accounting. Daemons run as root in the foreground of their own sessions; only the
# pids recorded in DIR/pids are ever signalled (and only while their command line still names DIR).
# A requeued job may start again after cred_expire seconds (AuthInfo; Slurm's default is 120 s, here 5 s).
#
# Two nodes (start2): each slurmd runs in a network namespace of its own (`ip netns`) and a UTS namespace of
# its own (`unshare --uts`: its own hostname), with one end of a veth pair as its eth0 and an address of a
# private /24 that exists only here (10.213.X.0/24, X free); the other ends join a bridge in the host's
# namespace, which holds slurmctld (and sbatch/scontrol of whoever submits) at 10.213.X.1. Node names resolve
# through iproute2's per-namespace hosts files (/etc/netns/NAME/hosts, bind-mounted over /etc/hosts in the
# slurmd's own mount namespace, as `ip netns exec` does); the host's own files are untouched. munged is shared
# (one socket on the shared disk).
# Every namespace, link, /etc/netns folder and daemon is recorded in DIR/net and DIR/pids and removed by
# `stop` by name or pid, along with any process still inside the namespaces (job steps).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
START_TIMEOUT="${BYTELM_SLURM_START_TIMEOUT:-60}"

die() { echo "slurm_cluster: $*" >&2; exit 1; }

have() {
  local b
  for b in "$@"; do
    command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || return 1
  done
}
have_slurm() { have munged mungekey slurmctld slurmd sbatch srun scontrol sinfo squeue scancel; }
# the two-node cluster also needs iproute2 (ip) and util-linux (nsenter, unshare)
have_netns() { have ip nsenter unshare; }

cmd_install() {
  export PATH="$PATH:/usr/sbin:/sbin"
  if have_slurm && have_netns; then
    echo "slurm_cluster: slurm-wlm, munge and iproute2 are installed ($(slurmctld -V))"
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
  echo "slurm_cluster: installing slurm-wlm, munge and iproute2 (apt-get)"
  if ! timeout 600 apt-get update -qq; then
    echo "slurm_cluster: cannot install slurm-wlm/munge: apt-get update failed (no package index?)" >&2
    return 3
  fi
  if ! DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends \
      slurm-wlm munge iproute2 util-linux >/dev/null; then
    echo "slurm_cluster: cannot install slurm-wlm/munge: apt-get install failed" >&2
    return 3
  fi
  have_slurm || { echo "slurm_cluster: slurm-wlm installed but its commands are missing" >&2; return 3; }
  have_netns || echo "slurm_cluster: iproute2/util-linux installed but ip, nsenter or unshare is missing" >&2
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
  [[ -d "$dir" ]] || return 0
  dir="$(cd "$dir" && pwd)"
  [[ -f "$dir/pids" ]] || { remove_net "$dir"; return 0; }
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
    for pid in $(awk -v n="$name" '$1 == n {print $2}' "$dir/pids"); do
      alive "$pid" "$dir" || continue
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do alive "$pid" "$dir" || break; sleep 0.2; done
      if alive "$pid" "$dir"; then
        echo "slurm_cluster: $name ($pid) still running 10 s after SIGTERM: SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done
  done
  remove_net "$dir"
  mv "$dir/pids" "$dir/pids.stopped"
  echo "slurm_cluster: stopped the cluster in $dir"
}

# the namespaces, links and /etc/netns folders a two-node cluster made (DIR/net), and any process still in
# those namespaces (job steps a stopped slurmd left behind): removed by name / pid
remove_net() {
  local dir="$1" kind name pid sig
  [[ -f "$dir/net" ]] || return 0
  while read -r kind name; do
    [[ "$kind" == netns ]] || continue
    ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF -- "$name" || continue
    for sig in TERM KILL; do
      for pid in $(ip netns pids "$name" 2>/dev/null); do kill "-$sig" "$pid" 2>/dev/null || true; done
      for _ in $(seq 1 25); do [[ -z "$(ip netns pids "$name" 2>/dev/null)" ]] && break; sleep 0.2; done
    done
  done <"$dir/net"
  while read -r kind name; do
    case "$kind" in
      link) if ip link show "$name" >/dev/null 2>&1; then ip link del "$name" || true; fi ;;
      netns)
        if ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF -- "$name"; then ip netns del "$name" || true; fi ;;
      etc) if [[ "$name" == /etc/netns/* ]]; then rm -rf -- "$name"; fi ;;
      etcdir) if [[ "$name" == /etc/netns ]]; then rmdir -- "$name" 2>/dev/null || true; fi ;;  # if empty
    esac
  done < <(tac "$dir/net")
  mv "$dir/net" "$dir/net.removed"
}

# write_conf DIR CTLD_HOST CTLD_ADDR CTLD_PORT SLURMD_PORT NODE_LINES PARTITION_NODES
write_conf() {
  local dir="$1" host="$2" addr="$3" ctld_port="$4" slurmd_port="$5" nodes="$6" partition="$7"
  cat >"$dir/slurm.conf" <<EOF
# test cluster written by scripts/slurm_cluster.sh (throwaway: $dir)
ClusterName=bytelmtest
SlurmctldHost=$host($addr)
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
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
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
$nodes
PartitionName=debug Nodes=$partition Default=YES MaxTime=INFINITE State=UP
EOF
}

# start_common DIR: checks, folders; sets the globals DIR (absolute) and T0
start_common() {
  DIR="$1"
  export PATH="$PATH:/usr/sbin:/sbin"
  [[ "$(id -u)" == 0 ]] || die "needs root (munged and slurmd run as root here)"
  have_slurm || die "slurm-wlm/munge are not installed (scripts/slurm_cluster.sh install)"
  mkdir -p "$DIR"
  DIR="$(cd "$DIR" && pwd)"
  [[ ! -f "$DIR/pids" ]] || die "a cluster is already running in $DIR (stop it first)"
  # slurmd's job sockets are DIR/spool/NODE/NODE_JOBID.STEPID: a Unix socket path has at most 108 bytes
  ((${#DIR} <= 60)) || die "folder path too long for slurmd's sockets (${#DIR} > 60 characters): $DIR"
  mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log"
  chmod 700 "$DIR/munge"
  echo "export SLURM_CONF=$DIR/slurm.conf" >"$DIR/env"
  : >"$DIR/pids"
  T0=$SECONDS
}

start_munged() {
  local dir="$1"
  mungekey --create --keyfile="$dir/munge/munge.key" --force >/dev/null 2>&1 \
    || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 600 "$dir/munge/munge.key"
  setsid munged --foreground --force --socket="$dir/munge/munge.socket.2" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" \
    </dev/null >>"$dir/log/munged.out" 2>&1 &
  echo "munged $!" >>"$dir/pids"
  until [[ -S "$dir/munge/munge.socket.2" ]]; do
    ((SECONDS - T0 < START_TIMEOUT)) || { cat "$dir/log/munged.out" >&2; cmd_stop "$dir"; die "munged did not start"; }
    sleep 0.1
  done
}

start_slurmctld() {
  local dir="$1"
  export SLURM_CONF="$dir/slurm.conf"
  setsid slurmctld -D -c -i -f "$SLURM_CONF" </dev/null >>"$dir/log/slurmctld.out" 2>&1 &
  echo "slurmctld $!" >>"$dir/pids"
}

# wait_idle DIR N: until sinfo shows N nodes, all idle (a daemon that exits, or the timeout, stops everything)
wait_idle() {
  local dir="$1" want="$2" states="" pid
  while true; do
    states="$(timeout 10 sinfo -h -N -o '%T' 2>/dev/null | sort | uniq -c | awk '{print $2 ":" $1}' | xargs || true)"
    [[ "$states" == "idle:$want" ]] && break
    for pid in $(awk '{print $2}' "$dir/pids"); do
      alive "$pid" "$dir" || {
        tail -n 20 "$dir"/log/*.log "$dir"/log/*.out >&2 || true
        cmd_stop "$dir"; die "a daemon exited during start-up (logs in $dir/log)"; }
    done
    if ((SECONDS - T0 >= START_TIMEOUT)); then
      tail -n 20 "$dir"/log/*.log >&2 || true
      cmd_stop "$dir"
      die "$want node(s) not idle after ${START_TIMEOUT} s (states: '${states:-no answer}'; logs in $dir/log)"
    fi
    sleep 0.5
  done
}

cmd_start() {
  start_common "${1:?usage: slurm_cluster.sh start DIR}"
  local dir="$DIR" host cpus
  host="$(hostname -s)"
  cpus="${BYTELM_SLURM_CPUS:-2}"
  write_conf "$dir" "$host" 127.0.0.1 "$(free_port)" "$(free_port)" \
    "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN" "$host"
  start_munged "$dir"
  start_slurmctld "$dir"
  setsid slurmd -D -f "$SLURM_CONF" </dev/null >>"$dir/log/slurmd.out" 2>&1 &
  echo "slurmd $!" >>"$dir/pids"
  wait_idle "$dir" 1
  echo "slurm_cluster: node $host idle ($cpus CPUs) after $((SECONDS - T0)) s; SLURM_CONF=$SLURM_CONF"
}

# a /24 of 10.213.0.0/16 that no interface or route of this host uses
free_subnet() {
  local used x
  used="$( (ip -4 -o addr show; ip -4 route show; ip netns list) 2>/dev/null || true)"
  for _ in $(seq 1 50); do
    x=$((RANDOM % 250 + 2))
    grep -qF "10.213.$x." <<<"$used" || { echo "$x"; return 0; }
  done
  die "no free 10.213.X.0/24 subnet"
}

cmd_start2() {
  start_common "${1:?usage: slurm_cluster.sh start2 DIR}"
  local dir="$DIR" host cpus id x br i ns node veth nodes="" hosts
  have_netns || die "needs ip (iproute2), nsenter and unshare (util-linux): scripts/slurm_cluster.sh install"
  host="$(hostname -s)"
  cpus="${BYTELM_SLURM_CPUS:-2}"
  # names unique to this cluster (several may run side by side): interface names have at most 15 characters
  id="$(printf '%04x' $((RANDOM % 65536)))"
  x="$(free_subnet)"
  br="blm${id}br"
: >"$dir/net"
  [[ -d /etc/netns ]] || echo "etcdir /etc/netns" >>"$dir/net"  # made here: removed again (when empty)
  echo "10.213.$x.0/24" >"$dir/subnet"
  hosts="127.0.0.1 localhost"$'\n'"10.213.$x.1 $host"
  for i in 1 2; do hosts+=$'\n'"10.213.$x.$((10 + i)) blm${id}-n$i"; done
  # the bridge (host side, slurmctld's address) and one namespace + veth pair per node
  echo "link $br" >>"$dir/net"
  ip link add "$br" type bridge || { cmd_stop "$dir"; die "cannot create bridge $br"; }
  ip addr add "10.213.$x.1/24" dev "$br"
  ip link set "$br" up
  for i in 1 2; do
    ns="bytelm-${id}-n$i"; node="blm${id}-n$i"; veth="blm${id}v$i"
    echo "etc /etc/netns/$ns" >>"$dir/net"
    mkdir -p "/etc/netns/$ns"
    printf '%s\n' "$hosts" >"/etc/netns/$ns/hosts"
    echo "netns $ns" >>"$dir/net"
    ip netns add "$ns" || { cmd_stop "$dir"; die "cannot create network namespace $ns"; }
    echo "link $veth" >>"$dir/net"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$br" up
    ip -n "$ns" addr add "10.213.$x.$((10 + i))/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    echo "$node $ns $veth 10.213.$x.$((10 + i))" >>"$dir/nodes"
    nodes+="NodeName=$node NodeAddr=10.213.$x.$((10 + i)) NodeHostname=$node CPUs=$cpus State=UNKNOWN"$'\n'
  done
  write_conf "$dir" "$host" "10.213.$x.1" "$(free_port)" 6818 "${nodes%$'\n'}" "blm${id}-n[1-2]"
  start_munged "$dir"
  start_slurmctld "$dir"
  for i in 1 2; do
    ns="bytelm-${id}-n$i"; node="blm${id}-n$i"
    mkdir -p "$dir/spool/$node"
    # its own network stack (nsenter --net), hostname (unshare --uts) and /etc/hosts: the namespace's
    # /etc/netns/NAME/hosts bound over it in a mount namespace of its own, as `ip netns exec` does (which
    # cannot be used here: it also mounts a fresh /sys, without the /sys/fs/cgroup slurmd needs)
    setsid nsenter --net="/run/netns/$ns" unshare --mount --uts -- sh -c \
      'mount --bind "$2" /etc/hosts && hostname "$0" && exec slurmd -D -N "$0" -f "$1"' \
      "$node" "$SLURM_CONF" "/etc/netns/$ns/hosts" </dev/null >>"$dir/log/slurmd-$node.out" 2>&1 &
    echo "slurmd $!" >>"$dir/pids"
  done
  wait_idle "$dir" 2
  echo "slurm_cluster: nodes blm${id}-n[1-2] (10.213.$x.11, .12; namespaces bytelm-${id}-n1, -n2; bridge $br)" \
    "idle after $((SECONDS - T0)) s; SLURM_CONF=$SLURM_CONF"
}

cmd_test() {
  local rc=0 t0=$SECONDS
  cmd_install || rc=$?
  if ((rc != 0 && rc != 3)); then return "$rc"; fi
  # rc 3: cannot install here; the tests then skip, each with that reason (pytest -rs prints it)
  cd "$ROOT"
  # the tests start the clusters in this folder (the two-node one in DIR/two-nodes) and stop them; the trap
  # stops them too (daemons, namespaces, links) if pytest itself is killed
  local dir
  dir="$(mktemp -d "${TMPDIR:-/tmp}/bytelm-slurm.XXXXXX")"
  # shellcheck disable=SC2064
  trap "cmd_stop '$dir/two-nodes' >/dev/null 2>&1 || true; cmd_stop '$dir' >/dev/null 2>&1 || true" EXIT
  rc=0
  # the real-Slurm tests live in tests/slurm/test_slurm*.py (collecting the whole suite for -m slurm takes ~20 s)
  BYTELM_SLURM_DIR="$dir" "${PY:-python3}" -m pytest -q -rs -m slurm --durations=0 tests/slurm/test_slurm*.py "$@" || rc=$?
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
  start2) shift; cmd_start2 "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  test) shift; cmd_test "$@" ;;
  *) sed -n '2,28p' "$0"; exit 2 ;;
esac
