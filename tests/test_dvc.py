"""`dvc repro` and `dvc exp run -S` of the whole pipeline (tiny params) in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def run(args: list[str], cwd: Path) -> str:
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    return tiny_repo(tmp_path_factory.mktemp("repo"), "test-dvc")


def tiny_repo(root: Path, experiment: str, **data) -> Path:
    """The repository's tracked and new files (no venv, data or stores) in ``root``, with tiny params (``data``
    overrides the data section), committed."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        # Locks and benchmark results belong to this machine's runs; the copy makes its own.
        if (REPO / name).is_file() and not name.startswith(
            ("data/", "dvc.lock", "reports/bench/", "pipelines/bench/dvc.lock")
        ):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = root / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["data"].update({"n_train": 32, "n_val": 4, "n_test": 8, "image_size": 16, **data})
    raw["eval"]["blur_radii"] = [0, 8, 16]  # >= 0.5 px at 16 px
    raw["mlflow"]["experiment"] = experiment
    raw["dvae"].update(
        codebook_size=16,
        hidden=8,
        codebook_dim=16,
        batch_size=8,
        steps=4,
        val_images=4,
        log_every=2,
        val_every=2,
        image_every=4,
        checkpoint_every=2,
    )
    raw["prior"].update(
        n_layers=2,
        n_heads=2,
        d_model=32,
        batch_size=8,
        steps=4,
        val_images=4,
        log_every=2,
        val_every=2,
        sample_every=4,
        samples=2,
        checkpoint_every=2,
    )
    raw["clip"].update(
        text_width=32, text_heads=2, image_channels=8, image_stages=2, batch_size=8, steps=4, val_images=4
    )
    raw["sample"].update(n_captions=2, candidates=2, batch_size=2)
    raw["evalnet"].update(n_images=32, steps=2, batch_size=8)
    raw["eval"].update(n_captions=4, rerank_n=[1, 2])
    raw["ablation"].update(schedules=["full", "row"], steps=2, n_captions=4)
    raw["ablation"].update(study_steps=2, study_captions=4, study_seeds=[0, 1])
    raw["seeds"]["extra"] = [1]
    raw["bench"].update(
        warmup=0,
        repeats=1,
        gemm_size=64,
        batch_size=2,
        big_grid=4,
        big_batch_size=2,
        schedules=["paper"],
        attn_impls=["dense"],
        attention_image_tokens=[16],
        attention_text_len=8,
        sample_batch_size=2,
        uncached_positions=2,
        dvae_batch_size=2,
        paper_batch_size=0,  # the paper-geometry rows are tested in tests/test_bench.py
    )
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny"], root)
    return root


