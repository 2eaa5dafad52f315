"""environment.yml (conda) and pyproject.toml (pip) must ask for the same packages at the same versions."""

from __future__ import annotations

from pathlib import Path

import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _normalise(requirements) -> dict[str, str]:
    parsed = [Requirement(r) for r in requirements]
    return {r.name.lower(): str(r.specifier) for r in parsed}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pip_side = _normalise(project["dependencies"] + project["optional-dependencies"]["dev"])
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
