"""The team's services on one machine, all under ``services/``: a PostgreSQL server (the MLflow server's store and
shared Optuna studies), an ``mlflow server`` on it that also serves artifacts, and a directory DVC remote.

    python -m pipelines.services start [--pg-port 55432] [--mlflow-port 55000]    # make services
    python -m pipelines.services stop                                              # make services-stop
    python -m pipelines.services status                                            # make services-status
    eval "$(python -m pipelines.services env)"      # point this shell's stages and sweeps at them

Everything listens on 127.0.0.1 only. PostgreSQL is the OS's (``apt-get install -y postgresql``), run from a data
directory of its own under ``services/`` on its own port, never the distribution's cluster; initdb and the server
refuse to run as root, so under root they run as the ``postgres`` user (created when absent). The superuser's
password is generated once and kept in ``services/pgpass``, libpq's password file (mode 0600): URLs carry no
password, so they can be logged (a sweep tags its storage URL on its MLflow run), and clients read it through
``PGPASSFILE``. The DVC remote goes into ``.dvc/config.local`` (git-ignored), so no committed file changes; it is
made the default only when the project names none. ``start`` is idempotent (what runs is left alone) and a pid
file whose process is gone is discarded. ``DALLE_SERVICES_DIR`` moves the whole directory.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIR_ENV = "DALLE_SERVICES_DIR"
HOST = "127.0.0.1"
DEFAULT_PORTS = {"pg_port": 55432, "mlflow_port": 55000}
PG_ROLE = "dalle"  # the cluster's superuser, a database role (no OS user of that name is needed)
SERVER_USER = "postgres"  # the OS user running PostgreSQL when we are root
DATABASES = ("mlflow", "optuna")
DVC_REMOTE = "services"
# Request workers of the MLflow server: enough for a few people and sweep workers, light on a small machine.
MLFLOW_WORKERS = 2
START_TIMEOUT_S = 300  # a first start creates the tables: ~30 s on 2 idle cores, minutes on busy ones
INSTALL_POSTGRES = "apt-get install -y postgresql"
INSTALL_DRIVER = "make install EXTRAS=dev,team"


class ServicesError(RuntimeError):
    """A service that cannot start or be reached; the message says what to install or change."""


class Layout:
    """Where each service keeps its state under the services directory."""

    def __init__(self, root: Path):
        self.root = root
        self.config = root / "services.json"  # the ports the services were started with
        self.pgpass = root / "pgpass"
        self.pg_home = root / "postgres"  # owned by the server's user: its data directory and log
        self.pg_data = self.pg_home / "data"
        self.pg_log = self.pg_home / "postgres.log"
        self.mlflow_pid = root / "mlflow" / "mlflow.pid"
        self.mlflow_log = root / "mlflow" / "mlflow.log"
        self.artifacts = root / "mlflow" / "artifacts"
        self.dvc_remote = root / "dvc-remote"

    def ports(self) -> dict[str, int]:
        return {**DEFAULT_PORTS, **(json.loads(self.config.read_text()) if self.config.is_file() else {})}

    def postgres_url(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_ROLE}@{HOST}:{self.ports()['pg_port']}/{database}"

    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.ports()['mlflow_port']}"

    def environment(self) -> dict[str, str]:
        """What a shell (or a test) exports to use the services; OPTUNA_STORAGE is for ``--storage``."""
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_url(),
            "PGPASSFILE": str(self.pgpass),
            "OPTUNA_STORAGE": self.postgres_url("optuna"),
        }


def default_layout() -> Layout:
    return Layout(Path(os.environ.get(DIR_ENV) or REPO / "services").resolve())


def port_in_use(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        return probe.connect_ex((HOST, port)) == 0


# --- PostgreSQL -------------------------------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The directory of initdb and pg_ctl: $PG_BIN, else PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    candidates = [Path(os.environ["PG_BIN"])] if os.environ.get("PG_BIN") else []
    if shutil.which("pg_ctl"):
        candidates.append(Path(shutil.which("pg_ctl")).parent)
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    raise ServicesError(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin: install them "
        f"with `{INSTALL_POSTGRES}` (Debian/Ubuntu), or set PG_BIN to the directory that holds them"
    )


def pg_tool(layout: Layout, tool: str, *args: str) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program on the data directory, as the server's user under root (from its own folder: it
    may not enter the working directory)."""
    command = [str(postgres_bin() / tool), "-D", str(layout.pg_data), *args]
    command = ["runuser", "-u", SERVER_USER, "--", *command] if os.geteuid() == 0 else command
    return subprocess.run(command, cwd=layout.pg_home, capture_output=True, text=True)


