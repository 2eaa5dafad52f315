"""DVC stage ``evaluate``: the paper's evaluation (§3.2, Fig. 9) on the test split, plus zero-shot caption accuracy.

For ``eval.n_captions`` test images (on shapes: single-object ones, half with seen and half with held-out
colour-shape pairs) it generates one caption each, max(``eval.rerank_n``) candidates per caption, and measures, for
every N in ``rerank_n``, the best of the first N by the reranker: FID against all real test images, the reranker
score, and what the independent instrument of ``train_evalnet`` reads: caption accuracy (seen / held-out) on shapes,
the CLIP-score analogue (``clip_score``, ``dalle/clip_metrics.py``) on datasets without attribute labels. At the
headline N (``sample.candidates``) it also gives FID vs Gaussian blur of both sets, FID of dVAE reconstructions (the
floor the prior can reach) and accuracy by attribute, and over the whole test split the reranker's text → image
retrieval (each image's first caption among all test images, R@1/5/10 beside chance) and the prior's text and
image NLL. FID is named by its feature network: ``fid_evalnet`` (default), ``fid_inception``
(``eval.fid_features: inception``) or ``fid_reranker`` (datasets without attribute labels). Measures a dataset
cannot give are absent, never 0.

Captions on shapes are canonical, not taken from the test split: ``a {size} {colour} {shape} in the {position}``
built from each chosen image's record (``shapes.canonical_caption``), so every caption names all four attributes
the accuracies check (other datasets keep each image's first caption). Beside the evaluation network's
``accuracy_*`` the pixel-rule judge (``dalle/data/judge.py``) scores the same picks: ``judge_accuracy_{seen,
held_out}_n<N>`` at every N, all four attributes right. The single-object targets are read from these. It also
judges every one of the headline N candidates, to tell the prior's errors from the reranker's:
``judge_candidates_<group>`` (the share of all candidates right: N = 1 averaged over N draws per caption) and
``judge_oracle_<group>_n<N>`` (captions with a right candidate among N: what a perfect reranker would pick).

With ``data.max_objects: 2`` the test split also has two-object images; up to ``eval.n_captions`` of them (half
seen, half with a held-out pair in either object) get the canonical ``a {size} {colour} {shape} {relation} a
{size2} {colour2} {shape2}`` (``shapes.canonical_relation_caption``, the record's own relation), headline-N
candidates each, and the scene judge (``judge.judge_scene``) scores the pick at N = 1 and the headline N:
``two_object_exact_{seen,held_out}_n<N>`` (both objects' colour, shape and size and the relation right) and, at the
headline N, the parts ``two_object_objects_*`` and ``two_object_relation_*``; ``two_object_captions_*`` count them.
Every accuracy comes with its 95% Wilson interval (``_low``, ``_high``).

Outputs: ``reports/eval/metrics.json`` (DVC metrics), ``fid_vs_n.csv``, ``fid_vs_blur.csv``,
``accuracy_by_attribute.csv`` (DVC plots; header-only without labels) with PNG figures, ``sheets/sheet_n<N>.png``
(the first ``eval.sheet_captions`` captions under their pick among N), ``sheets/two_object_n<N>.png`` (two-object
captions) and ``sheets/captions.csv`` (every generated caption with the judge's verdict at the headline N); all in
one MLflow run.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dalle.clip_metrics import RECALL_K, CaptionScorer, chance_recall, clip_score, text_to_image_recall  # noqa: E402
from dalle.data.judge import judge, judge_scene  # noqa: E402
from dalle.data.shapes import canonical_caption, canonical_relation_caption  # noqa: E402
from dalle.data.store import Split, load_split  # noqa: E402
from dalle.data.tokens import load_tokens  # noqa: E402
from dalle.dvae_train import reconstruct  # noqa: E402
from dalle.evalnet import HEADS, EvalNet, caption_accuracy, image_features  # noqa: E402
from dalle.fid import InceptionFeatures, blur, frechet_distance  # noqa: E402
from dalle.generate import Candidates, Models, generate, load_models  # noqa: E402
from dalle.intervals import bootstrap_fid, error_bars, mean_interval, resamples_for, wilson  # noqa: E402
from dalle.pixels import to_float_images  # noqa: E402
from dalle.prior_train import evaluate_prior  # noqa: E402
from dalle.training import default_device  # noqa: E402
from dalle.viz import contact_sheet  # noqa: E402
from pipelines.params import add_seed_argument, load_params  # noqa: E402
from pipelines.reports import write_csv, write_json  # noqa: E402
from pipelines.sample import caption_rows  # noqa: E402
from pipelines.tracking import log_artifact, log_metrics, stage_run  # noqa: E402
from pipelines.train_dvae import PREPARED  # noqa: E402
from pipelines.train_evalnet import load_evaluator  # noqa: E402
from pipelines.train_prior import TOKENS  # noqa: E402

MODELS = Path("models")
REPORT_DIR = Path("reports/eval")
Features = Callable[[np.ndarray], np.ndarray]
ATTRIBUTE_COLUMNS = ["attribute", "group", "accuracy", "accuracy_low", "accuracy_high", "captions"]
GROUPS = (("seen", False), ("held_out", True))
TWO_OBJECT_PARTS = ("exact", "relation", "objects")  # of judge.Scene.matches; only exact at N = 1


def feature_space(
    fid_features: str, weights: str | None, models: Models, evalnet: EvalNet | None
) -> tuple[str, Features]:
    """(name, images → features) of the network FID is measured in."""
    if fid_features == "inception":
        return "inception", InceptionFeatures(weights, models.device)
    if evalnet is not None:
        return "evalnet", lambda images: image_features(evalnet, images)

    @torch.no_grad()
    def reranker(images: np.ndarray) -> np.ndarray:
        chunks = [
            models.clip.encode_image(to_float_images(images[i : i + 500], models.device)).double().cpu().numpy()
            for i in range(0, len(images), 500)
        ]
        return np.concatenate(chunks)

    return "reranker", reranker


def best_of_first(result: Candidates, n: int) -> tuple[np.ndarray, float]:
    """The reranker's pick among the first ``n`` candidates (what drawing only n would have given)."""
    index = int(np.argmax(result.scores[:n]))
    return result.images[index], float(result.scores[index])


