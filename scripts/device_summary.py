"""One JSON summary of a GPU check run (scripts/device_check.sh): each step's exit code and time,
the last-line JSON of each bench, the pytest counts, the GPU. Written to DIR/device_check.json
and printed as the last line."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def last_json(log: Path) -> dict | None:
    """The last line of a log that parses as a JSON object (the benches' contract)."""
    for line in reversed(log.read_text(errors="replace").splitlines() if log.is_file() else []):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def pytest_counts(xml: Path) -> dict | None:
    if not xml.is_file():
        return None
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def gpu() -> dict:
    try:
        import torch
    except ImportError:
        return {"torch": None}
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    if info["available"]:
        info["name"] = torch.cuda.get_device_name(0)
        info["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def main(out_dir: str) -> int:
    out = Path(out_dir)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    summary = {"gpu": gpu(), "ok": bool(steps) and all(s["rc"] == 0 for s in steps), "steps": {}}
    for s in steps:
        entry = {"rc": s["rc"], "seconds": s["seconds"]}
        if s["step"] == "gpu_tests":
            entry["pytest"] = pytest_counts(out / "gpu_tests.xml")
        elif s["step"].startswith("bench"):
            entry["result"] = last_json(Path(s["log"]))
        summary["steps"][s["step"]] = entry
    (out / "device_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
