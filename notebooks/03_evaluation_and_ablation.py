# %% [markdown]
# # 03 — Evaluation and the attention-mask ablation
# How does FID move with blur (paper Fig. 9) and with the number of reranked candidates, which attributes do the
# samples get right for seen and held-out colour-shape pairs, and how do the attention schedules compare?
#
# Needs `make repro` (the `evaluate`, `ablate@*` and `ablation_summary` stages).

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display
from workbench import ROOT, require

require("reports/eval/metrics.json", "reports/ablation/summary.csv")
metrics = json.loads((ROOT / "reports/eval/metrics.json").read_text())
display(pd.Series(metrics).to_frame("value"))

# %%
fid_key = next(k for k in metrics if k.startswith("fid_") and not k.endswith("reconstruction"))
blur = pd.read_csv(ROOT / "reports/eval/fid_vs_blur.csv")
by_n = pd.read_csv(ROOT / "reports/eval/fid_vs_n.csv")
fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
blur.plot(x="radius_256px", y=["fid_generated", "fid_reconstruction"], marker="o", ax=axes[0], title="FID vs blur")
by_n.plot(x="n", y=fid_key, marker="o", logx=True, ax=axes[1], title="FID vs reranked N")
labelled = "accuracy_seen" in by_n  # shapes; other datasets have the CLIP-score analogue instead
quality = ["accuracy_seen", "accuracy_held_out"] if labelled else ["clip_score"]
by_n.plot(x="n", y=quality, marker="o", logx=True, ax=axes[2], title=f"{quality[0].split('_')[0]} vs N")
plt.tight_layout()
plt.show()

# %%
accuracy = pd.read_csv(ROOT / "reports/eval/accuracy_by_attribute.csv")
if len(accuracy):  # header-only on datasets without attribute labels
    accuracy.pivot(index="attribute", columns="group", values="accuracy").plot.bar(ylim=(0, 1.05), rot=0)
    plt.ylabel("caption accuracy")
    plt.show()

# %%
summary = pd.read_csv(ROOT / "reports/ablation/summary.csv").set_index("schedule")
display(summary)

# %%
values = [c for c in summary.columns if not c.endswith(("_low", "_high"))]  # the rest are 95% interval bounds
fig, axes = plt.subplots(2, (len(values) + 1) // 2, figsize=(14, 6), squeeze=False)
for ax, column in zip(axes.flat, values):
    errors = None
    if f"{column}_low" in summary:
        low, high = summary[f"{column}_low"], summary[f"{column}_high"]
        errors = np.abs([summary[column] - low, high - summary[column]])
    summary[column].plot.bar(ax=ax, yerr=errors, capsize=2, rot=45, title=column)
for ax in axes.flat[len(values) :]:
    ax.set_axis_off()
plt.tight_layout()
plt.show()