def group_rows(records) -> dict[str, np.ndarray]:
    """Row indices of the single-object ``seen`` and ``held_out`` captions in ``records``."""
    held_out = records["held_out"].to_numpy() if "held_out" in records else np.zeros(len(records), bool)
    single = (records["n_objects"] == 1).to_numpy() if "n_objects" in records else np.ones(len(records), bool)
    return {name: np.flatnonzero((held_out == flag) & single) for name, flag in (("seen", False), ("held_out", True))}


def accuracy_by_group(evalnet: EvalNet | None, images: np.ndarray, records) -> dict[str, dict[str, float]]:
    """Caption accuracy per attribute and ``all``, for ``seen`` and ``held_out`` captions."""
    if evalnet is None or not set(HEADS) <= set(records.columns):
        return {}
    return {
        name: caption_accuracy(evalnet, images[rows], records.iloc[rows].to_dict("records"))
        for name, rows in group_rows(records).items()
        if len(rows)
    }


def group_sizes(records) -> dict[str, int]:
    """Captions per group of ``accuracy_by_group`` (the n of its fractions)."""
    return {name: len(rows) for name, rows in group_rows(records).items()}


def test_captions(records, shapes: bool) -> list[str]:
    """The caption generated for each record: on shapes the canonical one of its (single) object, so that every
    caption names all four attributes the judges read; elsewhere its first caption."""
    if not shapes:
        return [str(caps[0]) for caps in records["captions"]]
    return [canonical_caption(r["size"], r["colour"], r["shape"], r["position"]) for r in records.to_dict("records")]


def judge_hits(images: np.ndarray, records) -> np.ndarray:
    """Per image: does the pixel-rule judge read all four attributes of its record?"""
    return np.array([judge(image).matches(record)["all"] for image, record in zip(images, records.to_dict("records"))])


