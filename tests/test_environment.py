"""environment.yml (conda) and pyproject.toml (pip) must ask for the same packages at the same versions, and
requirements.lock (what `make install` installs) must satisfy pyproject.toml. All offline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
# Extras that requirements.lock and environment.yml leave out (.ci/lock.py: UNLOCKED_EXTRAS): torch-fidelity pulls
# torchvision, whose build has to match the user's torch.
UNLOCKED_EXTRAS = {"inception"}
# Installed by `make` before the lock, never from it: torch (the CPU wheel, or the user's CUDA build), the CUDA
# wheels a PyPI torch pulls on Linux, and setuptools (torch 2.11/2.12 want <82, 2.13 wants >=77.0.3).
NOT_LOCKED = re.compile(r"^(torch|nvidia-.*|cuda-.*|triton|setuptools)$")
# The lock is universal: it must hold on every Python the project admits, on each platform below.
PYTHONS = ("3.10.12", "3.11.9", "3.12.8", "3.13.1")
PLATFORMS = (
    {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"},
    {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64", "os_name": "posix"},
    {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix"},
    {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64", "os_name": "nt"},
)


def _normalise(requirements) -> dict[str, str]:
    parsed = [Requirement(r) for r in requirements]
    return {r.name.lower(): str(r.specifier) for r in parsed}


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _locked_requirements(project: dict) -> list[str]:
    """The core dependencies and every extra the lock covers."""
    extras = project.get("optional-dependencies", {})
    return project["dependencies"] + [r for name in sorted(set(extras) - UNLOCKED_EXTRAS) for r in extras[name]]


def _environments():
    for python in PYTHONS:
        for platform in PLATFORMS:
            env = default_environment()
            env.update(platform, python_full_version=python, python_version=python.rsplit(".", 1)[0])
            env.update(implementation_name="cpython", platform_python_implementation="CPython", extra="")
            yield f"{python}/{platform['sys_platform']}-{platform['platform_machine']}", env


def _lock_entries(text: str) -> list[Requirement]:
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-"), f"requirements.lock: options are not supported: {line}"
        entries.append(Requirement(line))
    return entries


def _lock_problems(requirements: list[str], lock_text: str) -> list[str]:
    """Why the lock does not satisfy these requirements (empty when it does), on every PYTHONS x PLATFORMS."""
    problems = []
    entries = _lock_entries(lock_text)
    for entry in entries:
        if NOT_LOCKED.match(canonicalize_name(entry.name)):
            problems.append(f"{entry.name} is in the lock: torch and its CUDA wheels are installed outside it")
        specs = list(entry.specifier)
        if entry.extras or len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            problems.append(f"{entry} is not an exact pin")
    for where, env in _environments():
        active: dict[str, list[Requirement]] = {}
        for entry in entries:
            if entry.marker is None or entry.marker.evaluate(env):
                active.setdefault(canonicalize_name(entry.name), []).append(entry)
        for name, pinned in active.items():
            if len(pinned) > 1:
                problems.append(f"{where}: {name} is pinned {len(pinned)} times")
        for requirement in map(Requirement, requirements):
            name = canonicalize_name(requirement.name)
            if NOT_LOCKED.match(name) or (requirement.marker and not requirement.marker.evaluate(env)):
                continue
            if name not in active:
                problems.append(f"{where}: {requirement} has no pin in requirements.lock")
                continue
            version = Version(next(iter(active[name][0].specifier)).version)
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{where}: {requirement} is not satisfied by the pinned {version}")
    return sorted(set(problems))


def test_lock_matches_pyproject():
    problems = _lock_problems(_locked_requirements(_project()), LOCK.read_text())
    assert not problems, "requirements.lock is out of date: run `make lock`\n" + "\n".join(problems[:20])


@pytest.mark.parametrize(
    "change",
    ["add a dependency", "raise a floor", "lock torch", "loosen a pin", "pin twice"],
)
def test_lock_check_catches(change):
    requirements, lock = _locked_requirements(_project()), LOCK.read_text()
    if change == "add a dependency":
        requirements = requirements + ["not-a-locked-package>=1"]
    elif change == "raise a floor":
        requirements = [r if not r.startswith("numpy") else "numpy>=99" for r in requirements]
    elif change == "lock torch":
        lock += "torch==2.13.0\nnvidia-cublas==13.1.1.3 ; sys_platform == 'linux'\n"
    elif change == "loosen a pin":
        lock = re.sub(r"^ruff==\S+", "ruff>=0.17", lock, flags=re.M)
    elif change == "pin twice":
        lock += "pytest==8.0.0\n"
    assert _lock_problems(requirements, lock)


def test_lock_resolved_with_the_makefile_torch():
    """torch's own requirements are pinned for the torch `make` installs: bumping TORCH needs `make lock`."""
    makefile_torch = re.search(r"^TORCH \?= (\S+)$", (REPO / "Makefile").read_text(), flags=re.M)
    lock_torch = re.search(r"^# TORCH: (\S+)$", LOCK.read_text(), flags=re.M)
    assert makefile_torch and lock_torch
    assert lock_torch[1] == makefile_torch[1], "TORCH changed in the Makefile: run `make lock`"
    (pin,) = Requirement(makefile_torch[1]).specifier
    torch = next(Requirement(r) for r in _project()["dependencies"] if r.startswith("torch"))
    assert torch.specifier.contains(pin.version)


