"""The Docker images install what `make venv` installs, from the same sources.

No Docker engine runs here, so the Dockerfiles are read: every `pip install` in them must
install either the Makefile's torch spec (CPU image: its CPU choice, CUDA image: its GPU
choice) or the project itself from pyproject.toml; no requirements file, no pinned list.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
IMAGES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "cuda": REPO / "docker" / "Dockerfile.cuda"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for ln in text.splitlines():
        if ln.strip():
            word, _, rest = ln.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _makefile_torch_specs() -> dict[str, str]:
    """The Makefile's TORCH_SPEC: {'gpu': spec if nvidia-smi finds a GPU, 'cpu': otherwise}."""
    line = next(ln for ln in (REPO / "Makefile").read_text().splitlines() if ln.startswith("TORCH_SPEC"))
    m = re.search(r'then echo "([^"]+)"; else echo "([^"]+)"', line)
    assert m, f"cannot read TORCH_SPEC from the Makefile line: {line}"
    return {"gpu": m.group(1), "cpu": m.group(2)}


def _pip_installs(path: Path) -> list[list[str]]:
    """Arguments (options dropped) of every `pip install` in the file's RUN instructions."""
    installs = []
    for word, rest in _instructions(path):
        if word != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", rest):
            argv = shlex.split(command)
            if "pip" in argv and argv[argv.index("pip") + 1 : argv.index("pip") + 2] == ["install"]:
                args = argv[argv.index("pip") + 2 :]
                assert not any(a in ("-r", "--requirement", "-c", "--constraint") for a in args), command
                installs.append([a for a in args if not a.startswith("-")])
    return installs


def _arg_default(path: Path, name: str) -> str:
    for word, rest in _instructions(path):
        if word == "ARG" and rest.startswith(f"{name}="):
            return shlex.split(rest.split("=", 1)[1])[0]
    raise AssertionError(f"{path.name} has no ARG {name}=...")


@pytest.mark.parametrize("image, machine", [("cpu", "cpu"), ("cuda", "gpu")])
def test_image_installs_the_makefile_torch_spec_then_pyproject(image, machine):
    path = IMAGES[image]
    assert _arg_default(path, "TORCH_SPEC") == _makefile_torch_specs()[machine]
    installs = [args for args in _pip_installs(path) if args]  # `pip install --upgrade pip` -> ["pip"]
    assert installs == [["pip"], ["$TORCH_SPEC"], [".[dev]"]]
    copied = [rest.split()[:-1] for word, rest in _instructions(path) if word == "COPY"]
    assert ["pyproject.toml", "README.md"] in copied and ["pipeline"] in copied
    assert not list((REPO / "docker").glob("*requirements*"))


def test_torch_specs_satisfy_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_range = next(Requirement(d) for d in deps if Requirement(d).name == "torch").specifier
    pinned = Requirement(_makefile_torch_specs()["cpu"])
    (version,) = [s.version for s in pinned.specifier]
    assert version in torch_range
    assert Requirement(_arg_default(IMAGES["cuda"], "TORCH_SPEC")).specifier == torch_range


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_image_entry_point_is_the_pipeline_command(image):
    ins = _instructions(IMAGES[image])
    assert ("ENTRYPOINT", '["pipeline"]') in ins
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "pipeline" in scripts


def test_cuda_image_uses_an_nvidia_cuda_runtime_base():
    (base,) = [rest for word, rest in _instructions(IMAGES["cuda"]) if word == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", base), base
