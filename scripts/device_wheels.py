"""The wheels the GPU check machine lacks, computed from pyproject.toml (issue 18, section 4).

The device machine has torch, accelerate, h5py and the CUDA stack and no network. Everything
else the project depends on (``[project].dependencies`` and the ``dev`` extra, which brings
pytest) must travel with the working tree as wheels, together with their own dependencies,
minus whatever torch, accelerate and h5py already pull in (those are installed there).

The dependency closure is read from the metadata of this machine's installed distributions
(``importlib.metadata``), and versions are pinned to the installed ones, so the device runs
what the tests here ran. Standard library only (plus ``packaging``, which pip and accelerate
bring), so ``make device-wheels`` needs no extra install.

    python scripts/device_wheels.py list                       # name==version, one a line
    python scripts/device_wheels.py download --dest device-wheels --python-version 3.11
    python scripts/device_wheels.py check                      # every third-party import is covered
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# Installed on the device machine: torch, accelerate and h5py (issue 18, section 4) and the rest
# of its image (scripts/device_provided.txt), with their dependency closures. Shipping only
# what is missing keeps the wheels under the 64 MiB a working tree may carry there.
PROVIDED_FILE = ROOT / "scripts" / "device_provided.txt"
GUARANTEED = ("torch", "accelerate", "h5py")


def provided() -> tuple[str, ...]:
    lines = [ln.strip() for ln in PROVIDED_FILE.read_text().splitlines()]
    return tuple(sorted({canonical(n) for n in (*GUARANTEED, *(ln for ln in lines if ln and not ln.startswith("#")))}))
# Wheels that pip cannot download for another platform: no wheel on PyPI (DeepSpeed ships an
# sdist), so they are built here without compiling ops (DS_BUILD_OPS=0: ops JIT-build on use).
BUILT_HERE = ("deepspeed",)
LOCAL_TOP_LEVEL = {"pipeline", "tests", "scripts", "engine_toy"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Names in ``[project].dependencies`` and its ``dev`` extra."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [*project["dependencies"], *project.get("optional-dependencies", {}).get("dev", [])]
    return sorted({canonical(Requirement(r).name) for r in reqs})


def closure(names: list[str] | tuple[str, ...], *, missing_ok: bool = False) -> set[str]:
    """``names`` and every distribution they require (installed here), recursively; optional
    extras and requirements whose environment marker is false here are left out. With
    ``missing_ok`` a distribution not installed here counts as a leaf (h5py: the device has it)."""
    seen: set[str] = set()
    todo = [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            if missing_ok:
                continue
            raise SystemExit(f"{name} is required but not installed here: run `make venv` first") from None
        for r in map(Requirement, requires):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(canonical(r.name))
    return seen


def device_requirements() -> list[str]:
    """``name==version`` of every distribution the device machine lacks."""
    there = closure(provided(), missing_ok=True)
    wanted = closure([n for n in project_requirements() if n not in provided()]) - there
    return sorted(f"{n}=={md.version(n)}" for n in wanted)


def imported_top_level(paths: list[Path]) -> set[str]:
    """Top-level module names imported anywhere under ``paths`` (lazy imports included)."""
    names: set[str] = set()
    for path in paths:
        for f in sorted(path.rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def uncovered_imports(paths: list[Path]) -> dict[str, str]:
    """{module: why} for each third-party module imported under ``paths`` that neither the
    wheel list nor the device machine's own packages provide."""
    shipped = {canonical(r.split("==")[0]) for r in device_requirements()} | closure(provided(), missing_ok=True)
    owners = md.packages_distributions()
    missing: dict[str, str] = {}
    for mod in sorted(imported_top_level(paths) - set(sys.stdlib_module_names) - LOCAL_TOP_LEVEL):
        dists = {canonical(d) for d in owners.get(mod, [])}
        if not dists:
            missing[mod] = "no installed distribution provides it"
        elif not dists & shipped:
            missing[mod] = f"from {sorted(dists)}, which is neither in pyproject.toml's closure nor on the device"
    return missing


# glibc levels a current Linux GPU machine runs (manylinux_2_17 = manylinux2014); newer wheels
# (contourpy 1.3.3) are built for 2_27/2_28 only.
PLATFORMS = tuple(f"manylinux_2_{v}_x86_64" for v in (17, 27, 28, 31, 34, 35)) + ("linux_x86_64",)


def download(dest: Path, python_version: str, platforms: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    reqs = device_requirements()
    built = [r for r in reqs if r.split("==")[0] in BUILT_HERE]
    fetched = [r for r in reqs if r not in built]
    # --no-deps: the list is already the closure; resolving again would pull torch's CUDA wheels.
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
                    "--python-version", python_version, "--implementation", "cp",
                    *[a for p in platforms for a in ("--platform", p)], *fetched], check=True)
    env = {**__import__("os").environ, "DS_BUILD_OPS": "0"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir",
                    str(dest), *built], check=True, env=env)
    (dest / "requirements.txt").write_text("\n".join(reqs) + "\n")
    size_mib = sum(f.stat().st_size for f in dest.glob("*.whl")) / 2**20
    print(f"{len(reqs)} distributions, {size_mib:.1f} MiB of wheels in {dest} (python {python_version})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="name==version of every distribution the device machine lacks")
    d = sub.add_parser("download", help="download (or build) their wheels into --dest")
    d.add_argument("--dest", type=Path, default=ROOT / "device-wheels")
    d.add_argument("--python-version", default="3.12",
                   help="the device's python (default 3.12, the H200 image's; cp312 wheels)")
    d.add_argument("--platform", action="append", dest="platforms",
                   help=f"wheel platform tag, repeatable (default: {', '.join(PLATFORMS)})")
    sub.add_parser("check", help="exit 1 naming every imported third-party module no wheel or device package covers")
    args = p.parse_args(argv)
    if args.cmd == "list":
        print("\n".join(device_requirements()))
    elif args.cmd == "download":
        download(args.dest, args.python_version, args.platforms or list(PLATFORMS))
    else:
        missing = uncovered_imports([ROOT / "pipeline", ROOT / "tests", ROOT / "scripts"])
        for mod, why in missing.items():
            print(f"{mod}: {why}", file=sys.stderr)
        return 1 if missing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
