"""Buffered delivery of one MLflow run's records, so that a tracking server going away never stops a stage.

Records (params, metrics, tags, artifacts, images, dataset inputs, the run's end) wait in a bounded queue that a
background thread delivers oldest first (``RunLogger``); a record with a ``run_id`` goes to that run instead (the
pipeline's parent run, which a stage ends through its own outbox). A failed delivery warns once and is retried
with back-off; what the server has not taken when the stage ends is spilled to ``mlflow_unsent_<run id>.jsonl``
(images as PNG files beside it), and ``replay`` delivers that file later (``python -m pipelines.tracking replay
FILE``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import PIL.Image
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.multimedia import convert_to_pil_image
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

PROBE_TIMEOUT_S = "10"  # also the limit of each request a stage makes: a down server costs seconds, not minutes
FLUSH_WAIT_ENV = "DALLE_MLFLOW_FLUSH_WAIT_S"  # seconds a finished stage waits for a down server (default 60)
FLUSH_WAIT_S = 60.0
MAX_QUEUED = 10_000  # records kept in memory; older ones spill to the unsent file
MAX_MERGED = 1_000  # metrics per request when catching up (MLflow's log_batch limit)
RETRY_S = (1.0, 10.0)  # back-off between attempts while the server is down: first, longest
UNSENT = "mlflow_unsent_{run_id}.jsonl"


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


def _flush_wait() -> float:
    text = os.environ.get(FLUSH_WAIT_ENV, str(FLUSH_WAIT_S))
    try:
        return max(0.0, float(text))
    except ValueError:
        raise ValueError(f"{FLUSH_WAIT_ENV}={text!r} is not a number of seconds") from None


def _short(err: Exception) -> str:
    """An exception in a line: MLflow's client puts the cause (e.g. connection refused) at the end of a long one."""
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= 300 else f"{text[:140]} ... {text[-140:]}"


def _describe(record: dict) -> str:
    """What a record holds, for a warning: its keys or its file."""
    if record["kind"] == "batch":
        keys = [*record.get("params", {}), *record.get("tags", {}), *(row[0] for row in record.get("metrics", ()))]
        return f"params/tags/metrics {', '.join(keys)}"
    if record["kind"] == "inputs":
        return f"dataset inputs {', '.join(entry['name'] for entry in record['datasets'])}"
    return f"{record['kind']} {record.get('path') or record.get('artifact_file') or record.get('key')}"


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


def _dataset_input(entry: dict) -> DatasetInput:
    fields = ("name", "digest", "source_type", "source", "schema", "profile")
    dataset = Dataset(**{field: entry.get(field) for field in fields})
    return DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, entry["context"])])


def _send(client: MlflowClient, run_id: str, parts: list[dict], folder: Path) -> None:
    """Deliver records (those of ``_take``) to the run, or to the run a record names; image files are relative to
    ``folder``."""
    record = parts[0]
    kind, run_id = record["kind"], record.get("run_id", run_id)
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
    elif kind == "inputs":
        client.log_inputs(run_id, [_dataset_input(entry) for entry in record["datasets"]])
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
        self.latest: dict[str, float] = {}  # the last value logged of each of this run's metrics
        self._thread = threading.Thread(target=self._deliver, name=f"mlflow {run.info.run_id}", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str:
        return self.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, run_id: str | None = None) -> None:
        """Metrics of this run, or of ``run_id`` (the pipeline's run)."""
        now = _now_ms()
        record: dict = {"kind": "batch", "metrics": [(k, float(v), now, step or 0) for k, v in metrics.items()]}
        if run_id is None:
            self.latest.update((k, float(v)) for k, v in metrics.items())
        else:
            record["run_id"] = run_id
        self._put(record)

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

    def log_inputs(self, datasets: list[dict], run_id: str | None = None) -> None:
        """Dataset inputs (``mlflow_inputs.dataset_input`` entries) of this run, or of ``run_id``."""
        self._put({"kind": "inputs", "datasets": datasets, **({"run_id": run_id} if run_id else {})})

    def end_run(self, run_id: str, status: str) -> None:
        """End another run (the pipeline's), in order with this run's records."""
        self._put({"kind": "end", "run_id": run_id, "status": status, "end_time": _now_ms()})

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


def replay(path: Path, uri: str | None = None, *, check: Callable[[str], None]) -> int:
    """Deliver an unsent file (``RunLogger``) into its run, in order, ending the run as the stage did; then delete
    the file and its images. A record the store refuses (e.g. an artifact file deleted since) is skipped with a
    warning; an unreachable store stops it with the file kept: ``check(uri)`` raises first if the store cannot
    be used. Returns the number of records."""
    lines = path.read_text().splitlines()
    header = json.loads(lines[0]) if lines else {}
    if header.get("kind") != "run":
        raise ValueError(f"{path}: not an unsent MLflow records file (its first line is not a run header)")
    uri, run_id = uri or header["tracking_uri"], header["run_id"]
    check(uri)
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