def judge_candidates(results: list[Candidates], records, n: int) -> np.ndarray:
    """(captions, n) bools: the pixel-rule judge's verdict on each of the first ``n`` candidates of every caption."""
    return np.stack([judge_hits(result.images[:n], records.iloc[[i] * n]) for i, result in enumerate(results)])


def candidate_metrics(hits: np.ndarray, records) -> dict[str, float]:
    """What the candidates behind the picks hold, per group: ``judge_candidates_<group>``, the share of all the
    candidates judged right (the prior alone at N = 1, averaged over every draw; t-interval over captions), and
    ``judge_oracle_<group>_n<N>``, the share of captions with at least one right candidate among N (a perfect
    reranker's accuracy, the ceiling of ``judge_accuracy_<group>_n<N>``; Wilson interval)."""
    metrics: dict[str, float] = {}
    n = hits.shape[1]
    for group, members in group_rows(records).items():
        if len(members) < 2:  # an interval needs two captions
            continue
        per_caption = hits[members].mean(axis=1)
        low, high = mean_interval(per_caption)
        metrics |= {f"judge_candidates_{group}": float(per_caption.mean()), f"judge_candidates_{group}_low": low}
        metrics[f"judge_candidates_{group}_high"] = high
        metrics |= with_interval(f"judge_oracle_{group}_n{n}", float(hits[members].any(axis=1).mean()), len(members))
    return metrics


