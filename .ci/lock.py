"""Write requirements.lock, the exact versions `make install` installs (run by `make lock`; needs uv, which it gets).

    python .ci/lock.py                 keep every pin that still fits pyproject.toml, resolve only what changed
    python .ci/lock.py --upgrade       move every pin to the newest release that fits (any `uv pip compile` flag
                                       is passed on, e.g. --upgrade-package pandas)

One universal resolution (uv) of the core dependencies and every extra but `inception`, for each Python that
`requires-python` admits: where a package's newest release has dropped the oldest Python, the lock pins one version
per Python range, with a marker. torch is resolved at the version `make` installs (TORCH, default the Makefile's
torch==2.13.0) so that its own requirements (sympy, networkx, filelock, ...) are pinned too, but torch itself is
left out of the file (`make` installs it first: the CPU wheel, or the user's CUDA build, which it keeps), and so
are its CUDA wheels (nvidia-*, cuda-*, triton): a first pass finds their names and a second pass resolves without
them, so nothing in the lock can pull a CUDA build onto a CPU machine. `inception` (torch-fidelity) is not locked:
it pulls torchvision, whose build has to match the user's torch.

uv reads its index from UV_DEFAULT_INDEX / UV_INDEX (default PyPI), not from pip's configuration.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
UNLOCKED_EXTRAS = {"inception"}  # tests/test_environment.py keeps the same set
CUDA = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")  # torch's CUDA wheels; tests/test_environment.py refuses them too
# Resolved but not written: torch (installed first, outside the lock) and setuptools, the one requirement of torch
# whose admissible versions differ across the torch releases pyproject.toml admits (2.11 and 2.12 want setuptools<82,
# 2.13 wants >=77.0.3): pinning it would break a kept CUDA build of 2.11/2.12, so torch's install decides it.
NOT_EMITTED = ("torch", "setuptools")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)(\s*;.*)?$")

NOTE = """\
# Exact versions for `make install` (pip install -c requirements.lock -e ".[EXTRAS]"): the core dependencies and
# the extras {extras}, for every Python from {python} on (markers where a version differs).
# torch and its CUDA wheels (nvidia-*, cuda-*, triton) are deliberately absent: `make` installs torch first (the
# CPU wheel, or keeps your CUDA build). torch's own requirements (sympy, networkx, ...) are pinned as they resolve
# with the torch that `make` installs (TORCH in the Makefile), which was, for this file:
# TORCH: {torch}
# setuptools is left to torch's install too: torch 2.11/2.12 want setuptools<82, 2.13 wants >=77.0.3.
# Refresh with `make lock` (after editing pyproject.toml) or `make lock UPGRADE=1` (newest releases); do not edit
# by hand. tests/test_environment.py checks, offline, that this file satisfies pyproject.toml.
"""


def load_pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pins(path: Path) -> dict[str, set[str]]:
    """name -> the `version ; marker` strings pinned for it."""
    out: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            name = re.sub(r"[-_.]+", "-", match[1]).lower()
            out.setdefault(name, set()).add(match[2] + (match[3] or "").strip())
    return out


def compile_lock(uv: list[str], out: Path, python: str, extras: list[str], constraints: Path, *args: str) -> None:
    command = [*uv, "pip", "compile", "pyproject.toml", "--universal", "--python-version", python]
    command += [f"--extra={extra}" for extra in extras]
    command += ["--constraint", str(constraints), "--output-file", str(out)]
    command += [arg for name in NOT_EMITTED for arg in ("--no-emit-package", name)]
    command += ["--custom-compile-command", "make lock", "--quiet", *args]
    subprocess.run(command, cwd=REPO, check=True)


def main(argv: list[str]) -> int:
    project = load_pyproject()
    python = re.fullmatch(r">=\s*(\d+\.\d+)", project["requires-python"].strip())
    if python is None:
        sys.exit(f"requires-python {project['requires-python']!r}: expected a floor like '>=3.10'")
    python = python[1]
    extras = sorted(set(project.get("optional-dependencies", {})) - UNLOCKED_EXTRAS)
    torch = os.environ.get("TORCH", "torch==2.13.0")
    uv = [sys.executable, "-m", "uv"]
    if subprocess.run([*uv, "--version"], capture_output=True).returncode != 0:
        sys.exit("uv is not installed in this Python: run `make lock`, or pip install uv")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "torch.txt").write_text(torch + "\n")
        first, second = tmp / "first.txt", tmp / "second.txt"
        if LOCK.exists():  # uv keeps the pins of the file it writes to, unless told to upgrade
            shutil.copy(LOCK, first)
        compile_lock(uv, first, python, extras, tmp / "torch.txt", *argv)
        cuda = sorted(name for name in pins(first) if CUDA.match(name))
        (tmp / "cuda.txt").write_text("".join(f"{name}\n" for name in cuda))
        shutil.copy(first, second)  # the same versions, now without the CUDA wheels
        compile_lock(uv, second, python, extras, tmp / "torch.txt", "--excludes", str(tmp / "cuda.txt"))

        locked = pins(second)
        left = sorted(name for name in locked if CUDA.match(name) or name in NOT_EMITTED)
        if left:
            sys.exit(f"CUDA packages still in the resolution (required by something besides torch?): {left}")
        text = second.read_text()
        header, _, body = text.partition("\n#    make lock\n")
        new = f"{header}\n#    make lock\n{NOTE.format(python=python, torch=torch, extras=', '.join(extras))}{body}"
        old = pins(LOCK) if LOCK.exists() else {}
        if not LOCK.exists() or LOCK.read_text() != new:  # an unchanged lock keeps its mtime: no reinstall
            LOCK.write_text(new)

    changed = sorted(name for name in set(old) | set(locked) if old.get(name) != locked.get(name))
    print(
        f"requirements.lock: {len(locked)} packages (Python >={python}, extras {', '.join(extras)}; "
        f"left out: {', '.join(NOT_EMITTED)} and {len(cuda)} CUDA wheels)"
    )
    print(f"  {len(changed)} pins changed" + (":" if changed else ""))
    for name in changed:
        before, after = (", ".join(sorted(pinned.get(name, ()))) or "-" for pinned in (old, locked))
        print(f"  {name}: {before} -> {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
