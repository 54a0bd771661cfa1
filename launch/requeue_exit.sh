#!/usr/bin/env bash
# Run a training command; exit 75 when it stopped on a signal after its preemption checkpoint.
#
#   launch/requeue_exit.sh RUN_DIR COMMAND [ARGS...]
#   e.g. launch/requeue_exit.sh runs/r1 accelerate launch --multi_gpu --num_processes 2 \
#          -m pipeline train --config configs/quickstart.yaml run.dir=runs/r1
#
# On SIGTERM the ranks of `pipeline train` checkpoint and exit 75 (REQUEUE_EXIT_CODE), but
# `accelerate launch` does not pass that on: torch's elastic agent turns its own SIGTERM into
# an exception, SIGTERMs the ranks, waits for them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by
# default, then SIGKILL) and exits 143 (128 + 15) whatever they returned. Rank 0 writes
# RUN_DIR/preempted.json once the checkpoint is complete; this script removes a stale one
# before it starts COMMAND and exits 75 if COMMAND wrote a new one, else with COMMAND's status.
#
# Signals: send them to the whole process group, as SLURM, `timeout` and Kubernetes do
# (`kill -TERM -- -PGID`). They are not forwarded from here: a second SIGTERM reaching the
# elastic agent while it waits for its ranks aborts that wait. COMMAND ignores SIGUSR1 (its
# training processes install their own handler), since the agent would die of it.
set -uo pipefail

die() { echo "requeue_exit.sh: error: $*" >&2; exit 2; }
[ $# -ge 2 ] || die "usage: requeue_exit.sh RUN_DIR COMMAND [ARGS...] (got $# arguments)"
run_dir="$1"
shift
marker="$run_dir/preempted.json"
rm -f "$marker" || die "cannot remove the stale $marker"

# Trapped (not ignored) here, so that bash waits on instead of dying; COMMAND gets the
# default actions back, as bash resets trapped signals in children.
trap ':' TERM INT HUP
trap '' USR1
"$@" &
child=$!
wait "$child"
status=$?
# A trapped signal interrupts `wait` (status > 128) while COMMAND still runs: wait again.
while [ "$status" -gt 128 ] && kill -0 "$child" 2>/dev/null; do
  wait "$child"
  status=$?
done
if [ -f "$marker" ]; then
  echo "requeue_exit.sh: $* exited $status after the preemption checkpoint ($(cat "$marker")); exiting 75" >&2
  exit 75
fi
exit "$status"
