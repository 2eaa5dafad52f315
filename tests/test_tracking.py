"""MLflow plumbing: store resolution, fail-fast on an unreachable server, run tags."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from dalle.config import Params
from pipelines import tracking

REPO = Path(__file__).resolve().parents[1]


def test_repo_root_sees_through_dvc_experiment_copies():
    assert tracking.repo_root(Path("/home/u/proj/.dvc/tmp/exps/tmpab12cd")) == Path("/home/u/proj")
    assert tracking.repo_root(Path("/home/u/proj")) == Path("/home/u/proj")
    assert tracking.repo_root() == REPO


def test_default_store_is_absolute_sqlite_at_repo_root(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{REPO / 'mlflow.db'}"
    assert tracking._artifact_location(tracking.tracking_uri()) == (REPO / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.invalid:5000")
    assert tracking.tracking_uri() == "http://tracking.invalid:5000"
    assert tracking._artifact_location("http://tracking.invalid:5000") is None


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_fails_at_start(monkeypatch, uri: str) -> None:
    """A stage pointed at ``uri`` fails before its body runs, within 30 s, naming the store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match=f"MLflow tracking store {uri} is unreachable"):
        with tracking.stage_run("prepare", Params()):
            pytest.fail("the stage body must not run")
    assert time.monotonic() - started < 30


def test_unreachable_server_fails_at_start_and_quickly(monkeypatch):
    assert_fails_at_start(monkeypatch, f"http://127.0.0.1:{free_port()}")


def test_run_tags(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "brave-newt")
    tags = tracking.run_tags("prepare")
    assert tags["stage"] == "prepare" and tags["dvc_exp_name"] == "brave-newt"
    assert tags["git_commit"] == tags["mlflow.source.git.commit"]
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"
    monkeypatch.delenv("DVC_EXP_NAME")
    assert "dvc_exp_name" not in tracking.run_tags("prepare")


def test_flat_metrics_keeps_numbers_only():
    nested = {"n_images": {"train": 3, "val": 1}, "rate": 0.5, "skipped": {}, "flag": True, "name": "x"}
    assert tracking.flat_metrics(nested) == {"n_images.train": 3.0, "n_images.val": 1.0, "rate": 0.5}
