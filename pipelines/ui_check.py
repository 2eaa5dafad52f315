"""The MLflow UI in a real browser: serve a store on 127.0.0.1, render its pages in headless Chromium, check that
they show the pipeline executions and save screenshots, so that a UI which opens empty, on MLflow 3's GenAI overview
or without the runs' names is seen without opening a browser.

    python -m pipelines.ui_check [--tracking-uri URI] [--out reports/ui]       # make ui-check

Pages: the experiment's runs page (the address ``python -m pipelines.tracking ui-url`` prints), the pipeline
executions with their headline metrics and the params that differ (an MLflow shared view saved on the experiment,
``pipeline_view``, which ``make ui`` users open at the printed address too), and the newest execution's run page.

Chromium runs through ``pipelines/chromium.py``. Each page is waited for until it shows the newest executions by name
(in the view, with their metric values as the store holds them), then captured at 1600x1000.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.chromium import CHROMIUM, Browser, BrowserError, browser
from pipelines.params import load_params
from pipelines.pipeline_runs import HEADLINE, PIPELINE, headline
from pipelines.tracking import run_url, runs_url, tracking_uri

HOST = "127.0.0.1"
START_TIMEOUT_S = 300  # the server's first start on a busy machine
RENDER_TIMEOUT_S = 120
VIEW = "dalle-pipelines"  # the shared view's key: the experiment tag ``mlflow.sharedViewState.<VIEW>``
SHOWN_RUNS = 5  # the newest executions each page must show
# The MLflow Assistant opens itself on a first visit from localhost and takes a quarter of the width: closed, as a
# visitor would, before each screenshot.
CLOSE_ASSISTANT = """(() => {
  const button = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (button) button.click();
  return Boolean(button);
})()"""
# The runs table (AG Grid) as rendered: run id -> column id -> the cell's text.
RUNS_TABLE = """(() => {
  const table = {};
  for (const cell of document.querySelectorAll('[role=row][row-id] [role=gridcell][col-id]')) {
    const run = cell.closest('[role=row]').getAttribute('row-id');
    (table[run] = table[run] || {})[cell.getAttribute('col-id')] = cell.innerText.trim();
  }
  return table;
})()"""


class UiCheckFailed(RuntimeError):
    pass


def shown_number(value: float) -> str:
    """A metric as the runs table prints it (JavaScript's ``String(number)``)."""
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(value))


@dataclass(frozen=True)
class Rendered:
    text: str  # what the page shows, as text
    table: dict[str, dict[str, str]]  # the runs table's cells, by run id and column id


@dataclass(frozen=True)
class Page:
    name: str  # the screenshot's file name, without .png
    url: str
    texts: list[str]  # the page must show each
    cells: dict[str, dict[str, str]] = field(default_factory=dict)  # run id -> column id -> text its row must show

    def problems(self, shown: Rendered) -> list[str]:
        """What the page does not show yet. Each run of ``cells`` must have its row; of its cells, those in view
        (the grid leaves out columns scrolled out of it) must match, and at least one must be in view."""
        problems = [f"no text {text!r}" for text in self.texts if text not in shown.text]
        for run_id, expected in self.cells.items():
            row = shown.table.get(run_id)
            if row is None:
                problems.append(f"no row for run {run_id}")
                continue
            seen = [column for column in expected if column in row]
            if expected and not seen:
                problems.append(f"run {run_id}: none of its columns {sorted(expected)} in view")
            problems += [
                f"run {run_id}: {column} shows {row[column]!r}, not {expected[column]!r}"
                for column in seen
                if row[column] != expected[column]
            ]
        return problems


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def absolute_store(uri: str) -> str:
    """A relative SQLite path made absolute: the server runs in a scratch directory."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _healthy(base: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never through a proxy
    try:
        with opener.open(f"{base}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def serve(uri: str, scratch: Path) -> Iterator[str]:
    """The UI's address for a store: an MLflow server started on 127.0.0.1 for a database or directory store (as
    ``make ui`` does, one worker), stopped afterwards; the server itself for an http(s) store."""
    if uri.startswith(("http://", "https://")):
        yield uri.rstrip("/")
        return
    port = free_port()
    base = f"http://{HOST}:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", absolute_store(uri)]
    command += ["--host", HOST, "--port", str(port), "--workers", "1"]
    quiet = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    log_path = scratch / "mlflow-server.log"
    with log_path.open("wb") as log:  # its own session: stopped as one group with its workers
        server = subprocess.Popen(
            command, cwd=scratch, env={**os.environ, **quiet}, stdout=log, stderr=log, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(base):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise UiCheckFailed(f"the MLflow server for {uri} did not answer {base}/health; its log:\n{tail}")
            time.sleep(0.5)
        yield base
    finally:
        _stop_group(server)


def _stop_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def pipeline_runs(client: MlflowClient, experiment_id: str) -> list:
    """The pipeline executions' runs (tag stage=pipeline), newest first."""
    query = f"tags.stage = '{PIPELINE}'"
    return client.search_runs([experiment_id], query, max_results=1000, order_by=["attributes.start_time DESC"])


