"""The first 20 steps of every preset, on 1 process and on 2 (DDP, ZeRO-2, FSDP), as a record.

A refactoring must not change what training computes: ``test_preset_golden.py`` runs these
cases and compares every deterministic metric of every step with ``preset_metrics.json``,
recorded by ``python -m tests.golden.presets --record`` at a known-good commit. Timing and
memory metrics are left out: they vary from run to run.

Float bitwise equality holds only on the machine kind the record was made on (the CPU model
and the torch build: :func:`machine`, stored beside the cases), with one thread per process
(the test environment); there the comparison is bitwise. On another kind the same code rounds
differently in float32 kernels: runs on an Intel Xeon differed from a record made on an AMD
EPYC by at most 4.2e-6 relative over the 20 steps of every case (the runs do not amplify
round-off), while a 0.2 % change of the learning rate moves the metrics by 2e-3; so
elsewhere the comparison allows ``RTOL_OTHER_MACHINE`` and says so. Re-record on a new machine
kind at a known-good commit, never to make a failing refactor pass.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.conftest import accelerate_launch, run_pipeline

GOLDEN = Path(__file__).with_name("preset_metrics.json")
NUM_STEPS = 20
RTOL_OTHER_MACHINE = 1e-4  # 24x the largest difference measured between two CPU kinds (module doc)

# name -> `pipeline shards` arguments; small, seeded, written once per session.
DATASETS = {
    "ising-T3.0-L16": ["ising", "--temperature", "3.0", "--size", "16", "--num-samples", "512", "--seed", "0",
                       "--samples-per-shard", "128"],
    "ising-multiT-L16": ["ising", "--temperature", "1.8", "2.0", "2.2", "2.4", "2.6", "3.0", "--size", "16",
                         "--num-samples", "96", "--seed", "0", "--samples-per-shard", "128"],
    "digits": ["digits"],
    "gmm-d2-k8": ["gmm", "--dim", "2", "--num-components", "8", "--num-samples", "4096", "--seed", "0"],
}


@dataclass(frozen=True)
class Case:
    name: str
    preset: str
    data: str
    num_processes: int = 1
    overrides: tuple[str, ...] = ()


CASES = [
    Case("quickstart", "quickstart", "ising-T3.0-L16"),
    # The preset trains in bf16 since 2026-12-06; the record is fp32's, so the case pins that (the
    # rest of the preset's computation is unchanged; bf16 training: tests/integration/test_mixed_precision.py).
    Case("vdm_ising", "vdm_ising", "ising-T3.0-L16", overrides=("engine.mixed_precision=no",)),
    # The preset uses the discrete skip since 2026-12-07; the record is without it, so the case pins
    # that (the skip's own tests: tests/unit/test_vdm_discrete_skip.py).
    Case("vdm_digits", "vdm_digits", "digits", overrides=("vdm.skip=none",)),
    Case("gan_ising", "gan_ising", "ising-multiT-L16"),
    Case("gan_digits", "gan_digits", "digits"),
    Case("gan_gmm", "gan_gmm", "gmm-d2-k8"),
    Case("quickstart-ddp2", "quickstart", "ising-T3.0-L16", 2),
    Case("gan_gmm-ddp2", "gan_gmm", "gmm-d2-k8", 2),
    Case("quickstart-zero2", "quickstart", "ising-T3.0-L16", 2, ("engine.backend=deepspeed", "engine.zero_stage=2")),
    Case("gan_gmm-fsdp2", "gan_gmm", "gmm-d2-k8", 2, ("engine.fsdp=full_shard",)),
]

_VOLATILE_PREFIXES = ("perf/", "sys/", "mem/")


def deterministic(row: dict) -> dict:
    """A metrics row without what varies between identical runs (time, memory, data waits,
    object-store retries: they count the network's hiccups, not the run's)."""
    return {k: v for k, v in row.items()
            if k not in ("time", "data/storage_retries") and not k.startswith(_VOLATILE_PREFIXES)
            and not k.endswith("data_wait_s")}


def machine() -> str:
    """What float bitwise equality of a training run depends on: the CPU (model name, family and
    model numbers, a digest of its instruction-set flags, which pick the kernels) and the torch
    build. A virtual CPU's model name alone ("Intel(R) Xeon(R) Processor") can cover several kinds."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        flags = hashlib.sha256(fields["flags"].encode()).hexdigest()[:12]
        cpu = f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']}, flags {flags})"
    except (OSError, KeyError):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}; torch {torch.__version__}"


def mismatches(got: dict, recorded: dict, rtol: float) -> dict:
    """The metrics of one step that differ from the record: bitwise when ``rtol`` is 0, else by more
    than ``rtol`` relative (non-float values always exactly; NaN equals NaN)."""
    def same(a, b) -> bool:
        if isinstance(a, float) and isinstance(b, float):
            if math.isnan(a) or math.isnan(b):
                return math.isnan(a) and math.isnan(b)
            return a == b or abs(a - b) <= rtol * max(abs(a), abs(b))
        return a == b
    return {k: (got[k], recorded[k]) for k in recorded if not same(got[k], recorded[k])}


def write_datasets(root: Path) -> dict[str, Path]:
    out = {}
    for name, args in DATASETS.items():
        out[name] = root / name
        if not (out[name] / "manifest.json").is_file():
            run_pipeline("shards", *args, "--out", str(out[name]))
    return out


def run_case(case: Case, data: Path, run_dir: Path) -> list[dict]:
    args = ["train", "--config", f"configs/{case.preset}.yaml", f"run.dir={run_dir}", f"data.train_urls={data}",
            f"train.num_steps={NUM_STEPS}", "train.warmup_steps=0", "train.log_every_steps=1",
            f"train.checkpoint_every_steps={NUM_STEPS}", "track.wandb=off",
            *case.overrides]
    if case.num_processes == 1:
        run_pipeline(*args)
    else:
        accelerate_launch(case.num_processes, *args)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [deterministic(r) for r in rows if "event" not in r]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", action="store_true", help=f"write {GOLDEN.name}")
    p.add_argument("--work", type=Path, required=True, help="scratch directory for data and runs")
    p.add_argument("--case", action="append", choices=[c.name for c in CASES],
                   help="only this case (repeatable); with --record, only its entry is replaced, for a change "
                        "that alters exactly these cases deliberately (say which and why in the commit)")
    a = p.parse_args(argv)
    data = write_datasets(a.work / "data")
    cases = [c for c in CASES if not a.case or c.name in a.case]
    result = {c.name: run_case(c, data[c.data], a.work / "runs" / c.name) for c in cases}
    if a.record:
        if a.case:
            old = json.loads(GOLDEN.read_text())
            if old["machine"] != machine():
                raise SystemExit(f"{GOLDEN.name} was recorded on {old['machine']!r}, this is {machine()!r}: "
                                 "re-record every case, not some")
            result = {**old["cases"], **result}
        GOLDEN.write_text(json.dumps({"machine": machine(), "cases": result}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
    else:
        print(json.dumps({k: len(v) for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
