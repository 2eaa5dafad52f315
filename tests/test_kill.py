"""Fault injection with real kills: each of prepare, train_dvae, encode, train_prior and train_clip runs as a
subprocess and gets SIGKILL at 3 seeded random moments of its work (no cleanup code runs, unlike the
KeyboardInterrupt of the resume tests). After each kill the stage is rerun to the end, and then:

- its outputs are bit-identical to those of an uninterrupted run;
- no ``*.tmp*`` file or directory is left anywhere;
- no MLflow run of the stage is left RUNNING: a training stage's rerun continues the killed attempt's run (one
  FINISHED run per attempt chain), any other stage's killed run is marked KILLED by the next run of that stage.

The moments are drawn between the first progress bar line on stderr and the end of the work, as measured on the
uninterrupted run, so they land in training steps, checkpoint writes and publishing alike."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
KILLS = 3
EXPERIMENT = "test-kill"


def write_params(root: Path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["mlflow"]["experiment"] = EXPERIMENT
    raw["data"].update(n_train=4000, n_val=64, n_test=64, image_size=16, shard_size=500)
    raw["eval"]["blur_radii"] = [0, 8, 16]  # >= 0.5 px at 16 px
    common = dict(val_images=32, checkpoint_every=5, log_every=5)
    raw["dvae"].update(
        codebook_size=16, hidden=8, codebook_dim=16, batch_size=16, steps=60, tau_steps=40, kl_warmup_steps=20,
        warmup_steps=5, val_every=30, image_every=30, **common,
    )  # fmt: skip
    raw["prior"].update(
        n_layers=2, n_heads=2, d_model=32, batch_size=16, steps=60, warmup_steps=5, val_every=30, sample_every=30,
        samples=4, **common,
    )  # fmt: skip
    raw["clip"].update(
        embed_dim=16, text_layers=1, text_width=32, text_heads=2, image_channels=8, image_stages=2, batch_size=32,
        steps=60, warmup_steps=5, val_every=30, **common,
    )  # fmt: skip
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def stage_command(stage: str, root: Path, params: Path) -> tuple[list[str], list[Path]]:
    """The stage's command line (outputs under ``root``, shared inputs from ``root.parent``) and its outputs."""
    inputs = root.parent / "inputs"
    base = ["--params", str(params)]
    ckpt = ["--checkpoint", str(root / "ckpt" / "last.pt")]
    if stage == "prepare":
        return [*base, "--out", str(root / "prepared")], [root / "prepared"]
    if stage == "train_dvae":
        args = ["--prepared", str(inputs / "prepared"), "--models", str(root / "models"), *ckpt]
        return [*base, *args, "--reports", str(root / "reports")], [root / "models"]
    if stage == "encode":
        args = ["--prepared", str(inputs / "prepared"), "--models", str(inputs / "models"), "--out", str(root / "tok")]
        return [*base, *args, "--reports", str(root / "reports")], [root / "tok"]
    inputs_args = ["--prepared", str(inputs / "prepared"), "--tokens", str(inputs / "tokens")]
    if stage == "train_prior":
        args = [*inputs_args, "--dvae", str(inputs / "models"), "--models", str(root / "prior"), *ckpt]
        return [*base, *args, "--reports", str(root / "reports")], [root / "prior"]
    assert stage == "train_clip"
    args = [*inputs_args, "--models", str(root / "clip"), *ckpt]
    return [*base, *args, "--reports", str(root / "reports")], [root / "clip"]


