#!/usr/bin/env bash
# One node's share of a SLURM training job: start `accelerate launch` for this node.
# slurm/train.sbatch runs it through `srun --ntasks-per-node=1`, once per node.
#
#   launch_node.sh MAIN_ADDR MAIN_PORT CONFIG [key=value ...]
#
# Reads SLURM_NNODES and SLURM_NODEID (set by srun); processes on this node = GPUs on it
# (SLURM_GPUS_ON_NODE, else `nvidia-smi -L`), or 1 on a CPU node; PIPELINE_PROCS_PER_NODE
# overrides. Environment:
#   PIPELINE_PYTHON         python of the project's venv (default: .venv/bin/python)
#   PIPELINE_LAUNCH_CONFIG  an Accelerate config file (launch/*.yaml); the machine counts,
#                           rank and rendezvous given here override the file's.
# Overrides are passed on as separate arguments, never through a shell string, so a value
# with spaces or `;` reaches `pipeline train` intact and is never executed.
set -euo pipefail

die() { echo "launch_node.sh: error: $*" >&2; exit 2; }

[ $# -ge 3 ] || die "usage: launch_node.sh MAIN_ADDR MAIN_PORT CONFIG [key=value ...] (got $# arguments)"
main_addr="$1"
main_port="$2"
config="$3"
shift 3

[[ "${SLURM_NNODES:-}" =~ ^[1-9][0-9]*$ ]] || die "SLURM_NNODES must be a positive integer (run under srun), got '${SLURM_NNODES:-}'"
[[ "${SLURM_NODEID:-}" =~ ^[0-9]+$ ]] || die "SLURM_NODEID must be an integer (run under srun), got '${SLURM_NODEID:-}'"
# shellcheck disable=SC2015  # die exits
[[ "$main_port" =~ ^[0-9]+$ ]] && [ "$main_port" -ge 1024 ] && [ "$main_port" -le 65535 ] \
  || die "MAIN_PORT must be an integer in [1024, 65535], got '$main_port'"
[ -n "$main_addr" ] || die "MAIN_ADDR is empty"

python="${PIPELINE_PYTHON:-.venv/bin/python}"
[ -x "$python" ] || die "PIPELINE_PYTHON='$python' is not an executable python (set PIPELINE_PYTHON to the venv's python)"

if [ -n "${PIPELINE_PROCS_PER_NODE:-}" ]; then
  [[ "$PIPELINE_PROCS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "PIPELINE_PROCS_PER_NODE must be a positive integer, got '$PIPELINE_PROCS_PER_NODE'"
  procs_per_node="$PIPELINE_PROCS_PER_NODE"
elif [[ "${SLURM_GPUS_ON_NODE:-}" =~ ^[1-9][0-9]*$ ]]; then
  procs_per_node="$SLURM_GPUS_ON_NODE"
elif command -v nvidia-smi >/dev/null 2>&1 && num_gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')" \
     && [ "$num_gpus" -gt 0 ]; then
  procs_per_node="$num_gpus"
else
  procs_per_node=1  # CPU node: one process (gloo)
fi
num_processes=$((procs_per_node * SLURM_NNODES))

# Threads per process: the CPUs SLURM gave this node split among its processes, so that
# processes sharing a node do not oversubscribe it.
if [ -z "${OMP_NUM_THREADS:-}" ] && [[ "${SLURM_CPUS_ON_NODE:-}" =~ ^[0-9]+$ ]]; then
  threads=$((SLURM_CPUS_ON_NODE / procs_per_node))
  export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi

args=(-m accelerate.commands.launch)
if [ -n "${PIPELINE_LAUNCH_CONFIG:-}" ]; then
  [ -f "$PIPELINE_LAUNCH_CONFIG" ] || die "PIPELINE_LAUNCH_CONFIG='$PIPELINE_LAUNCH_CONFIG' does not exist"
  args+=(--config_file "$PIPELINE_LAUNCH_CONFIG")
elif [ "$num_processes" -gt 1 ]; then
  # --multi_gpu also on CPU nodes: it starts one gloo process per rank there, whereas
  # `--cpu --num_processes N` quietly starts a single process.
  args+=(--multi_gpu)
fi
args+=(
  --num_machines "$SLURM_NNODES"
  --machine_rank "$SLURM_NODEID"
  --main_process_ip "$main_addr"
  --main_process_port "$main_port"
  --num_processes "$num_processes"
  -m pipeline train --config "$config" "$@"
)

echo "launch_node.sh: node ${SLURMD_NODENAME:-?} rank $SLURM_NODEID/$SLURM_NNODES, $procs_per_node process(es) here," \
     "$num_processes in all, rendezvous $main_addr:$main_port" >&2

# The batch script asks for a checkpoint by sending SIGUSR1 to the job step, which SLURM
# delivers to every process of the step: the training processes handle it (checkpoint,
# exit 75). The launcher must outlive it to collect them, but torch's elastic agent does
# not handle SIGUSR1 (default action: die). Ignoring it here is inherited through exec by
# the launcher; the training processes install their own handler, which replaces this.
trap '' USR1
# On SIGTERM (scancel, time limit) the agent SIGTERMs its ranks and SIGKILLs them after
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT (torch's default 30 s); give them the checkpoint grace
# period instead. SLURM's KillWait still bounds it (SIGKILL to the whole job).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-${PIPELINE_CHECKPOINT_WAIT_S:-150}}"
exec "$python" "${args[@]}"