def prepare_server_user(layout: Layout) -> None:
    """Under root: a ``postgres`` user that owns ``services/postgres`` and can reach it."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"]
            + ["--shell", "/usr/sbin/nologin", SERVER_USER],
            check=True,
        )
        user = pwd.getpwnam(SERVER_USER)
    os.chown(layout.pg_home, user.pw_uid, user.pw_gid)
    for folder in layout.pg_home.parents:  # the server opens its data directory by path: every parent must let it in
        mode = folder.stat()
        if mode.st_uid != user.pw_uid and not mode.st_mode & 0o001:
            raise ServicesError(
                f"the {SERVER_USER} user, which runs PostgreSQL under root, cannot enter {folder} (mode "
                f"{oct(mode.st_mode & 0o777)}): `chmod o+x {folder}`, or put the services elsewhere with "
                f"{DIR_ENV}=/var/tmp/dalle-services"
            )


def postgres_running(layout: Layout) -> bool:
    if not (layout.pg_data / "PG_VERSION").is_file():
        return False
    return pg_tool(layout, "pg_ctl", "status").returncode == 0


def init_postgres(layout: Layout) -> None:
    """A new cluster in ``services/postgres/data``: password authentication only, over TCP on 127.0.0.1 only."""
    password = secrets.token_urlsafe(24)
    pwfile = layout.pg_home / "initdb.pw"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if os.geteuid() == 0:
        shutil.chown(pwfile, SERVER_USER)
    try:
        options = ["-U", PG_ROLE, "--pwfile", str(pwfile), "--auth", "scram-sha-256", "--encoding", "UTF8"]
        done = pg_tool(layout, "initdb", *options, "--locale", "C")
    finally:
        pwfile.unlink()
    if done.returncode != 0:
        raise ServicesError(f"initdb failed in {layout.pg_data}:\n{done.stdout}{done.stderr}")
    with (layout.pg_data / "postgresql.conf").open("a") as conf:
        conf.write(f"\n# pipelines/services.py: TCP on loopback only, no Unix socket\nlisten_addresses = '{HOST}'\n")
        conf.write("unix_socket_directories = ''\n")
    # Written last: with it, the cluster counts as initialised.
    layout.pgpass.write_text(f"{HOST}:*:*:{PG_ROLE}:{password}\n")
    layout.pgpass.chmod(0o600)


def start_postgres(layout: Layout, port: int) -> None:
    started = pg_tool(layout, "pg_ctl", "start", "-l", str(layout.pg_log), "-w", "-t", "60", "-o", f"-p {port}")
    if started.returncode != 0:
        tail = layout.pg_log.read_text(errors="replace")[-2000:] if layout.pg_log.is_file() else ""
        raise ServicesError(f"PostgreSQL did not start (log {layout.pg_log}):\n{started.stderr}{tail}")


def create_databases(layout: Layout) -> None:
    try:
        import psycopg
    except ImportError:
        raise ServicesError(f"the PostgreSQL driver psycopg is missing: `{INSTALL_DRIVER}`") from None
    port = layout.ports()["pg_port"]
    # autocommit: CREATE DATABASE cannot run in a transaction
    with psycopg.connect(
        host=HOST, port=port, user=PG_ROLE, dbname="postgres", passfile=str(layout.pgpass), autocommit=True
    ) as connection:
        for name in DATABASES:
            if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                connection.execute(f'CREATE DATABASE "{name}"')


# --- MLflow server ----------------------------------------------------------------------------------------------


def mlflow_pid(layout: Layout) -> int | None:
    """The pid of the running MLflow server, or None (a pid file naming a dead or other process is removed)."""
    try:
        pid = int(layout.mlflow_pid.read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline")
        alive = not cmdline.exists() or b"mlflow\0server" in cmdline.read_bytes()
    except ProcessLookupError:
        alive = False
    except PermissionError:  # another user's process: not the server this user started
        alive = False
    if not alive:
        layout.mlflow_pid.unlink(missing_ok=True)
        return None
    return pid


def mlflow_healthy(layout: Layout) -> bool:
    try:
        with urllib.request.urlopen(f"{layout.mlflow_url()}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def start_mlflow(layout: Layout, port: int) -> subprocess.Popen:
    layout.artifacts.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port)]
    command += ["--workers", str(MLFLOW_WORKERS), "--backend-store-uri", layout.postgres_url("mlflow")]
    command += ["--serve-artifacts", "--artifacts-destination", str(layout.artifacts)]
    # The server's GenAI job runner (LLM judges, trace jobs) is not used here: two fewer processes.
    env = dict(os.environ, PGPASSFILE=str(layout.pgpass), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with layout.mlflow_log.open("ab") as log:  # its own session: it outlives this command and stops as a group
        process = subprocess.Popen(
            command, cwd=layout.root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    layout.mlflow_pid.write_text(f"{process.pid}\n")
    return process


def wait_for_mlflow(layout: Layout, process: subprocess.Popen | None) -> None:
    """Until the server answers; ``process`` when this command started it, else the pid file tells it lives."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not mlflow_healthy(layout):
        exited = process.poll() is not None if process else mlflow_pid(layout) is None
        if exited or time.monotonic() > deadline:
            tail = layout.mlflow_log.read_text(errors="replace")[-3000:]
            raise ServicesError(f"the MLflow server did not answer {layout.mlflow_url()}/health; its log:\n{tail}")
        time.sleep(0.5)


