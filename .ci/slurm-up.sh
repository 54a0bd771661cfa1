#!/usr/bin/env bash
# Bring up (or check) a real local 2-node SLURM cluster: munged, slurmctld and two slurmd
# ("n1", "n2") on this host, without systemd. Run as root. Idempotent: when everything is
# already up with the current config it returns in well under a second.
#
#   bash .ci/slurm-up.sh           # install if needed, start what is not running, wait
#   SLURM_UP_TIMEOUT_S=60 bash .ci/slurm-up.sh
#
# Exits non-zero with the daemon logs printed when the cluster does not come up.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
template="$here/slurm/slurm.conf.in"
conf=/etc/slurm/slurm.conf
log_dir=/var/log/slurm
timeout_s="${SLURM_UP_TIMEOUT_S:-30}"
nodes=(n1 n2)

die() {
  echo "slurm-up: error: $*" >&2
  for f in "$log_dir"/munged.log "$log_dir"/slurmctld.log "$log_dir"/slurmd-n1.log "$log_dir"/slurmd-n2.log \
           "$log_dir"/slurmctld.stdout "$log_dir"/slurmd-n1.stdout "$log_dir"/slurmd-n2.stdout; do
    if [ -s "$f" ]; then
      echo "----- last lines of $f -----" >&2
      tail -n 30 "$f" >&2
    fi
  done
  exit 1
}

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts system daemons)"
[ -f "$template" ] || die "config template $template is missing"

# --- packages -------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sinfo >/dev/null \
   || ! command -v munged >/dev/null; then
  echo "slurm-up: installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/tmp/slurm-up-apt.log 2>&1 \
    || { tail -n 30 /tmp/slurm-up-apt.log >&2; die "apt-get install of slurm/munge failed (log above)"; }
fi

mkdir -p "$log_dir" /var/spool/slurmctld /etc/slurm
for n in "${nodes[@]}"; do mkdir -p "/var/spool/slurmd/$n"; done

# --- config ---------------------------------------------------------------------------
host="$(hostname -s)"
[ -n "$host" ] || die "hostname -s is empty"
rendered="$(sed "s/@HOST@/$host/g" "$template")"
config_changed=0
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$rendered" ]; then
  printf '%s\n' "$rendered" >"$conf"
  config_changed=1
fi
# Debian's plugstack.conf includes a directory that may be empty: harmless. No cgroup.conf
# is needed with proctrack/linuxproc and task/none.

# --- helpers --------------------------------------------------------------------------
# pid_alive PIDFILE NAME: the pid in PIDFILE is a running process whose command is NAME.
pid_alive() {
  local pid
  [ -s "$1" ] || return 1
  pid="$(cat "$1")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

stop_pidfile() {
  local pid
  pid_alive "$1" "$2" || return 0
  pid="$(cat "$1")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

# start_detached LOGFILE CMD...: own session, no controlling terminal, survives this script.
start_detached() {
  local out="$1"; shift
  setsid nohup "$@" </dev/null >>"$out" 2>&1 &
}

# --- munge ----------------------------------------------------------------------------
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  if [ ! -s /etc/munge/munge.key ]; then
    echo "slurm-up: creating munge key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key
  chmod 700 /etc/munge
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 755 /run/munge
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  echo "slurm-up: starting munged"
  start_detached "$log_dir/munged.log" setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged did not start (munge -n | unmunge fails)"
fi

# --- slurm daemons --------------------------------------------------------------------
# A controller that was not running when this script started is a fresh start (a new
# machine or CI run): jobs in its saved state are leftovers, cancelled below.
fresh_controller=1
pid_alive /run/slurmctld.pid slurmctld && fresh_controller=0
if [ "$config_changed" = 1 ]; then
  # Daemons read slurm.conf at start; restart any that run with an older config.
  for n in "${nodes[@]}"; do stop_pidfile "/run/slurmd-$n.pid" slurmd; done
  stop_pidfile /run/slurmctld.pid slurmctld
fi

if ! pid_alive /run/slurmctld.pid slurmctld; then
  echo "slurm-up: starting slurmctld"
  start_detached "$log_dir/slurmctld.stdout" slurmctld -D
fi
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer 'scontrol ping'"

for n in "${nodes[@]}"; do
  if ! pid_alive "/run/slurmd-$n.pid" slurmd; then
    echo "slurm-up: starting slurmd -N $n"
    start_detached "$log_dir/slurmd-$n.stdout" slurmd -D -N "$n"
  fi
done

# --- wait until both nodes are usable -------------------------------------------------
resumed=0
deadline=$((SECONDS + timeout_s))
while :; do
  states="$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)"
  ok=1
  for n in "${nodes[@]}"; do
    st="$(awk -v n="$n" '$1 == n {print $2}' <<<"$states")"
    case "$st" in
      idle | mixed | allocated | completing) ;;
      down* | drain* | fail*)
        ok=0
        if [ "$resumed" = 0 ]; then
          # Left down by an earlier unclean stop: the daemons are running now.
          scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true
        fi
        ;;
      *) ok=0 ;;
    esac
  done
  [ "$ok" = 1 ] && break
  resumed=1
  if [ "$SECONDS" -ge "$deadline" ]; then
    die "nodes not up after ${timeout_s}s; sinfo says: $(tr '\n' ' ' <<<"$states")"
  fi
  sleep 0.2
done

if [ "$fresh_controller" = 1 ]; then
  # Jobs left in the saved state by a previous boot of this machine would rerun now.
  stale="$(squeue -h -o '%i' | sort -u | tr '\n' ' ')"
  if [ -n "${stale// /}" ]; then
    echo "slurm-up: cancelling jobs left from before this start: $stale"
    # shellcheck disable=SC2086  # job ids are plain integers from squeue
    scancel $stale || true
  fi
fi

echo "slurm-up: cluster up: $(sinfo -h -N -o '%N=%T' | sort -u | tr '\n' ' ')"