def two_object_rows(records, n: int, holdout_pairs: Sequence[Sequence[str]]) -> np.ndarray:
    """Row numbers of up to ``n`` two-object images of ``records``: seen ones, then up to ``n // 2`` with a held-out
    (colour, shape) pair, alternating between those that hold it in the first and in the second object."""
    records = records.reset_index(drop=True)
    if "n_objects" not in records:
        return np.array([], dtype=int)
    two = records[records["n_objects"] == 2]
    held = two[two["held_out"]]
    pairs = {tuple(pair) for pair in holdout_pairs}
    in_first = np.array([(colour, shape) in pairs for colour, shape in zip(held["colour"], held["shape"])], bool)
    alternating = [i for pair in itertools.zip_longest(held.index[in_first], held.index[~in_first]) for i in pair]
    held_rows = [i for i in alternating if i is not None][: n // 2]
    seen_rows = list(two.index[~two["held_out"].to_numpy(bool)][: n - len(held_rows)])
    return np.array(seen_rows + held_rows, dtype=int)


def two_object_caption(record) -> str:
    """The canonical two-object caption of a record, in its objects' order and with its relation."""
    first = [record[key] for key in ("size", "colour", "shape")]
    return canonical_relation_caption(*first, record["relation"], record["size2"], record["colour2"], record["shape2"])


def best_picks(results: list[Candidates], ns: Sequence[int]) -> dict[int, np.ndarray]:
    """Per N in ``ns``: the reranker's picks among the first N candidates of every caption, ``(captions, S, S, 3)``."""
    return {n: np.stack([best_of_first(result, n)[0] for result in results]) for n in ns}


def judge_scenes(images: np.ndarray, records) -> list[dict[str, bool]]:
    """``Scene.matches`` of each image's judged scene against its two-object record."""
    return [judge_scene(image).matches(record) for image, record in zip(images, records.to_dict("records"))]


def two_object_metrics(hits: dict[int, list[dict[str, bool]]], held_out: np.ndarray, headline: int) -> dict:
    """``two_object_<part>_<group>_n<N>`` with Wilson intervals from ``hits[N]`` (``Scene.matches`` per caption):
    ``exact`` at every N given, every part of TWO_OBJECT_PARTS at the headline N; and the captions per group."""
    metrics: dict = {}
    for group, flag in GROUPS:
        rows = np.flatnonzero(held_out == flag)
        metrics[f"two_object_captions_{group}"] = len(rows)
        for n, scene_hits in hits.items() if len(rows) else ():  # a group without captions has no accuracy
            for part in TWO_OBJECT_PARTS if n == headline else TWO_OBJECT_PARTS[:1]:
                value = float(np.mean([scene_hits[i][part] for i in rows]))
                metrics.update(with_interval(f"two_object_{part}_{group}_n{n}", value, len(rows)))
    return metrics


def caption_table(
    captions: list[str], records, verdicts: Sequence[bool] | None, headline: int, right: np.ndarray | None = None
) -> list[dict]:
    """One row per generated caption: its text, objects, group, whether the judge passed the pick among N and
    (``right``, single objects) how many of those N candidates it passed."""
    return [
        {
            "caption": caption,
            "objects": int(record.get("n_objects", 1)),
            "held_out": record.get("held_out"),
            f"judged_n{headline}": None if verdicts is None else bool(verdicts[i]),
            f"right_of_n{headline}": None if right is None else int(right[i]),
        }
        for i, (caption, record) in enumerate(zip(captions, records.to_dict("records")))
    ]


def with_interval(key: str, value: float | None, n: int) -> dict[str, float | None]:
    """``{key: value, key_low, key_high}``: a fraction of ``n`` captions with its 95% Wilson interval."""
    if value is None:
        return {key: None, f"{key}_low": None, f"{key}_high": None}
    low, high = wilson(round(value * n), n)
    return {key: value, f"{key}_low": low, f"{key}_high": high}


def fid_with_interval(key: str, real: np.ndarray, other: np.ndarray, seed: int) -> dict[str, float]:
    """``{key: FID, key_low, key_high}``: FID between two feature sets and its bootstrap interval over images."""
    low, high = bootstrap_fid(real, other, resamples_for(real.shape[1]), seed)
    return {key: frechet_distance(real, other), f"{key}_low": low, f"{key}_high": high}


def retrieval(reranker: CaptionScorer, split: Split) -> dict[str, float]:
    """Text → image recall@k of the reranker over ``split``: each image's first caption among all its images."""
    captions = [str(caps[0]) for caps in split.records["captions"]]
    recall = text_to_image_recall(reranker.embed_captions(captions), reranker.embed_images(split.images), RECALL_K)
    return {
        **{f"retrieval_text_to_image_r{k}": value for k, value in recall.items()},
        **{f"retrieval_chance_r{k}": chance_recall(len(split), k) for k in RECALL_K},
        "retrieval_images": len(split),
    }


def write_sheets(out: Path, captions: list[str], chosen_at: dict[int, np.ndarray], n: int, name: str = "sheet"):
    """``<name>_n<N>.png`` per N: the first ``n`` captions under the reranker's pick among N candidates."""
    out.mkdir(parents=True, exist_ok=True)
    n = min(n, len(captions))
    paths = []
    for candidates, images in chosen_at.items():
        paths.append(out / f"{name}_n{candidates}.png")
        contact_sheet(images[:n], captions[:n], columns=min(8, n)).save(paths[-1])
    return paths


def figures(
    out: Path, fid_key: str, by_n: list[dict], by_blur: list[dict], by_attribute: list[dict], source: str
) -> list[Path]:
    """The plots, each value with its 95% interval (bootstrap for FID, Wilson for accuracies)."""
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    radii = [r["radius_256px"] for r in by_blur]
    for key, style, label in (("fid_generated", "o-", "generated"), ("fid_reconstruction", "s--", "dVAE recon")):
        ax.errorbar(radii, [r[key] for r in by_blur], error_bars(by_blur, key), fmt=style, capsize=3, label=label)
    ax.set(xlabel="Gaussian blur radius (px at 256 px)", ylabel=fid_key, title="FID vs blur (paper Fig. 9)")
    ax.legend()
    paths.append(out / "fid_vs_blur.png")
    fig.tight_layout(), fig.savefig(paths[-1], dpi=120), plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ns = [r["n"] for r in by_n]
    ax[0].errorbar(ns, [r[fid_key] for r in by_n], error_bars(by_n, fid_key), fmt="o-", capsize=3)
    ax[0].set(xscale="log", xlabel="candidates reranked (N)", ylabel=fid_key, title="FID vs N (95% bootstrap)")
    keys = ("accuracy_seen", "accuracy_held_out", "judge_accuracy_seen", "judge_accuracy_held_out")
    accuracies = [key for key in keys if by_n[0][key] is not None]
    for key in accuracies:
        label = ("judge " if key.startswith("judge") else "evalnet ") + key.removeprefix("judge_").split("_", 1)[1]
        style = "s--" if key.startswith("judge") else "o-"
        ax[1].errorbar(ns, [r[key] for r in by_n], error_bars(by_n, key), fmt=style, capsize=3, label=label)
    if accuracies:
        ax[1].set(ylabel="caption accuracy (all 4; 95% Wilson)", ylim=(0, 1.02))
        ax[1].legend()
    elif by_n[0]["clip_score"] is not None:
        ax[1].plot(ns, [r["clip_score"] for r in by_n], "o-")
        ax[1].set(ylabel="CLIP-score (evaluation scorer)")
    else:
        ax[1].plot(ns, [r["reranker_score"] for r in by_n], "o-")
        ax[1].set(ylabel="reranker score")
    ax[1].set(xscale="log", xlabel="candidates reranked (N)")
    paths.append(out / "fid_vs_n.png")
    fig.tight_layout(), fig.savefig(paths[-1], dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if by_attribute:
        attributes = [*HEADS, "all"]
        for offset, group in ((-0.2, "seen"), (0.2, "held_out")):
            rows = {r["attribute"]: r for r in by_attribute if r["group"] == group}
            present = [rows[a] for a in attributes if a in rows]
            x = np.array([i for i, a in enumerate(attributes) if a in rows]) + offset
            errors = error_bars(present, "accuracy")
            ax.bar(x, [r["accuracy"] for r in present], 0.4, yerr=errors, capsize=2, label=group)
        ax.set(xticks=range(len(attributes)), xticklabels=attributes, ylim=(0, 1.02), ylabel="accuracy (95% Wilson)")
        ax.legend()
    else:  # the file is a declared DVC output: say why it is empty
        message = f"no attribute labels in this dataset (data.source: {source}):\ncaption accuracy needs shapes"
        ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    paths.append(out / "accuracy_by_attribute.png")
    fig.tight_layout(), fig.savefig(paths[-1], dpi=120), plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    add_seed_argument(parser)
    parser.add_argument("--prepared", type=Path, default=PREPARED)
    parser.add_argument("--tokens", type=Path, default=TOKENS)
    parser.add_argument("--models", type=Path, default=MODELS)
    parser.add_argument("--evalnet", type=Path, default=None, help="evaluation network (default: MODELS/evalnet)")
    parser.add_argument("--reports", type=Path, default=REPORT_DIR)
    args = parser.parse_args(argv)

    params = load_params(args.params, args.seed)
    cfg, sampling = params.eval, params.sample
    device = default_device()
    models = load_models(args.models, device)
    evaluator = load_evaluator(args.evalnet or args.models / "evalnet", device)
    evalnet = evaluator if isinstance(evaluator, EvalNet) else None  # shapes: reads attributes
    scorer = evaluator if isinstance(evaluator, CaptionScorer) else None  # other data: CLIP-score
    test = load_split(args.prepared, "test")
    rows = caption_rows(test.records, cfg.n_captions)
    records = test.records.iloc[rows].reset_index(drop=True)
    shapes = params.data.source == "shapes"
    captions = test_captions(records, shapes)
    two_rows = two_object_rows(test.records, cfg.n_captions, params.data.holdout_pairs) if shapes else []
    two_records = test.records.iloc[two_rows].reset_index(drop=True)
    two_captions = [two_object_caption(record) for record in two_records.to_dict("records")]
    headline = sampling.candidates if sampling.candidates in cfg.rerank_n else cfg.rerank_n[-1]
    draw = partial(
        generate,
        models,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        guidance_scale=sampling.guidance_scale,
        seed=params.seed,
        batch_size=sampling.batch_size,
    )
    with stage_run("evaluate", params, reports=args.reports):
        name, features = feature_space(cfg.fid_features, cfg.inception_weights, models, evalnet)
        fid_key = f"fid_{name}"
        results = list(draw(captions, cfg.rerank_n[-1]))
        real = np.asarray(test.images)
        real_features = features(real)
        sizes, fid = group_sizes(records), partial(fid_with_interval, seed=params.seed)
        caption_embeddings = None if scorer is None else scorer.embed_captions(captions)
        by_n, chosen_at, judged_at = [], {}, {}  # chosen_at[n]: (images, their features); judged_at[n]: hits
        for n in cfg.rerank_n:
            picks = [best_of_first(result, n) for result in results]
            images = np.stack([image for image, _ in picks])
            chosen_at[n] = images, features(images)
            row = {"n": n, **fid(fid_key, real_features, chosen_at[n][1])}
            row["reranker_score"] = float(np.mean([score for _, score in picks]))
            accuracy = accuracy_by_group(evalnet, images, records)
            judged_at[n] = hits = judge_hits(images, records) if shapes else None
            # Every row has every column: a blank is a measure not taken.
            for group, members in group_rows(records).items():
                value = accuracy[group]["all"] if group in accuracy else None
                row.update(with_interval(f"accuracy_{group}", value, len(members)))
                judged = float(hits[members].mean()) if hits is not None and len(members) else None
                row.update(with_interval(f"judge_accuracy_{group}", judged, len(members)))
            row["clip_score"] = None if scorer is None else clip_score(scorer.embed_images(images), caption_embeddings)
            by_n.append(row)

        generated, generated_features = chosen_at[headline]
        candidate_hits = judge_candidates(results, records, headline) if shapes else None
        # The floor on as many images as the samples (the test images of the sampled captions), so that both FIDs
        # carry the same small-sample bias against the same real set.
        recon = reconstruct(models.dvae, real[rows], device)
        recon_features = features(recon)

        def blurred(images: np.ndarray, unblurred: np.ndarray, sigma: float) -> np.ndarray:
            """Features of the blurred images; at sigma 0 those already computed."""
            return unblurred if sigma == 0 else features(blur(images, sigma))

        by_blur = []
        for radius in cfg.blur_radii:
            sigma = radius * params.data.image_size / 256  # the paper's radii are pixels of 256 px images
            blurred_real = blurred(real, real_features, sigma)
            by_blur.append(
                {
                    "radius_256px": radius,
                    "sigma_px": sigma,
                    **fid("fid_generated", blurred_real, blurred(generated, generated_features, sigma)),
                    **fid("fid_reconstruction", blurred_real, blurred(recon, recon_features, sigma)),
                }
            )
        groups = accuracy_by_group(evalnet, generated, records)
        by_attribute = [
            {"attribute": attribute, "group": group, **with_interval("accuracy", value, sizes[group])}
            | {"captions": sizes[group]}
            for group, accuracy in groups.items()
            for attribute, value in accuracy.items()
        ]
        test_tokens = load_tokens(args.tokens, "test")
        nll = evaluate_prior(models.prior, test_tokens, len(test_tokens), device)
        at_headline = by_n[cfg.rerank_n.index(headline)]
        metrics: dict = {
            **{key: at_headline[key] for key in (fid_key, f"{fid_key}_low", f"{fid_key}_high")},
            **fid(f"{fid_key}_reconstruction", real_features, recon_features),
            "fid_feature_dim": int(real_features.shape[1]),
            "fid_real_images": len(real_features),
            "fid_generated_images": len(generated_features),  # also the reconstructions' count
            "fid_bootstrap_resamples": resamples_for(real_features.shape[1]),
            "headline_n": headline,
            "reranker_score": at_headline["reranker_score"],
            "test_text_nll": nll["val_text_nll"],
            "test_image_nll": nll["val_image_nll"],
            "test_image_bits": nll["val_image_bits"],
            "captions": len(captions),
            **retrieval(CaptionScorer(models.clip, models.tokenizer), test),
        }
        if scorer is not None:  # first candidates (N = 1, the prior alone), reranked picks, and the real images
            first = np.stack([result.images[0] for result in results])
            metrics["clip_score"] = at_headline["clip_score"]
            metrics["clip_score_n1"] = clip_score(scorer.embed_images(first), caption_embeddings)
            metrics["clip_score_real"] = clip_score(scorer.embed_images(test.images[rows]), caption_embeddings)
        for group, accuracy in groups.items():
            for attribute, value in accuracy.items():
                metrics.update(with_interval(f"accuracy_{attribute}_{group}", value, sizes[group]))
        for n_row in (by_n[0], at_headline):  # the first N (1: the prior alone) and the headline N, with intervals
            for group in groups:
                key, name = f"accuracy_{group}", f"accuracy_{group}_n{n_row['n']}"
                metrics.update({name + end: n_row[key + end] for end in ("", "_low", "_high")})
        for n_row in by_n:  # the pixel-rule judge at every N
            for group, _ in GROUPS:
                key, name = f"judge_accuracy_{group}", f"judge_accuracy_{group}_n{n_row['n']}"
                if n_row[key] is not None:
                    metrics.update({name + end: n_row[key + end] for end in ("", "_low", "_high")})
        if candidate_hits is not None:
            metrics.update(candidate_metrics(candidate_hits, records))
        # max_objects 2: the same for two-object scenes, by the scene judge, at N = 1 and the headline N only.
        two_chosen = {} if not two_captions else best_picks(list(draw(two_captions, headline)), sorted({1, headline}))
        two_hits = {n: judge_scenes(images, two_records) for n, images in two_chosen.items()}
        if two_hits:
            metrics.update(two_object_metrics(two_hits, two_records["held_out"].to_numpy(bool), headline))
        real_sizes = group_sizes(test.records)
        for group, accuracy in accuracy_by_group(evalnet, real, test.records).items():
            metrics.update(with_interval(f"real_accuracy_all_{group}", accuracy["all"], real_sizes[group]))

        args.reports.mkdir(parents=True, exist_ok=True)
        write_json(args.reports / "metrics.json", metrics)
        write_csv(args.reports / "fid_vs_n.csv", by_n)
        write_csv(args.reports / "fid_vs_blur.csv", by_blur)
        write_csv(args.reports / "accuracy_by_attribute.csv", by_attribute, ATTRIBUTE_COLUMNS)
        pictures = figures(args.reports, fid_key, by_n, by_blur, by_attribute, params.data.source)
        sheets = write_sheets(
            args.reports / "sheets", captions, {n: c[0] for n, c in chosen_at.items()}, cfg.sheet_captions
        )
        sheets += write_sheets(args.reports / "sheets", two_captions, two_chosen, cfg.sheet_captions, "two_object")
        right = None if candidate_hits is None else candidate_hits.sum(axis=1)
        table = caption_table(captions, records, judged_at[headline], headline, right)
        table += caption_table(two_captions, two_records, [h["exact"] for h in two_hits.get(headline, [])], headline)
        sheets.append(args.reports / "sheets" / "captions.csv")
        write_csv(sheets[-1], table, list(table[0]))
        log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        for row in by_n:
            measured = {f"{k}_vs_n": float(v) for k, v in row.items() if k != "n" and v is not None}
            log_metrics(measured, step=row["n"])
        for path in [*args.reports.glob("*.csv"), args.reports / "metrics.json", *pictures]:
            log_artifact(str(path))
        for path in sheets:
            log_artifact(str(path), artifact_path="sheets")
    judged = (f"judge_accuracy_seen_n{headline}", f"judge_accuracy_held_out_n{headline}")
    judged += tuple(f"two_object_exact_{group}_n{headline}" for group in ("seen", "held_out"))
    scores = [f"{k} {v:.0%}" for k, v in metrics.items() if k.startswith(("accuracy_all", "retrieval_text_to_image"))]
    scores += [f"{k} {metrics[k]:.0%}" for k in judged if k in metrics]
    scores += [f"{k} {v:.1f}" for k, v in metrics.items() if k.startswith("clip_score")]
    print(
        f"evaluate: {fid_key} {metrics[fid_key]:.2f} (reconstructions {metrics[f'{fid_key}_reconstruction']:.2f}) "
        f"at N={headline}; " + ", ".join(scores)
    )


if __name__ == "__main__":
    main()