def stop_mlflow(layout: Layout) -> bool:
    pid = mlflow_pid(layout)
    if pid is None:
        return False
    os.killpg(pid, signal.SIGTERM)  # the server and its uvicorn workers
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            os.killpg(pid, 0)
            time.sleep(0.2)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    layout.mlflow_pid.unlink(missing_ok=True)
    return True


# --- DVC remote -------------------------------------------------------------------------------------------------


def dvc(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=REPO, env=env, capture_output=True, text=True)


def configure_dvc_remote(layout: Layout) -> str:
    layout.dvc_remote.mkdir(parents=True, exist_ok=True)
    if not (REPO / ".dvc").is_dir():
        return f"no DVC project at {REPO}: remote not configured"
    added = dvc("remote", "add", "--local", "--force", DVC_REMOTE, str(layout.dvc_remote))
    if added.returncode != 0:
        raise ServicesError(f"dvc remote add failed: {added.stderr.strip()}")
    project_default = dvc("config", "--project", "core.remote").stdout.strip()
    if project_default:
        return f"remote '{DVC_REMOTE}' -> {layout.dvc_remote} (not the default: the project's is '{project_default}')"
    dvc("remote", "default", "--local", DVC_REMOTE)
    return f"remote '{DVC_REMOTE}' -> {layout.dvc_remote}, the default (.dvc/config.local)"


# --- commands ---------------------------------------------------------------------------------------------------


