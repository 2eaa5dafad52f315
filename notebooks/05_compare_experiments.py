# %% [markdown]
# # 05 — Compare experiments
# Each `dvc repro` or `dvc exp run` is one MLflow run tagged `stage=pipeline`, named after the DVC experiment (else
# the commit), with a run per stage nested in it and the headline metrics copied to it. Which params differ between
# the executions, how do their headline metrics compare, and how did the prior train in two of them?
#
# Needs `make repro`; for a second execution to compare with, e.g. `dvc exp run -S prior.steps=1200 -n longer-prior`.

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display
from workbench import dvc_experiments, history, pipeline_runs, stage_run

CHOSEN: list[str] = []  # two executions to overlay (names or run ids); empty: the two newest that trained the prior

# %%
runs = pipeline_runs()
names = runs["tags.mlflow.runName"]
started = runs["start_time"].dt.strftime("%Y-%m-%d %H:%M:%S")
runs.index = names.where(~names.duplicated(keep=False), names + " @ " + started)  # the same commit, run twice
runs.index.name = "execution"

# DVC's side: which executions are experiments DVC still holds (`dvc exp apply NAME`) or commits of this branch.
experiments = dvc_experiments()
if experiments.empty:
    print("`dvc exp show` gave nothing here: the MLflow runs stand alone.")


def in_dvc(name: str) -> tuple[str, str]:
    """(kind, rev) of an execution in `dvc exp show`: its experiment, else the commit its name starts with."""
    key = name.split(" ")[0].removesuffix("+dirty")  # a seed chain's " seed=N"; uncommitted changes' "+dirty"
    found = experiments[(experiments["kind"] == "experiment") & (experiments["name"] == key)]
    if found.empty:
        found = experiments[(experiments["kind"] == "commit") & experiments["rev"].str.startswith(key)]
    return ("", "") if found.empty else (found.iloc[0]["kind"], found.iloc[0]["rev"][:7])


overview = pd.DataFrame(
    {
        "status": runs["status"],
        "started": started.values,
        "minutes": ((runs["end_time"] - runs["start_time"]).dt.total_seconds() / 60).round(1).values,
        "commit": runs["tags.git_commit"].str[:7].values,
    },
    index=runs.index,
)
overview[["in DVC", "DVC rev"]] = [in_dvc(name) for name in names]
display(overview)

# %%
params = runs.filter(like="params.").rename(columns=lambda column: column.removeprefix("params."))
differ = params.loc[:, params.nunique(dropna=False) > 1]
if len(runs) == 1:
    print("One pipeline execution so far: nothing to compare yet (see the command at the top for a second).")
elif differ.empty:
    print("The executions share every param: reruns of one configuration.")
else:
    display(differ.T)  # a column per execution

# %%
# The headline metrics, a column per execution; blank where the stage did not run (DVC reused an earlier output).
metrics = runs.filter(like="metrics.").rename(columns=lambda column: column.removeprefix("metrics."))
display(metrics.dropna(axis=1, how="all").T.sort_index().round(4))

# %%
priors = {label: stage_run(run_id, "train_prior") for label, run_id in runs["run_id"].items()}
trained = [label for label, prior in priors.items() if prior is not None]  # DVC skips an unchanged stage
by_id = dict(zip(runs["run_id"], runs.index))
chosen = [by_id.get(choice, choice) for choice in CHOSEN] or trained[-2:]
if untrained := [label for label in chosen if label not in trained]:
    print(f"No prior training in {untrained}: choose among {trained}.")
chosen = [label for label in chosen if label in trained]
if not chosen:
    print("No execution trained the prior (its outputs came from an earlier one): no curves to show.")
else:
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
    for label in chosen:
        curves = history(priors[label].run_id, "train_image_bits", "val_image_bits")
        for ax, key in zip(axes, curves):
            curves[key].dropna().plot(ax=ax, marker=".", label=label, title=key)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    plt.tight_layout()
    plt.show()
