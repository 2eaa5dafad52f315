"""MLflow for the stages: one run per stage execution, in one store shared by every run of this repo.

Default store: ``sqlite:///<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts`` (MLflow's own default
since 3.7, made absolute). ``dvc exp run --queue`` executes stages in a copy under ``<repo>/.dvc/tmp/exps/``;
the root is resolved past that copy so queued experiments land in the same store. ``MLFLOW_TRACKING_URI``
overrides it for a shared server, which is probed before any work starts.

Once a run is open, a server outage never stops the stage: records go through a bounded queue that a background
thread delivers (``RunLogger``); what is still undelivered when the stage ends is written beside its reports
and replayed later with ``python -m pipelines.tracking replay FILE``. A run whose process was killed (SIGKILL,
OOM) is marked KILLED by the next run of its stage on the same host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import PIL.Image
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.tracking.multimedia import convert_to_pil_image

from dalle.config import Params

PROBE_TIMEOUT_S = "10"  # also the limit of each request a stage makes: a down server costs seconds, not minutes
FLUSH_WAIT_ENV = "DALLE_MLFLOW_FLUSH_WAIT_S"  # seconds a finished stage waits for a down server (default 60)
FLUSH_WAIT_S = 60.0
MAX_QUEUED = 10_000  # records kept in memory; older ones spill to the unsent file
MAX_MERGED = 1_000  # metrics per request when catching up (MLflow's log_batch limit)
RETRY_S = (1.0, 10.0)  # back-off between attempts while the server is down: first, longest
UNSENT = "mlflow_unsent_{run_id}.jsonl"


def repo_root(checkout: Path | None = None) -> Path:
    """The repository that owns this checkout (the original one when run inside a DVC experiment copy)."""
    root = checkout or Path(__file__).resolve().parents[1]
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


class TrackingUnavailable(RuntimeError):
    pass


@contextmanager
def _http_limits() -> Iterator[None]:
    """MLflow's HTTP client reads these per request: one attempt (the caller retries), ``PROBE_TIMEOUT_S`` to
    connect and for each read, so a host that accepts and never answers fails as fast as a closed port."""
    overrides = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": PROBE_TIMEOUT_S}
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_reachable(uri: str) -> None:
    """Fail now, not after training, if the tracking store cannot be used."""
    try:
        with _http_limits():
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # any failure here means the store is unusable; say which store
        raise TrackingUnavailable(
            f"MLflow tracking store {uri} is unreachable ({type(err).__name__}: {str(err)[:300]}). "
            "Start the server, or unset MLFLOW_TRACKING_URI to use the local sqlite store."
        ) from None


def _experiment_id(name: str, uri: str) -> str:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_location(uri))


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database file; a server chooses its own."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix) :]).resolve().parent / "mlartifacts").as_uri()


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    except FileNotFoundError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def run_tags(stage: str) -> dict[str, str]:
    """Standard tags; ``host`` and ``pid`` let a later run tell that this one's process died."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    tags = {"stage": stage, "git_commit": commit, "mlflow.source.git.commit": commit}
    tags["git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    tags.update(host=socket.gethostname(), pid=str(os.getpid()))
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def _now_ms() -> int:
    return int(time.time() * 1000)


def _take(queue: deque[dict], merge: bool = True) -> list[dict]:
    """The oldest record and, if it holds metrics only, the metrics-only records right after it (one request
    for a backlog)."""
    if not queue:
        return []
    parts = [queue.popleft()]
    metrics_only = {"kind", "metrics"}
    if merge and parts[0].keys() == metrics_only:
        count = len(parts[0]["metrics"])
        while queue and queue[0].keys() == metrics_only and count + len(queue[0]["metrics"]) <= MAX_MERGED:
            count += len(queue[0]["metrics"])
            parts.append(queue.popleft())
    return parts


def _send(client: MlflowClient, run_id: str, parts: list[dict], folder: Path) -> None:
    """Deliver records (those of ``_take``) to the run; image files are relative to ``folder``."""
    record = parts[0]
    kind = record["kind"]
    if kind == "batch":
        metrics = [Metric(*row) for part in parts for row in part.get("metrics", ())]
        params = [Param(k, v) for k, v in record.get("params", {}).items()]
        tags = [RunTag(k, v) for k, v in record.get("tags", {}).items()]
        client.log_batch(run_id, metrics, params, tags, synchronous=True)
    elif kind == "artifact":
        client.log_artifact(run_id, record["path"], record["artifact_path"])
    elif kind == "dict":
        client.log_dict(run_id, record["dictionary"], record["artifact_file"])
    elif kind == "image":
        image = record["image"] if "image" in record else PIL.Image.open(folder / record["file"])
        client.log_image(run_id, image, key=record["key"], step=record["step"], timestamp=record["timestamp"])
    elif kind == "end":
        client.set_terminated(run_id, record["status"], record["end_time"])
    else:
        raise ValueError(f"unknown MLflow record kind {kind!r}")


def _rejected(err: Exception) -> bool:
    """The store refused the request (a bad value, a deleted run): retrying cannot help."""
    if isinstance(err, FileNotFoundError):
        return True
    status = err.get_http_status_code() if isinstance(err, MlflowException) else 500
    return 400 <= status < 500 and status not in (408, 429)


class RunLogger:
    """Params, metrics, tags and artifacts of one MLflow run, delivered by a background thread so that a tracking
    server going away never stops or slows the stage.

    Records wait in a queue of at most ``MAX_QUEUED`` (older ones spill to the unsent file). A failed delivery
    warns once and is retried with back-off until it goes through. ``close`` queues the run's end, waits up to
    ``DALLE_MLFLOW_FLUSH_WAIT_S`` for the queue to drain, and writes what is left to ``unsent`` as JSON lines.
    """

    def __init__(self, client: MlflowClient, uri: str, run: Run, stage: str, unsent: Path):
        self.client, self.uri, self.info, self.stage, self.unsent = client, uri, run.info, stage, unsent
        self._queue: deque[dict] = deque()
        self._lock = threading.Lock()
        self._wake, self._closing = threading.Event(), threading.Event()
        self._deadline, self.flush_wait = float("inf"), _flush_wait()
        self._failure: Exception | None = None
        self._merge_after = 0  # records to send one by one after a merged batch was refused
        self._images = 0
        self._thread = threading.Thread(target=self._deliver, name=f"mlflow {run.info.run_id}", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str:
        return self.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = _now_ms()
        self._put({"kind": "batch", "metrics": [(k, float(v), now, step or 0) for k, v in metrics.items()]})

    def log_params(self, params: dict[str, object]) -> None:
        self._put({"kind": "batch", "params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put({"kind": "batch", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._put({"kind": "artifact", "path": str(Path(local_path).resolve()), "artifact_path": artifact_path})

    def log_dict(self, dictionary: dict, artifact_file: str) -> None:
        self._put(
            {
                "kind": "dict",
                "dictionary": json.loads(json.dumps(dictionary, default=str)),
                "artifact_file": artifact_file,
            }
        )

    def log_image(self, image, key: str, step: int) -> None:
        image = convert_to_pil_image(image) if not isinstance(image, PIL.Image.Image) else image
        self._put({"kind": "image", "image": image, "key": key, "step": step, "timestamp": _now_ms()})

    def _put(self, record: dict) -> None:
        with self._lock:
            self._queue.append(record)
            if len(self._queue) > MAX_QUEUED:
                self._write([self._queue.popleft()])
        self._wake.set()

    def _deliver(self) -> None:
        """The sender thread: oldest records first, each retried until the store takes it or ``close`` gives up."""
        delay = RETRY_S[0]
        while True:
            self._wake.clear()
            with self._lock:
                parts = _take(self._queue, merge=self._merge_after == 0)
                self._merge_after = max(0, self._merge_after - len(parts))
            if not parts:
                if self._closing.is_set():
                    return
                self._wake.wait()
                continue
            try:
                _send(self.client, self.run_id, parts, self.unsent.parent)
            except Exception as err:
                if _rejected(err) and len(parts) > 1:  # find the culprit: the merged records one at a time
                    with self._lock:
                        self._queue.extendleft(reversed(parts))
                        self._merge_after = len(parts)
                    continue
                if _rejected(err):
                    refused = f"MLflow run {self.run_id} at {self.uri} refused {_describe(parts[0])}: {_short(err)}"
                    warnings.warn(refused, stacklevel=1)
                    continue
                with self._lock:
                    self._queue.extendleft(reversed(parts))
                if self._failure is None:
                    warnings.warn(
                        f"MLflow tracking store {self.uri} failed ({_short(err)}); stage {self.stage} goes on, "
                        f"keeping the records of run {self.run_id} and retrying",
                        stacklevel=1,
                    )
                self._failure = err
                if time.monotonic() >= self._deadline:
                    return
                self._closing.wait(delay)
                delay = RETRY_S[0] if self._closing.is_set() else min(2 * delay, RETRY_S[1])
                continue
            if self._failure is not None:
                print(f"MLflow tracking store {self.uri} is back; delivering run {self.run_id}", file=sys.stderr)
                self._failure, delay = None, RETRY_S[0]

    def close(self, status: str) -> None:
        """End the run (``status``), wait a bounded time for delivery, and keep what is left in ``unsent``."""
        self._put({"kind": "end", "status": status, "end_time": _now_ms()})
        self._deadline = time.monotonic() + self.flush_wait
        self._closing.set()
        self._wake.set()
        try:
            self._thread.join(self.flush_wait + float(PROBE_TIMEOUT_S) + 5)
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, keep the records
            self._deadline = 0.0
        with self._lock:
            left = list(self._queue)
            self._queue.clear()
            if left:
                self._write(left)
        if self.unsent.is_file():
            warnings.warn(
                f"MLflow tracking store {self.uri} did not take every record of run {self.run_id} ({self.stage}) "
                f"within {self.flush_wait:.0f} s; they are in {self.unsent}. When the server is back, run: "
                f"python -m pipelines.tracking replay {self.unsent}",
                stacklevel=2,
            )

    def _write(self, records: list[dict]) -> None:
        """Append records to the unsent file (a header line first), images as PNG files beside it."""
        self.unsent.parent.mkdir(parents=True, exist_ok=True)
        new = not self.unsent.is_file()
        with self.unsent.open("a") as handle:
            if new:
                header = {"kind": "run", "run_id": self.run_id, "tracking_uri": self.uri, "stage": self.stage}
                handle.write(json.dumps(header) + "\n")
            for record in records:
                if "image" in record:
                    self._images += 1
                    file = Path(self.unsent.stem) / f"{self._images:06d}.png"
                    (self.unsent.parent / file).parent.mkdir(exist_ok=True)
                    record["image"].save(self.unsent.parent / file)
                    record = {**{k: v for k, v in record.items() if k != "image"}, "file": str(file)}
                handle.write(json.dumps(record) + "\n")


def _short(err: Exception) -> str:
    """An exception in a line: MLflow's client puts the cause (e.g. connection refused) at the end of a long one."""
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= 300 else f"{text[:140]} ... {text[-140:]}"


def _describe(record: dict) -> str:
    """What a record holds, for a warning: its keys or its file."""
    if record["kind"] == "batch":
        keys = [*record.get("params", {}), *record.get("tags", {}), *(row[0] for row in record.get("metrics", ()))]
        return f"params/tags/metrics {', '.join(keys)}"
    return f"{record['kind']} {record.get('path') or record.get('artifact_file') or record.get('key')}"


def _flush_wait() -> float:
    text = os.environ.get(FLUSH_WAIT_ENV, str(FLUSH_WAIT_S))
    try:
        return max(0.0, float(text))
    except ValueError:
        raise ValueError(f"{FLUSH_WAIT_ENV}={text!r} is not a number of seconds") from None


_active: RunLogger | None = None  # the run of the stage executing now (``stage_run``)


def _target():
    """The open stage run (``stage_run``), else MLflow's fluent API and its active run (an Optuna trial)."""
    return mlflow if _active is None else _active


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    _target().log_metrics(metrics, step=step)


def log_params(params: dict[str, object]) -> None:
    _target().log_params(params)


def log_artifact(local_path: str | Path, artifact_path: str | None = None) -> None:
    _target().log_artifact(str(local_path), artifact_path)


def log_dict(dictionary: dict, artifact_file: str) -> None:
    _target().log_dict(dictionary, artifact_file)


def log_image(image, key: str, step: int) -> None:
    _target().log_image(image, key=key, step=step)


def _host_process_gone(tags: dict[str, str]) -> bool:
    """The run's process ran on this host and has exited (a pid reused since then reads as alive)."""
    if tags.get("host") != socket.gethostname() or not tags.get("pid", "").isdigit():
        return False
    try:
        os.kill(int(tags["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _names_run(path: str | None, run_id: str) -> bool:
    return bool(path) and Path(path).is_file() and Path(path).read_text().strip() == run_id


def mark_killed_runs(client: MlflowClient, experiment_id: str, stage: str, keep: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of ``stage`` whose process on this host died without ending them. Runs of
    other hosts or live processes, ``keep``, runs a training checkpoint will continue (their run-id file still
    names them) and runs whose records await a replay are left alone. Returns the ids marked."""
    query = f"tags.stage = '{stage}' and attributes.status = 'RUNNING' and tags.host = '{socket.gethostname()}'"
    marked = []
    for run in client.search_runs([experiment_id], query, max_results=1000):
        tags, run_id = run.data.tags, run.info.run_id
        if run_id == keep or not _host_process_gone(tags):
            continue
        unsent = Path(tags.get("mlflow_unsent_dir", "/nonexistent")) / UNSENT.format(run_id=run_id)
        if _names_run(tags.get("mlflow_resume_file"), run_id) or unsent.is_file():
            continue
        client.set_terminated(run_id, "KILLED")
        print(f"MLflow run {run_id} of {stage}: process {tags['pid']} is gone, marked KILLED", file=sys.stderr)
        marked.append(run_id)
    return marked


def _original_checkout(folder: Path) -> Path:
    """``folder`` in the original checkout when it lies in a DVC experiment copy, which DVC deletes afterwards."""
    parts = folder.resolve().parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i], *parts[i + 4 :])
    return folder.resolve()


@contextmanager
def stage_run(
    stage: str,
    params: Params,
    resume_file: Path | None = None,
    tags: dict[str, str] | None = None,
    reports: Path | None = None,
) -> Iterator[RunLogger]:
    """Open the MLflow run of one stage execution, with every param logged and the standard tags set; log
    through the yielded ``RunLogger`` (or ``log_metrics`` / ``log_image``), which survives a server outage.

    With ``resume_file`` (kept beside a training checkpoint), a stage resumed after a kill continues the
    MLflow run it started instead of opening a second one; the caller deletes the file when training ends.
    ``tags`` are added to the standard ones (e.g. ``mlflow.parentRunId`` to nest the run under another).
    Records the server has not taken when the stage ends go to ``reports/mlflow_unsent_<run id>.jsonl``
    (``reports`` defaults to ``reports/<stage>``). Killed earlier runs of the stage are marked KILLED first.
    """
    global _active
    _flush_wait()  # a bad DALLE_MLFLOW_FLUSH_WAIT_S fails before the run opens
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    with _http_limits():
        client = MlflowClient(uri)
        experiment_id = _experiment_id(params.mlflow.experiment, uri)
        run_id = _resumable_run(resume_file, uri, experiment_id)
        mark_killed_runs(client, experiment_id, stage, keep=run_id)
        folder = _original_checkout(reports if reports is not None else Path("reports") / stage)
        all_tags = {**run_tags(stage), **(tags or {}), "mlflow_unsent_dir": str(folder)}
        if resume_file is not None:
            all_tags["mlflow_resume_file"] = str(resume_file.resolve())
        if run_id is None:
            run = client.create_run(experiment_id, run_name=stage, tags=resolve_tags(all_tags))
        else:  # this process's host and pid replace the killed one's
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items()], synchronous=True)
            client.update_run(run_id, status="RUNNING")
            run = client.get_run(run_id)
        if resume_file is not None:
            resume_file.parent.mkdir(parents=True, exist_ok=True)
            resume_file.write_text(run.info.run_id)
        logger = RunLogger(client, uri, run, stage, folder / UNSENT.format(run_id=run.info.run_id))
        if run_id is None:
            logger.log_params(params.flat())
        status = "FAILED"
        _active = logger
        try:
            yield logger
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            _active = None
            logger.close(status)


@contextmanager
def training_run(
    stage: str,
    params: Params,
    checkpoint: Path,
    resume: bool,
    tags: dict[str, str] | None = None,
    reports: Path | None = None,
) -> Iterator[RunLogger]:
    """``stage_run`` for a resumable training stage with its checkpoint at ``checkpoint``.

    The MLflow run id is kept beside the checkpoint so that a run resumed after a kill continues its MLflow run.
    ``resume: false`` deletes both first (a fresh start opens a fresh run); a finished run deletes both, so a
    later run with other params starts fresh.
    """
    run_id_file = checkpoint.with_name("mlflow_run_id")
    if not resume:
        remove_checkpoint(checkpoint)
        run_id_file.unlink(missing_ok=True)
    with stage_run(stage, params, resume_file=run_id_file, tags=tags, reports=reports) as run:
        yield run
    remove_checkpoint(checkpoint)
    run_id_file.unlink(missing_ok=True)


def remove_checkpoint(checkpoint: Path) -> None:
    """The checkpoint file and, for the prior under FSDP, its sharded directory (``last.dcp``, see
    ``dalle/parallel.py``) with any copy a kill mid-write left behind."""
    checkpoint.unlink(missing_ok=True)
    for suffix in (".dcp", ".dcp.tmp", ".dcp.old"):
        shutil.rmtree(checkpoint.with_suffix(suffix), ignore_errors=True)


def _resumable_run(resume_file: Path | None, uri: str, experiment_id: str) -> str | None:
    """The run id saved beside a checkpoint, if that run exists in this store and experiment."""
    if resume_file is None or not resume_file.is_file():
        return None
    run_id = resume_file.read_text().strip()
    try:
        run = MlflowClient(uri).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    return run_id if run.info.experiment_id == experiment_id else None


class MlflowCurves:
    """Training-loop callbacks that log to the stage's MLflow run: training rows as ``train_<name>``, validation
    rows as they are. Stages mix it in before their trainer's ``Callbacks``, which supplies the other hooks."""

    def on_train_log(self, step: int, metrics: dict[str, float]) -> None:
        log_metrics({f"train_{k}": v for k, v in metrics.items()}, step=step)

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        log_metrics(metrics, step=step)


def flat_metrics(tree: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as ``{"a.b": value}`` for ``mlflow.log_metrics``."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def replay(path: Path, uri: str | None = None) -> int:
    """Deliver an unsent file (``RunLogger``) into its run, in order, ending the run as the stage did; then delete
    the file and its images. A record the store refuses (e.g. an artifact file deleted since) is skipped with a
    warning; an unreachable store stops it with the file kept. Returns the number of records."""
    lines = path.read_text().splitlines()
    header = json.loads(lines[0]) if lines else {}
    if header.get("kind") != "run":
        raise ValueError(f"{path}: not an unsent MLflow records file (its first line is not a run header)")
    uri, run_id = uri or header["tracking_uri"], header["run_id"]
    check_reachable(uri)
    client = MlflowClient(uri)
    queue = deque(json.loads(line) for line in lines[1:])
    count = len(queue)
    while queue:
        parts = _take(queue)
        try:
            _send(client, run_id, parts, path.parent)
        except Exception as err:
            if not _rejected(err):
                raise
            for part in parts:  # one at a time, to skip only what is refused
                try:
                    _send(client, run_id, [part], path.parent)
                except Exception as part_err:
                    if not _rejected(part_err):
                        raise
                    skipped = f"{path}: MLflow run {run_id} refused {_describe(part)} ({_short(part_err)}); skipped"
                    warnings.warn(skipped, stacklevel=2)
    path.unlink()
    shutil.rmtree(path.with_suffix(""), ignore_errors=True)
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.tracking", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    replayer = commands.add_parser("replay", help="deliver a stage's mlflow_unsent_<run id>.jsonl into its run")
    replayer.add_argument("file", type=Path)
    replayer.add_argument("--tracking-uri", help="the store to deliver to (default: the one the stage used)")
    args = parser.parse_args(argv)
    count = replay(args.file, args.tracking_uri)
    print(f"replayed {count} records from {args.file} into their MLflow run; removed the file")


if __name__ == "__main__":
    main()