def headline_keys(runs: list) -> list[str]:
    """The headline metrics the runs carry (``pipeline_runs.HEADLINE``)."""
    return sorted({key for run in runs for key in run.data.metrics if any(headline(s, {key: 0.0}) for s in HEADLINE)})


def differing_params(runs: list) -> list[str]:
    keys = sorted({key for run in runs for key in run.data.params})
    return [key for key in keys if len({run.data.params.get(key) for run in runs}) > 1]


def pipeline_view(client: MlflowClient, experiment_id: str, runs: list) -> str:
    """Save (or refresh) the experiment's shared view of its pipeline executions: their runs only, newest first, a
    column per headline metric and per param that differs between them. Returns the view's key, which the runs
    page opens with ``&viewStateShareKey=<key>``."""
    columns = [f"metrics.`{key}`" for key in headline_keys(runs)]
    columns += [f"params.`{key}`" for key in differing_params(runs)]
    state = {
        "searchFilter": f"tags.stage = '{PIPELINE}'",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "selectedColumns": columns,
    }
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW}", json.dumps(state))
    return VIEW


def executions(client: MlflowClient, experiment: str) -> tuple[str, list]:
    """The experiment's id and its pipeline executions' runs, newest first; fails when there are none."""
    found = client.get_experiment_by_name(experiment)
    runs = pipeline_runs(client, found.experiment_id) if found else []
    if not runs:
        raise UiCheckFailed(f"no pipeline execution in experiment {experiment!r} of this store: run `make repro` first")
    return found.experiment_id, runs


def pages(client: MlflowClient, base: str, experiment_id: str, runs: list) -> list[Page]:
    """The pages to check on the UI at ``base``: the runs page, the pipeline view and the newest complete
    execution's run page."""
    newest = runs[:SHOWN_RUNS]
    names = list(dict.fromkeys(run.info.run_name for run in newest))
    view = pipeline_view(client, experiment_id, runs)
    values = {  # of ended runs only: a running one may gain values between this look and the page's
        run.info.run_id: {f"metrics.`{key}`": shown_number(value) for key, value in run.data.metrics.items()}
        for run in newest
        if run.info.status != "RUNNING"
    }
    shown = next((run for run in runs if run.info.status == "FINISHED"), runs[0])
    run_page = run_url(base, experiment_id, shown.info.run_id)  # with workflowType: the training layout
    return [
        Page("runs", runs_url(base, experiment_id), names),
        Page("pipelines", f"{runs_url(base, experiment_id)}&viewStateShareKey={view}", names, values),
        Page("pipeline_run", run_page, [shown.info.run_name, *sorted(shown.data.metrics)]),
    ]


def render(chrome: Browser, session: str, page: Page) -> Rendered:
    """The page once it shows what it should, with the assistant closed."""
    chrome.wait_until(session, lambda: page.problems(rendered(chrome, session)), RENDER_TIMEOUT_S)
    chrome.evaluate(session, CLOSE_ASSISTANT)
    time.sleep(1)  # the layout settles
    return rendered(chrome, session)


def rendered(chrome: Browser, session: str) -> Rendered:
    return Rendered(chrome.text(session), chrome.evaluate(session, RUNS_TABLE) or {})


def check(uri: str, out: Path, experiment: str, chromium: Path = CHROMIUM) -> dict[str, Rendered]:
    """Serve the store, render each page until it shows what it should, save its screenshot as ``out/<name>.png``.
    Returns what each page showed, by name."""
    client = MlflowClient(absolute_store(uri))
    experiment_id, runs = executions(client, experiment)
    shown = {}
    with tempfile.TemporaryDirectory(prefix="ui-check-") as scratch, serve(uri, Path(scratch)) as base:
        with browser(Path(scratch), chromium) as chrome:
            for page in pages(client, base, experiment_id, runs):
                session, shot = chrome.open(page.url), out / f"{page.name}.png"
                try:
                    shown[page.name] = render(chrome, session, page)
                except BrowserError as err:
                    chrome.screenshot(session, shot)  # what the page showed instead
                    raise UiCheckFailed(f"{page.name} ({page.url}), screenshot in {shot}: {err}") from None
                chrome.screenshot(session, shot)
                print(f"{page.name}: {page.url} -> {shot}")
    return shown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ui_check", description=__doc__)
    parser.add_argument("--tracking-uri", help="the store to serve (default: the stages' store, mlflow.db)")
    parser.add_argument("--params", default="params.yaml", help="whose mlflow.experiment to open")
    parser.add_argument("--out", type=Path, default=Path("reports/ui"), help="where the screenshots go")
    parser.add_argument("--chromium", type=Path, default=CHROMIUM)
    args = parser.parse_args(argv)
    uri = args.tracking_uri or tracking_uri()
    try:
        check(uri, args.out, load_params(args.params).mlflow.experiment, args.chromium)
    except (UiCheckFailed, BrowserError, FileNotFoundError) as err:
        sys.exit(f"ui-check: {err}")


if __name__ == "__main__":
    main()