def start(layout: Layout, pg_port: int | None = None, mlflow_port: int | None = None) -> None:
    layout.pg_home.mkdir(parents=True, exist_ok=True)
    layout.mlflow_pid.parent.mkdir(parents=True, exist_ok=True)
    wanted = {"pg_port": pg_port, "mlflow_port": mlflow_port}
    ports = {**layout.ports(), **{k: v for k, v in wanted.items() if v is not None}}
    running = {"pg_port": postgres_running(layout), "mlflow_port": mlflow_pid(layout) is not None}
    for key, name in (("pg_port", "PostgreSQL"), ("mlflow_port", "the MLflow server")):
        variable = key.upper()  # the Makefile's PG_PORT / MLFLOW_PORT
        if running[key] and ports[key] != layout.ports()[key]:
            raise ServicesError(f"{name} already runs on port {layout.ports()[key]}: `make services-stop` first")
        if not running[key] and port_in_use(ports[key]):
            raise ServicesError(
                f"port {ports[key]} on {HOST}, wanted by {name}, is taken by another program: choose another with "
                f"`make services {variable}=<port>`"
            )
    layout.config.write_text(json.dumps(ports) + "\n")

    prepare_server_user(layout)
    if not layout.pgpass.is_file():
        if (layout.pg_data / "PG_VERSION").is_file():
            raise ServicesError(
                f"{layout.pgpass} is gone, and with it the password of {layout.pg_data}: "
                f"`make services-stop`, remove {layout.root} and start over"
            )
        shutil.rmtree(layout.pg_data, ignore_errors=True)  # an initdb that did not finish
        init_postgres(layout)
    if not running["pg_port"]:
        start_postgres(layout, ports["pg_port"])
    create_databases(layout)
    process = None if running["mlflow_port"] else start_mlflow(layout, ports["mlflow_port"])
    wait_for_mlflow(layout, process)
    print(configure_dvc_remote(layout))


def stop(layout: Layout) -> None:
    print("mlflow: stopped" if stop_mlflow(layout) else "mlflow: was not running")
    if postgres_running(layout):
        stopped = pg_tool(layout, "pg_ctl", "stop", "-m", "fast", "-w")
        if stopped.returncode != 0:
            raise ServicesError(f"pg_ctl stop failed: {stopped.stderr.strip()}")
        print("postgres: stopped")
    else:
        print("postgres: was not running")


def unavailable(layout: Layout) -> list[str]:
    """The servers that do not run (or do not answer); empty when both do."""
    down = [] if postgres_running(layout) else [f"PostgreSQL ({layout.pg_data})"]
    return down + ([] if mlflow_healthy(layout) else [f"the MLflow server ({layout.mlflow_url()})"])


def status(layout: Layout) -> bool:
    """Print what runs and how to use it; True when both servers run."""
    postgres = postgres_running(layout)
    pid = mlflow_pid(layout)
    healthy = pid is not None and mlflow_healthy(layout)
    port = layout.ports()["pg_port"]
    print(f"postgres: {'running' if postgres else 'stopped'} on {HOST}:{port}, log {layout.pg_log}")
    state = "running" if healthy else ("starting (no answer on /health yet)" if pid else "stopped")
    print(f"mlflow:   {state} at {layout.mlflow_url()}{f' (pid {pid})' if pid else ''}, log {layout.mlflow_log}")
    remote = dvc("remote", "list", "--local").stdout.strip() if (REPO / ".dvc").is_dir() else ""
    print(f"dvc:      {remote or 'no remote in .dvc/config.local'}")
    print('\n# point a shell at them: eval "$(python -m pipelines.services env)"')
    for name, value in layout.environment().items():
        print(f"export {name}={value}")
    return postgres and healthy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "stop", "status", "env"))
    parser.add_argument("--pg-port", type=int, help=f"default: the last one used, else {DEFAULT_PORTS['pg_port']}")
    parser.add_argument("--mlflow-port", type=int, help=f"default: the last one, else {DEFAULT_PORTS['mlflow_port']}")
    args = parser.parse_args(argv)
    layout = default_layout()
    try:
        if args.command == "start":
            start(layout, args.pg_port, args.mlflow_port)
            status(layout)
        elif args.command == "stop":
            stop(layout)
        elif args.command == "env":
            print("\n".join(f"export {name}={value}" for name, value in layout.environment().items()))
        else:
            return 0 if status(layout) else 3
    except ServicesError as err:
        print(f"services: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
