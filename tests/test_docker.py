"""The GPU image's Dockerfile: CUDA 12, Python 3.11, the same pins as requirements.txt.

No Docker engine runs here, so these tests read the Dockerfile: its jax[cuda12] pin must be the
CPU pin, it must install requirements.txt itself, and what it copies must be in the context.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return [(item.split(None, 1)[0].upper(), item.split(None, 1)[1]) for item in logical]


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-r"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
        assert match, f"{path.name}: {line!r} is not pinned with =="
        found[match[1].lower()] = match[2]
    return found


def pip_installs() -> list[list[str]]:
    """The words of each `pip install` command in the RUN instructions."""
    commands = []
    for name, args in instructions():
        if name == "RUN":
            for part in re.split(r"&&|;", args):
                words = shlex.split(part)
                if words[:2] == ["pip", "install"] or words[1:3] == ["-m", "pip"]:
                    commands.append(words)
    return commands


def test_base_image_is_cuda_12_and_python_is_3_11():
    (base,) = [args for name, args in instructions() if name == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-[a-z-]+-ubuntu\d\d\.\d\d", base)
    runs = " ".join(args for name, args in instructions() if name == "RUN")
    assert "python3.11 -m venv" in runs
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11,<3.12"


def test_jax_cuda_pin_equals_the_cpu_pin_and_requirements_are_installed():
    required = pins(REPO / "requirements.txt")
    installs = pip_installs()
    jax_cuda = [w for cmd in installs for w in cmd if w.startswith("jax[")]
    assert jax_cuda == [f"jax[cuda12]=={required['jax']}"]
    assert required["jaxlib"] == required["jax"]
    # requirements.txt is installed as a whole, in the same command as jax[cuda12], so pip
    # resolves the CUDA plugin against exactly these pins.
    (with_requirements,) = [cmd for cmd in installs if "-r" in cmd]
    assert with_requirements[with_requirements.index("-r") + 1] == "requirements.txt"
    assert f"jax[cuda12]=={required['jax']}" in with_requirements
    # Nothing else installed by name, where a second pin could drift.
    named = [w for cmd in installs for w in cmd[2:]
             if not w.startswith("-") and w not in ("requirements.txt", ".")]
    assert named == [f"jax[cuda12]=={required['jax']}"]
    (package,) = [cmd for cmd in installs if cmd[-1] == "."]
    assert "--no-deps" in package  # dwise_jax itself adds no unpinned dependency


def test_copies_come_before_their_use_and_are_in_the_build_context():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    order = [name + " " + args for name, args in instructions()]
    copied = []
    for name, args in instructions():
        if name == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert not any(fnmatch.fnmatch(source, p) for p in ignored), \
                    f"COPY {source}: excluded by .dockerignore"
                copied.append(source)
    assert {"requirements.txt", "pyproject.toml", "README.md", "dwise_jax", "configs",
            "launch"} <= set(copied)
    first_copy = {s: i for i, line in enumerate(order) if line.startswith("COPY")
                  for s in shlex.split(line)[1:-1]}
    install_reqs = next(i for i, line in enumerate(order) if "-r requirements.txt" in line)
    install_pkg = next(i for i, line in enumerate(order) if "--no-deps ." in line)
    assert first_copy["requirements.txt"] < install_reqs < first_copy["dwise_jax"] < install_pkg
    for heavy in ("data", "workdir", ".venv", ".git"):
        assert heavy in ignored


def test_working_directory_and_volumes():
    found = dict(instructions())
    assert found["WORKDIR"] == "/opt/dwise_jax"
    assert shlex.split(found["VOLUME"].strip("[]").replace(",", " ")) == ["/data", "/workdir"]
    assert "LOG_DIR=/workdir/logs" in found["ENV"]  # launch logs land on the volume
    assert "DWISE_JAX_CACHE=/workdir/cache" in found["ENV"]  # so does the folds cache


def _tool(name: str) -> str:
    """A linter from requirements-dev.txt: on PATH or beside this Python (the venv's bin/)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} is missing: install requirements-dev.txt (./setup.sh does)")
    return path


def test_hadolint():
    out = subprocess.run([_tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
