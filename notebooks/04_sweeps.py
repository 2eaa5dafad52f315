# %% [markdown]
# # 04 — Sweeps
# Which trials did an Optuna sweep run, how did the best value improve, which parameters mattered, and what did
# the best trial's training curves look like?
#
# Needs a sweep: `python -m pipelines.sweep --target prior --trials 20` (study in `optuna.db`, runs in MLflow).

# %%
import matplotlib.pyplot as plt
import optuna
import optuna.visualization.matplotlib as vis
from IPython.display import display
from workbench import PARAMS, ROOT, Missing, history, require

from pipelines.sweep import OBJECTIVE

require("optuna.db", run="python -m pipelines.sweep --target prior --trials 20")
storage = PARAMS.sweep.storage or f"sqlite:///{ROOT / 'optuna.db'}"
summaries = optuna.get_all_study_summaries(storage)
if not summaries:
    raise Missing(f"Run `python -m pipelines.sweep --target prior --trials 20` first: no study in {storage}.")
study = optuna.load_study(study_name=max(summaries, key=lambda s: s.datetime_start).study_name, storage=storage)
trials = study.trials_dataframe()
display(trials)

# %%
vis.plot_optimization_history(study)
plt.show()
try:
    vis.plot_param_importances(study)
    plt.show()
except (ValueError, RuntimeError) as err:  # importances need several completed trials
    print(f"no importances yet: {err}")

# %%
best = study.best_trial
print(f"best trial {best.number}: {best.value:.4f} with {best.params}")
key = OBJECTIVE[study.user_attrs["target"]]  # the validation metric the sweep minimised
curves = history(best.user_attrs["mlflow_run_id"], key, "train_loss")
curves.plot(subplots=True, marker=".", figsize=(8, 4), title=f"trial {best.number} (MLflow child run)")
plt.show()
