"""Optuna sweeps over the dVAE or the prior, each trial an MLflow child run of one parent run per study.

    python -m pipelines.sweep --target prior --trials 20 [--timeout S] [--study NAME] [--storage URL] [--workers N]
                              [--objectives loss,seconds]

The search space is ``sweep.<target>`` in params.yaml; every trial starts from the current params and overrides
only its sampled keys (``dataclasses.replace``), training for ``sweep.<target>_steps`` steps. The objective is the
stage's validation loss (dVAE: bits/dim; prior: image bits/token), reported four times to the pruner
(``sweep.pruner``). With ``--objectives loss,seconds`` the study is two-objective (a Pareto front, never pruned).
Storage: ``sqlite:///<repo>/optuna.db`` by default, any RDB URL (PostgreSQL for many machines; heartbeats let a
killed worker's trial be failed and retried), or a journal file (``*.log``). The same command on several
machines with the same storage joins the same study. The study names its objectives (``val_bits_per_dim`` or
``val_image_bits``, and ``seconds``) and each trial holds its MLflow run's id and address (``mlflow_run_url``), for
optuna-dashboard. Writes ``sweeps/<study>/best_params.yaml`` in params.yaml form and prints the ``dvc exp run -S ...``
command that applies it. Exits non-zero, with the MLflow parent run marked FAILED, when a worker process died or
none of this command's trials completed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback  # noqa: E402
from optuna.storages.journal import JournalFileBackend, JournalStorage  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from dalle.config import Params  # noqa: E402
from dalle.data.store import load_split  # noqa: E402
from dalle.data.tokens import load_tokens  # noqa: E402
from dalle.dvae import load_dvae  # noqa: E402
from dalle.dvae_train import Callbacks as DvaeCallbacks  # noqa: E402
from dalle.dvae_train import train_dvae  # noqa: E402
from dalle.prior_train import Callbacks as PriorCallbacks  # noqa: E402
from dalle.prior_train import geometry_of, train_prior  # noqa: E402
from dalle.text import TextTokenizer  # noqa: E402
from pipelines.params import load_params  # noqa: E402
from pipelines.tracking import (  # noqa: E402
    MlflowCurves,
    _experiment_id,
    check_reachable,
    repo_root,
    run_tags,
    run_url,
    tracking_uri,
)
from pipelines.train_dvae import MODEL_DIR as DVAE_DIR  # noqa: E402
from pipelines.train_dvae import PREPARED  # noqa: E402
from pipelines.train_prior import TOKENS  # noqa: E402

OBJECTIVE = {"dvae": "val_bits_per_dim", "prior": "val_image_bits"}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# RDB storages: a worker records a heartbeat for its running trial this often; the next worker to start a trial
# fails a RUNNING trial whose heartbeat is older than the grace period and queues one retry of its params.
HEARTBEAT_INTERVAL_S = 60
GRACE_PERIOD_S = 180
SQLITE_TIMEOUT_S = 60  # how long a write to a SQLite study waits for another worker's lock ("database is locked")


class SweepError(ValueError):
    """A sweep that cannot start: bad space, storage or arguments."""


def storage_for(url: str | None):
    """The Optuna storage behind ``url`` (checked now: an unreachable database fails before any trial)."""
    url = url or f"sqlite:///{repo_root() / 'optuna.db'}"
    if url.endswith(".log"):
        return JournalStorage(JournalFileBackend(url))
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    try:
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=GRACE_PERIOD_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    except Exception as err:  # any failure to open it means no trial can run; name the storage
        raise SweepError(f"Optuna storage {url} is unusable ({type(err).__name__}: {str(err)[:300]})") from None


def suggest(trial: optuna.Trial, space: dict[str, tuple]) -> dict[str, object]:
    values = {}
    for name, spec in space.items():
        kind, rest = spec[0], spec[1:]
        if kind == "categorical":
            values[name] = trial.suggest_categorical(name, list(rest))
        elif kind == "int":
            values[name] = trial.suggest_int(name, rest[0], rest[1], log=len(rest) == 3)
        else:
            values[name] = trial.suggest_float(name, rest[0], rest[1], log=len(rest) == 3)
    return values


def trial_config(params: Params, target: str, values: dict[str, object]):
    """The target section with the trial's values and the sweep's step budget (validated like params.yaml)."""
    base = getattr(params, target)
    steps = getattr(params.sweep, f"{target}_steps")
    cadence = {"steps": steps, "val_every": steps // 4, "log_every": min(base.log_every, steps), "resume": False}
    cadence["checkpoint_every"] = steps
    if target == "dvae":
        cadence.update(image_every=steps, tau_steps=min(base.tau_steps, steps))
        cadence.update(kl_warmup_steps=min(base.kl_warmup_steps, steps // 3))
    else:
        cadence.update(sample_every=steps)
    cadence["warmup_steps"] = min(base.warmup_steps, steps // 4)
    if "lr" in values and "lr_min" not in values:  # the cosine floor keeps its ratio to the sampled peak
        cadence["lr_min"] = base.lr_min * values["lr"] / base.lr
    return dataclasses.replace(base, **{**cadence, **values})


class Reporter(MlflowCurves, DvaeCallbacks, PriorCallbacks):
    """Intermediate values → Optuna (and pruning) and the trial's MLflow run."""

    def __init__(self, trial: optuna.Trial, key: str, prune: bool):
        self.trial, self.key, self.prune = trial, key, prune

    def on_train_log(self, step: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({f"train_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        super().on_validation(step, metrics)
        if self.prune:
            self.trial.report(metrics[self.key], step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}: {self.key} {metrics[self.key]:.4f}")


def objective(trial: optuna.Trial, args: argparse.Namespace, params: Params, parent: str, data: dict) -> object:
    trial.set_user_attr("mlflow_parent_run_id", parent)  # which sweep command ran it (several may share a study)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    values = suggest(trial, getattr(params.sweep, args.target))
    two_objectives = args.objectives == ["loss", "seconds"]
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    tags = {**run_tags(f"sweep_{args.target}"), "mlflow.parentRunId": parent, "optuna_trial": str(trial.number)}
    with mlflow.start_run(experiment_id=data["experiment_id"], run_name=f"trial {trial.number}", tags=tags) as run:
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        trial.set_user_attr("mlflow_run_url", run_url(uri, data["experiment_id"], run.info.run_id))
        mlflow.log_params({f"{args.target}.{k}": v for k, v in values.items()})
        state = "FAILED"
        try:
            cfg = trial_config(params, args.target, values)
            prune = not two_objectives and params.sweep.pruner != "none"
            reporter = Reporter(trial, OBJECTIVE[args.target], prune=prune)
            started = time.monotonic()
            if args.target == "dvae":
                result = train_dvae(
                    cfg, params.seed, data["train"], data["val"], callbacks=reporter, loader=params.loader
                )
            else:
                geometry = data["geometry"]
                result = train_prior(
                    cfg, params.seed, geometry, data["train"], data["val"], callbacks=reporter, loader=params.loader
                )
            seconds = time.monotonic() - started
            loss = result.final[OBJECTIVE[args.target]]
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite {OBJECTIVE[args.target]}: {loss}")
            mlflow.log_metrics({"objective": loss, "seconds": seconds})
            state = "COMPLETE"
            return (loss, seconds) if two_objectives else loss
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:1000])
            mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
            raise
        finally:
            mlflow.set_tag("optuna_state", state)


def load_data(params: Params, target: str, args: argparse.Namespace) -> dict:
    if target == "dvae":
        cache = params.data.cache_mb * 2**20
        return {split: load_split(args.prepared, split, cache).images for split in ("train", "val")}
    if not (args.dvae / "config.json").is_file():
        raise SweepError(f"{args.dvae}/config.json not found; run the train_dvae and encode stages first")
    train = load_tokens(args.tokens, "train")
    text_vocab = TextTokenizer.from_file(args.prepared / "tokenizer.json").vocab_size
    geometry = geometry_of(train, text_vocab, load_dvae(args.dvae).cfg.codebook_size)
    return {"train": train, "val": load_tokens(args.tokens, "val"), "geometry": geometry}


def worker(args: argparse.Namespace, parent: str, threads: int, n_trials: int, index: int = 0) -> None:
    """One process running up to ``n_trials`` trials of the shared study, stopping early once the study holds
    ``--trials`` finished ones (other machines may be adding to it) or when ``--timeout`` runs out."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    params = load_params(args.params)
    # Pruner and sampler are not stored with the study: each process brings its own (the sampler seeded per
    # worker, so that workers do not propose the same points).
    two_objectives = len(args.objectives) == 2
    study = optuna.load_study(
        study_name=args.study,
        storage=storage_for(args.storage),
        pruner=None if two_objectives else make_pruner(params, args.target),
        sampler=optuna.samplers.TPESampler(seed=params.seed + index),
    )
    data = load_data(params, args.target, args)
    data["experiment_id"] = _experiment_id(params.mlflow.experiment, tracking_uri())
    study.optimize(
        lambda trial: objective(trial, args, params, parent, data),
        n_trials=n_trials,
        timeout=args.timeout,
        callbacks=[optuna.study.MaxTrialsCallback(args.trials, states=FINISHED)],
        catch=(Exception,),  # a failed trial is recorded with its error; the sweep goes on
    )


def make_pruner(params: Params, target: str) -> optuna.pruners.BasePruner:
    sweep = params.sweep
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=getattr(sweep, f"{target}_steps"))
    return optuna.pruners.NopPruner()


def run_workers(args: argparse.Namespace, parent: str) -> list[str]:
    """Run ``--workers`` workers (in this process when there is one) until they stop; what became of any worker
    process that died."""
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    if args.workers == 1:
        worker(args, parent, threads, args.trials)
        return []
    shares = [args.trials // args.workers + (i < args.trials % args.workers) for i in range(args.workers)]
    context = multiprocessing.get_context("spawn")
    processes = {
        i: context.Process(target=worker, args=(args, parent, threads, n, i), name=f"sweep-worker-{i}")
        for i, n in enumerate(shares)
        if n
    }
    for process in processes.values():
        process.start()
    for process in processes.values():
        process.join()
    return [f"worker {i} of {len(processes)} {exit_reason(p.exitcode)}" for i, p in processes.items() if p.exitcode]


def exit_reason(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def metric_names(target: str, objectives: list[str]) -> list[str]:
    """What optuna-dashboard calls each objective instead of "Objective 0": the metric, and ``seconds``."""
    return [OBJECTIVE[target] if name == "loss" else name for name in objectives]


def no_trial_completed(study: optuna.Study, parent: str) -> str | None:
    """Why none of the trials run for the parent run ``parent`` completed, or None when one did."""
    trials = [t for t in study.trials if t.user_attrs.get("mlflow_parent_run_id") == parent]
    if any(t.state == TrialState.COMPLETE for t in trials):
        return None
    if not trials:
        return "no trial ran"
    states = Counter(t.state.name.lower() for t in trials)
    reason = f"none of its {len(trials)} trials completed ({', '.join(f'{n} {s}' for s, n in states.items())})"
    errors = [f"trial {t.number}: {t.user_attrs['error']}" for t in trials if "error" in t.user_attrs]
    return reason + (f", first error: {' '.join(errors[0].split())[:300]}" if errors else "")


def best_params(study: optuna.Study, target: str) -> dict:
    trial = study.best_trial if len(study.directions) == 1 else min(study.best_trials, key=lambda t: t.values[0])
    return {target: dict(trial.params)}


def log_figures(study: optuna.Study, client: MlflowClient, parent: str, out: Path) -> None:
    import optuna.visualization.matplotlib as vis

    plots = {"optimization_history": vis.plot_optimization_history, "parallel_coordinate": vis.plot_parallel_coordinate}
    plots["param_importances"] = vis.plot_param_importances
    for name, plot in plots.items():
        try:
            kwargs = {} if len(study.directions) == 1 else {"target": lambda t: t.values[0], "target_name": "loss"}
            plot(study, **kwargs)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:  # too few completed trials for this figure
            print(f"skipped {name}: {err}", file=sys.stderr)
            plt.close("all")
            continue
        path = out / f"{name}.png"
        plt.gcf().savefig(path, dpi=110, bbox_inches="tight")
        plt.close("all")
        client.log_artifact(parent, str(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("dvae", "prior"), required=True)
    parser.add_argument("--trials", type=int, default=20, help="finished trials the study should hold")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per worker")
    parser.add_argument("--study", default=None, help="study name (default: <target>-sweep)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: sweep.storage, then sqlite)")
    parser.add_argument("--workers", type=int, default=1, help="processes on this machine sharing the study")
    parser.add_argument("--objectives", default="loss", help="loss, or loss,seconds for a Pareto front")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=PREPARED)
    parser.add_argument("--tokens", type=Path, default=TOKENS)
    parser.add_argument("--dvae", type=Path, default=DVAE_DIR)
    parser.add_argument("--out", type=Path, default=Path("sweeps"))
    args = parser.parse_args(argv)

    params = load_params(args.params)
    args.objectives = [name.strip() for name in args.objectives.split(",")]
    if args.objectives not in (["loss"], ["loss", "seconds"]):
        parser.error(f"--objectives must be 'loss' or 'loss,seconds', got {','.join(args.objectives)}")
    if args.trials < 1 or args.workers < 1:
        parser.error("--trials and --workers must be >= 1")
    if not getattr(params.sweep, args.target):
        raise SweepError(f"{args.params}: sweep.{args.target} is empty; nothing to search")
    args.study = args.study or f"{args.target}-sweep"
    args.storage = args.storage or params.sweep.storage
    storage = storage_for(args.storage)
    load_data(params, args.target, args)  # fail on missing inputs before any trial
    uri = tracking_uri()
    check_reachable(uri)
    directions = ["minimize"] * len(args.objectives)
    study = optuna.create_study(
        study_name=args.study,
        storage=storage,
        directions=directions,
        pruner=make_pruner(params, args.target) if len(directions) == 1 else None,
        sampler=optuna.samplers.TPESampler(seed=params.seed),
        load_if_exists=True,
    )
    study.set_metric_names(metric_names(args.target, args.objectives))
    client = MlflowClient(uri)
    experiment_id = _experiment_id(params.mlflow.experiment, uri)
    tags = {**run_tags(f"sweep_{args.target}"), "optuna_study": args.study, "sweep_target": args.target}
    tags["optuna_storage"] = str(args.storage or f"sqlite:///{repo_root() / 'optuna.db'}")
    parent = client.create_run(experiment_id, run_name=f"sweep {args.study}", tags=tags).info.run_id
    study.set_user_attr("target", args.target)
    study.set_user_attr(f"mlflow_parent_run_id:{parent}", True)
    try:
        started = time.monotonic()
        problems = run_workers(args, parent)
        seconds = time.monotonic() - started

        study = optuna.load_study(study_name=args.study, storage=storage)
        counts = {state.name.lower(): sum(t.state == state for t in study.trials) for state in FINISHED}
        client.log_metric(parent, "sweep_seconds", seconds)
        for name, count in counts.items():
            client.log_metric(parent, f"trials_{name}", count)
        out = args.out / args.study
        out.mkdir(parents=True, exist_ok=True)
        if counts["complete"]:
            best = best_params(study, args.target)
            (out / "best_params.yaml").write_text(yaml.safe_dump(best, sort_keys=False))
            client.log_artifact(parent, str(out / "best_params.yaml"))
            flags = " ".join(f"-S {args.target}.{k}={v}" for k, v in best[args.target].items())
            best_value = study.best_trials[0].values[0]
            print(f"best {OBJECTIVE[args.target]}: {best_value:.4f}; apply with: dvc exp run {flags}")
        log_figures(study, client, parent, out)
        reason = no_trial_completed(study, parent)
        if reason:
            problems.append(reason)
    except BaseException as err:
        client.set_terminated(parent, status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    print(f"study {args.study}: {counts} in {seconds:.0f} s; MLflow parent run {parent}")
    if problems:
        message = f"sweep {args.study} failed: {'; '.join(problems)}; MLflow parent run {parent} marked FAILED"
        client.set_tag(parent, "error", message)
        client.set_terminated(parent, status="FAILED")
        raise SystemExit(message)
    client.set_terminated(parent)


if __name__ == "__main__":
    main()