def test_environment_yml_matches_pyproject():
    project = _project()
    pip_side = _normalise(_locked_requirements(project))
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml needs exactly one pip: list"
    conda_side = _normalise(pip_lists[0])
    assert conda_side == pip_side
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.removeprefix("python") == project["requires-python"]


def test_torch_range_admits_the_cpu_wheel_and_cuda_builds():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch = next(Requirement(r) for r in project["dependencies"] if r.startswith("torch"))
    for version in ("2.10.0", "2.13.0", "2.13.0+cpu", "2.14.1+cu128"):
        assert torch.specifier.contains(version), version
    # Older builds load checkpoints through a weights_only unpickler with known bypasses (CVE-2025-32434, fixed in
    # 2.6.0; GHSA-63cw-57p8-fm3p / CVE-2026-24747, fixed in 2.10.0): refused.
    for version in ("2.5.1", "2.9.1", "3.0.0"):
        assert not torch.specifier.contains(version), version
    pyarrow = next(Requirement(r) for r in project["dependencies"] if r.startswith("pyarrow"))
    assert not pyarrow.specifier.contains("14.0.0") and pyarrow.specifier.contains("14.0.1")  # CVE-2023-47248


def test_floors_and_extras():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    metrics = next(Requirement(r) for r in project["dependencies"] if r.startswith("torchmetrics"))
    # FrechetInceptionDistance(feature_extractor_weights_path=...) arrived in torchmetrics 1.6.1 (#2867)
    assert not metrics.specifier.contains("1.6.0") and metrics.specifier.contains("1.6.1")
    extras = project["optional-dependencies"]
    assert [Requirement(r).name for r in extras["inception"]] == ["torch-fidelity"]
    assert "packaging" in {Requirement(r).name for r in extras["dev"]}
    # JupyterLab and optuna-dashboard are for people, not for `make repro` / `make test`: extras of their own.
    assert [Requirement(r).name for r in extras["notebooks"]] == ["jupyterlab"]
    assert [Requirement(r).name for r in extras["ui"]] == ["optuna-dashboard"]
    core_and_dev = {Requirement(r).name for r in project["dependencies"] + extras["dev"]}
    assert not core_and_dev & {"jupyterlab", "optuna-dashboard"}


def test_ruff_pinned_to_a_minor():
    """CI runs `ruff format --check`: a new ruff minor may change the formatting, so only one minor is admitted."""
    project = _project()
    ruff = next(Requirement(r) for r in project["optional-dependencies"]["dev"] if r.startswith("ruff"))
    locked = next(e for e in _lock_entries(LOCK.read_text()) if e.name == "ruff")
    major, minor, *_ = Version(next(iter(locked.specifier)).version).release
    assert ruff.specifier.contains(f"{major}.{minor}.0") and ruff.specifier.contains(f"{major}.{minor}.999")
    assert not ruff.specifier.contains(f"{major}.{minor + 1}.0")
    assert minor == 0 or not ruff.specifier.contains(f"{major}.{minor - 1}.999")