def run(stage: str, args: list[str], kill_at: float | None = None) -> tuple[float, bool]:
    """Run ``python -m pipelines.<stage>``; with ``kill_at``, SIGKILL it that many seconds after its progress bar
    first shows. Returns (seconds of work after the bar showed, whether the process was killed)."""
    process = subprocess.Popen(
        [sys.executable, "-m", f"pipelines.{stage}", *args],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    shown, err = threading.Event(), bytearray()
    marker = stage.encode()  # tqdm's description: "prepare", "train_dvae", "encode (rank 0 of 1)", ...

    def read() -> None:
        while chunk := os.read(process.stderr.fileno(), 4096):
            err.extend(chunk)
            if not shown.is_set() and marker in err and b"%|" in err:
                shown.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert shown.wait(timeout=240), f"{stage} never showed progress:\n{err.decode(errors='replace')[-3000:]}"
    bar = time.perf_counter()
    if kill_at is not None:
        try:
            process.wait(timeout=kill_at)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
        code = process.wait()
        reader.join()
        return time.perf_counter() - bar, code == -signal.SIGKILL
    code = process.wait(timeout=600)
    reader.join()
    assert code == 0, f"{stage} failed ({code}):\n{err.decode(errors='replace')[-3000:]}"
    return time.perf_counter() - bar, False


def digests(paths: list[Path]) -> dict[str, str]:
    out = {}
    for top in paths:
        for path in sorted(p for p in top.rglob("*") if p.is_file()):
            out[str(path.relative_to(top.parent))] = hashlib.sha256(path.read_bytes()).hexdigest()
    assert out, f"no outputs under {paths}"
    return out


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name)


NEEDS = {
    "prepare": [],
    "train_dvae": ["prepare"],
    "encode": ["prepare", "train_dvae"],
    "train_prior": ["prepare", "train_dvae", "encode"],
    "train_clip": ["prepare", "encode"],
}
INPUT_NAMES = {"prepare": "prepared", "train_dvae": "models", "encode": "tokens"}


class Chain:
    """Uninterrupted reference runs, each made once; their outputs are the later stages' inputs."""

    def __init__(self, root: Path):
        self.root, self.params, self.done = root, write_params(root), {}
        (root / "inputs").mkdir()

    def reference(self, stage: str) -> tuple[float, dict[str, str]]:
        """(seconds of work after the progress bar showed, output digests) of the uninterrupted run."""
        if stage not in self.done:
            for need in NEEDS[stage]:
                self.reference(need)
            args, outputs = stage_command(stage, self.root / f"{stage}-reference", self.params)
            work, _ = run(stage, args)
            self.done[stage] = (work, digests(outputs))
            if stage in INPUT_NAMES:
                (self.root / "inputs" / INPUT_NAMES[stage]).symlink_to(outputs[0])
        return self.done[stage]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    return Chain(tmp_path_factory.mktemp("kill"))


def stage_runs(client: MlflowClient, stage: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}'")


@pytest.mark.parametrize("stage", ["prepare", "train_dvae", "encode", "train_prior", "train_clip"])
def test_sigkill_then_rerun_gives_the_uninterrupted_outputs(stage, chain, mlflow_store):
    work, expected = chain.reference(stage)
    client = MlflowClient(mlflow_store)
    before = {r.info.run_id for r in stage_runs(client, stage)}
    rng, killed = random.Random(f"{stage}-kills"), 0
    for attempt in range(KILLS):
        args, outputs = stage_command(stage, chain.root / f"{stage}-killed-{attempt}", chain.params)
        moment = rng.uniform(0.05, 0.95) * work
        killed += run(stage, args, kill_at=moment)[1]
        run(stage, args)  # the rerun, to the end
        assert digests(outputs) == expected, f"{stage}: killed {moment:.2f} s into {work:.2f} s, outputs differ"
        assert leftovers(chain.root) == [], f"{stage}: left behind after a kill at {moment:.2f} s of {work:.2f} s"
    assert killed >= KILLS - 1, f"{stage}: only {killed} of {KILLS} attempts were still running when killed"
    runs = [r for r in stage_runs(client, stage) if r.info.run_id not in before]
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_id, r.info.status) for r in runs]
    assert sum(r.info.status == "FINISHED" for r in runs) >= KILLS, [(r.info.run_id, r.info.status) for r in runs]
