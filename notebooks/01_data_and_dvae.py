# %% [markdown]
# # 01 — Data and the discrete VAE
# What does the dataset look like, how long are its captions, how did the dVAE train, what do its
# reconstructions keep, and how evenly are the codebook's tokens used?
#
# Needs the `prepare`, `train_dvae` and `encode` stages (`make repro`). Reads only their outputs and MLflow runs.

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image
from workbench import ROOT, history, latest_run, require

require("data/prepared/contact_sheet.png", "data/tokens/train/index.json", "models/dvae/model.safetensors")

# %%
plt.figure(figsize=(10, 5))
plt.imshow(Image.open(ROOT / "data/prepared/contact_sheet.png"))
plt.axis("off")
plt.title("training images and one of their captions")
plt.show()

# %%
from dalle.data.tokens import load_tokens  # noqa: E402

lengths = np.asarray(load_tokens(ROOT / "data/tokens", "train").text_lengths)
plt.hist(lengths, bins=np.arange(lengths.max() + 2) - 0.5)
plt.xlabel("caption length (BPE tokens)")
plt.ylabel("captions")
plt.show()
print(f"median {np.median(lengths):.0f}, max {lengths.max()} tokens")

# %%
run = latest_run("train_dvae")
curves = history(run.run_id, "train_loss", "train_perplexity", "val_psnr")
fig, axes = plt.subplots(1, 3, figsize=(12, 3))
for ax, key in zip(axes, curves.columns):
    curves[key].dropna().plot(ax=ax, marker=".", title=key)
    ax.set_xlabel("step")
plt.tight_layout()
plt.show()

# %%
import torch  # noqa: E402

from dalle.data.store import load_split  # noqa: E402
from dalle.dvae import load_dvae  # noqa: E402
from dalle.dvae_train import reconstruct  # noqa: E402

test = load_split(ROOT / "data/prepared", "test")
originals = np.asarray(test.images[:8])
recon = reconstruct(load_dvae(ROOT / "models/dvae"), originals, torch.device("cpu"))
plt.figure(figsize=(10, 3))
plt.imshow(np.concatenate([np.concatenate(list(originals), axis=1), np.concatenate(list(recon), axis=1)]))
plt.axis("off")
plt.title("test images (top) and decode(encode(x)) (bottom)")
plt.show()

# %%
usage = pd.read_csv(ROOT / "reports/encode/codebook_usage.csv")
plt.bar(usage["rank"], usage["count"], width=1.0)
plt.yscale("log")
plt.xlabel("code rank")
plt.ylabel("occurrences in the training tokens")
plt.show()
print(f"{(usage['count'] > 0).mean():.0%} of {len(usage)} codes used")
