# %% [markdown]
# # 02 — The transformer prior and its samples
# How did the text and image losses fall, what do the attention masks look like, what does the prior draw for
# seen and held-out captions, and how do temperature and guidance change the draws?
#
# Needs `make repro` (through `train_prior`, `train_clip` and `sample`).

# %%
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from workbench import PARAMS, ROOT, history, latest_run, require

require("models/prior/model.safetensors", "models/clip/model.safetensors", "reports/samples/sheet.png")

# %%
run = latest_run("train_prior")
curves = history(run.run_id, "train_text_nll", "train_image_bits", "val_text_nll", "val_image_bits")
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
curves[["train_text_nll", "val_text_nll"]].plot(ax=axes[0], marker=".", title="text NLL (nats/token)")
curves[["train_image_bits", "val_image_bits"]].plot(ax=axes[1], marker=".", title="image NLL (bits/token)")
plt.tight_layout()
plt.show()

# %%
from dalle.masks import MASK_KINDS, attention_mask  # noqa: E402

text_len, grid = 6, 6  # small, so that single pairs are visible
fig, axes = plt.subplots(1, len(MASK_KINDS), figsize=(3 * len(MASK_KINDS), 3))
for ax, kind in zip(axes, MASK_KINDS):
    ax.imshow(attention_mask(kind, text_len, grid, kernel=3), cmap="gray")
    ax.axhline(text_len - 0.5, color="red")
    ax.axvline(text_len - 0.5, color="red")
    ax.set_title(kind)
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()

# %%
plt.figure(figsize=(12, 12))
plt.imshow(Image.open(ROOT / "reports/samples/sheet.png"))
plt.axis("off")
plt.title("best of N per caption: seen pairs first, then held-out pairs")
plt.show()

# %%
import torch  # noqa: E402

from dalle.generate import generate, load_models  # noqa: E402
from dalle.viz import contact_sheet  # noqa: E402

models = load_models(ROOT / "models", torch.device("cpu"))
captions = ["a small red circle in the top left", "a large blue circle at the bottom"]
settings = [("temperature", t, {"temperature": t}) for t in (0.5, 1.0, 1.5)]
if PARAMS.prior.null_text_prob > 0:  # guidance needs an unconditional model
    settings += [("guidance", s, {"guidance_scale": s}) for s in (1.0, 2.0, 4.0)]
images, labels = [], []
for name, value, options in settings:
    for result in generate(models, captions, candidates=4, progress=False, **options):
        images.extend(result.images)
        labels.extend([f"{name} {value}: {result.caption}"] * len(result.images))
plt.figure(figsize=(12, 2 * len(settings)))
plt.imshow(contact_sheet(np.stack(images), labels, columns=8, cell=96))
plt.axis("off")
plt.show()