def stage_repo(root: Path, experiment: str, dvc_yaml: dict, script: str, files: dict[str, str] | None = None) -> Path:
    """A committed git + DVC repository in ``root`` with the workbench's params.yaml (``experiment``, n_train=10), the
    stages ``dvc_yaml`` running ``stage.py`` = ``script``, and ``files`` (relative path -> text)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["mlflow"]["experiment"] = experiment
    raw["data"]["n_train"] = 10
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    (root / "stage.py").write_text(script)
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    run(["git", "init", "-q"], root)
    run([sys.executable, "-m", "dvc", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "stages"], root)
    return root


def test_dvc_repro_then_exp_run_with_override(repo_copy, mlflow_store):
    run([sys.executable, "-m", "dvc", "repro"], repo_copy)
    stats = json.loads((repo_copy / "data/prepared/stats.json").read_text())
    assert stats["n_images"] == {"train": 32, "val": 4, "test": 8}
    assert (repo_copy / "dvc.lock").is_file()
    assert set(yaml.safe_load((repo_copy / "dvc.lock").read_text())["stages"]) == {
        "prepare",
        "train_dvae",
        "encode",
        "train_prior",
        "train_clip",
        "sample",
        "train_evalnet",
        "evaluate",
        "register",
        "ablate@full",
        "ablate@row",
        "ablation_summary",
    }
    assert (repo_copy / "models/dvae/model.safetensors").is_file()
    assert (repo_copy / "data/tokens/test/index.json").is_file()
    assert json.loads((repo_copy / "reports/dvae/metrics.json").read_text())["steps"] == 4
    assert (repo_copy / "models/prior/model.safetensors").is_file()
    assert json.loads((repo_copy / "reports/prior/metrics.json").read_text())["steps"] == 4
    assert (repo_copy / "reports/samples/manifest.csv").is_file()
    assert "seen_all_n2" in json.loads((repo_copy / "reports/sample/metrics.json").read_text())
    evaluation = json.loads((repo_copy / "reports/eval/metrics.json").read_text())
    assert "fid_evalnet" in evaluation
    registered = json.loads((repo_copy / "reports/register/metrics.json").read_text())
    version = MlflowClient(mlflow_store).get_model_version("dalle-workbench", str(registered["version"]))
    assert version.tags["fid_evalnet"] == f"{evaluation['fid_evalnet']:g}"  # registered with the evaluation's FID
    assert (repo_copy / "reports/ablation/summary.csv").read_text().count("\n") == 3  # header + 2 schedules
    assert not (repo_copy / "reports/bench").exists()  # the benchmark is not part of the default repro
    run([sys.executable, "-m", "dvc", "repro", "pipelines/bench/dvc.yaml"], repo_copy)
    bench = json.loads((repo_copy / "reports/bench/results.json").read_text())
    assert set(bench["prior_training"]) == {"grid4_paper_dense"}
    assert "## Sampling" in (repo_copy / "reports/bench/results.md").read_text()
    # The on-demand pipelines: a chain per extra training seed with its summary, and the ablation study.
    run([sys.executable, "-m", "dvc", "repro", "pipelines/seeds/dvc.yaml"], repo_copy)
    seeds = json.loads((repo_copy / "reports/seeds_summary/summary.json").read_text())
    assert seeds["seeds"] == 2 and seeds["fid_seed0"] == evaluation["fid_evalnet"]
    seed1 = json.loads((repo_copy / "reports/seeds/seed1/eval/metrics.json").read_text())
    assert seeds["fid_seed1"] == seed1["fid_evalnet"] and (repo_copy / "models/seeds/seed1/prior").is_dir()
    run([sys.executable, "-m", "dvc", "repro", "pipelines/ablation/dvc.yaml"], repo_copy)
    differences = (repo_copy / "reports/ablation_study/differences.csv").read_text().splitlines()
    assert len(differences) == 1 + 4 and all(line.startswith("row,") for line in differences[1:])
    assert json.loads((repo_copy / "reports/ablation_study/runs/row-seed1/metrics.json").read_text())["seed"] == 1
    status = run([sys.executable, "-m", "dvc", "status"], repo_copy)
    assert "up to date" in status

    run(["git", "add", "-A"], repo_copy)
    run(["git", "commit", "-qm", "lock"], repo_copy)
    run([sys.executable, "-m", "dvc", "exp", "run", "-S", "data.n_train=20", "-n", "small-train"], repo_copy)
    stats = json.loads((repo_copy / "data/prepared/stats.json").read_text())
    assert stats["n_images"]["train"] == 20
    assert yaml.safe_load((repo_copy / "params.yaml").read_text())["data"]["n_train"] == 20

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("test-dvc")
    runs = client.search_runs(
        [experiment.experiment_id], "tags.stage = 'prepare'", order_by=["attributes.start_time ASC"]
    )
    assert [r.data.params["data.n_train"] for r in runs] == ["32", "20"]
    assert runs[1].data.tags.get("dvc_exp_name") == "small-train"


NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.py"))


def test_notebooks_are_paired_and_stripped():
    import jupytext

    assert [n.stem for n in NOTEBOOKS] == [
        "01_data_and_dvae",
        "02_prior_and_samples",
        "03_evaluation_and_ablation",
        "04_sweeps",
        "05_compare_experiments",
    ]
    for source in NOTEBOOKS:
        paired = jupytext.read(source.with_suffix(".ipynb"))
        assert all(not cell.get("outputs") for cell in paired.cells), f"{source.name}: outputs not stripped"
        code = [c.source for c in jupytext.read(source).cells if c.cell_type == "code"]
        assert code == [c.source for c in paired.cells if c.cell_type == "code"], f"{source.name}: .ipynb out of sync"


def test_notebooks_execute_on_the_pipeline_outputs(repo_copy, mlflow_store, tmp_path):
    run([sys.executable, "-m", "dvc", "repro"], repo_copy)  # a no-op when the test above already ran it
    run(
        [sys.executable, "-m", "pipelines.sweep", "--target", "prior", "--trials", "2", "--study", "prior-nb"]
        + ["--storage", f"sqlite:///{repo_copy / 'optuna.db'}"],
        repo_copy,
    )
    for source in NOTEBOOKS:
        notebook = repo_copy / "notebooks" / source.with_suffix(".ipynb").name
        run(
            [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", str(notebook)]
            + ["--ExecutePreprocessor.timeout=600", "--output-dir", str(tmp_path)],
            repo_copy / "notebooks",
        )
        assert (tmp_path / notebook.name).is_file()


def test_a_notebook_without_its_inputs_stops_with_one_line(tmp_path):
    import jupytext

    root = tmp_path / "bare"
    (root / "notebooks").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, root / name)
    shutil.copy2(REPO / "notebooks" / "workbench.py", root / "notebooks")
    shutil.copytree(REPO / "pipelines", root / "pipelines")
    jupytext.write(jupytext.read(NOTEBOOKS[0]), root / "notebooks" / "01.ipynb")
    result = subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "01.ipynb"],
        cwd=root / "notebooks",
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "Run `make repro` first: data/prepared/contact_sheet.png" in result.stderr
