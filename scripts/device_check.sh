#!/usr/bin/env bash
# The GPU check (issue 18, section 4), one command on a machine with one CUDA GPU and no network:
#
#   make device-wheels                      # here, with network: wheels the device lacks -> device-wheels/
#   scripts/device_check.sh [--out DIR]     # there: install them, CUDA tests, benches, one JSON summary
#
# Steps (each under its own time limit; together at most 520 s, within the 8 minutes a check may take):
#   1. pip install --no-index --no-deps --target SITE  the wheels of device-wheels/ (PYTHONPATH=SITE)
#   2. pytest -m gpu tests/gpu                 bf16 autocast, single-GPU DDP / FSDP / ZeRO paths, EMA,
#                                              checkpoint save + resume on the GPU
#   3. pipeline bench train --device cuda      samples/s, step time, peak GPU memory, MFU
#   4. pipeline bench scale --device cuda      at 10M and 100M parameters, bf16
#   5. DIR/device_check.json                   one object: each step's exit code and JSON, the GPU
# The summary is written even when a step fails; the exit code is the first failing step's.
#
# Options: --out DIR (default $OUT, else device-check-out), --wheels DIR (default device-wheels),
#          --site DIR (default /tmp/pipeline-device-site), --python PY (default python3),
#          --skip-bench, --dry-run (print what would run, run nothing), -h/--help.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "device_check.sh: $*" >&2; exit 2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-device-check-out}"
WHEELS="device-wheels"
SITE="/tmp/pipeline-device-site"
PY="python3"
DRY_RUN=0
SKIP_BENCH=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT_DIR="$2"; shift 2 ;;
        --wheels) [ $# -ge 2 ] || die "--wheels needs a directory"; WHEELS="$2"; shift 2 ;;
        --site) [ $# -ge 2 ] || die "--site needs a directory"; SITE="$2"; shift 2 ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PY="$2"; shift 2 ;;
        --skip-bench) SKIP_BENCH=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1'; allowed: --out DIR, --wheels DIR, --site DIR, --python PY, --skip-bench, --dry-run, --help" ;;
    esac
done
cd "$REPO"

# name, time limit (s), command: the steps in order.
STEPS=(
    "install|60|$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $WHEELS/*.whl"
    "gpu_tests|200|$PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider --junitxml=$OUT_DIR/gpu_tests.xml"
)
if [ "$SKIP_BENCH" = 0 ]; then
    STEPS+=(
        "bench_train|60|$PY -m pipeline bench train --device cuda --num-steps 30"
        "bench_scale_10m|100|$PY -m pipeline bench scale --device cuda --preset 10m --backends ddp,zero3,fsdp"
        "bench_scale_100m|100|$PY -m pipeline bench scale --device cuda --preset 100m --backends ddp,zero3,fsdp"
    )
fi

if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: would write $OUT_DIR/device_check.json after these steps (PYTHONPATH=$SITE:$REPO):"
    for s in "${STEPS[@]}"; do
        IFS='|' read -r name limit cmd <<<"$s"
        echo "  $name (timeout ${limit}s): $cmd"
    done
    exit 0
fi

[ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1 || die "no wheels in '$WHEELS': run 'make device-wheels' on a machine with network first"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$SITE:$REPO" PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 DS_BUILD_OPS=0
FIRST_RC=0
: >"$OUT_DIR/steps.jsonl"
for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$s"
    echo "== $name (timeout ${limit}s): $cmd"
    start=$(date +%s)
    set +e
    timeout "$limit" bash -c "$cmd" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    set -e
    tail -n 5 "$OUT_DIR/$name.log"
    [ "$rc" = 0 ] || [ "$FIRST_RC" != 0 ] || FIRST_RC=$rc
    "$PY" -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "rc": int(sys.argv[2]), "seconds": int(sys.argv[3]), "log": sys.argv[4]}))' \
        "$name" "$rc" "$(( $(date +%s) - start ))" "$OUT_DIR/$name.log" >>"$OUT_DIR/steps.jsonl"
    if [ "$name" = install ] && [ "$rc" != 0 ]; then break; fi
done
"$PY" "$REPO/scripts/device_summary.py" "$OUT_DIR"
exit "$FIRST_RC"
