"""params.yaml -> typed Params: strict validation with the file, section and key named in every error."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from dalle.config import DataConfig, Params, ParamsError
from pipelines.params import load_params

REPO = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((REPO / "params.yaml").read_text())


def write_params(tmp_path: Path, edit) -> Path:
    raw = copy.deepcopy(RAW)
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_default_params_file_loads_and_matches_code_defaults():
    assert load_params(REPO / "params.yaml") == Params()


def test_every_key_in_params_yaml_has_a_comment():
    lines = (REPO / "params.yaml").read_text().splitlines()
    for key in Params().flat():
        leaf = key.split(".")[-1]
        matches = [line for line in lines if re.match(rf"\s*{leaf}:", line)]
        assert matches, f"{key} not found in params.yaml"
        assert all("#" in line for line in matches), f"{key} has no comment in params.yaml"


def test_flat_keys_are_dvc_style():
    flat = Params().flat()
    assert flat["data.n_train"] == 10000 and flat["seed"] == 0 and flat["tokenizer.text_len"] == 32
    assert flat["dvae.codebook_size"] == Params().dvae.codebook_size


def _set(path: str, value):
    def edit(raw):
        *parents, leaf = path.split(".")
        node = raw
        for name in parents:
            node = node[name]
        node[leaf] = value

    return edit


def _delete(path: str):
    def edit(raw):
        *parents, leaf = path.split(".")
        node = raw
        for name in parents:
            node = node[name]
        del node[leaf]

    return edit


@pytest.mark.parametrize(
    "edit, key, words",
    [
        (_set("data.n_trian", 5), "data.n_trian", "unknown key"),
        (_set("colour", "red"), "colour", "unknown key"),
        (_delete("tokenizer.text_len"), "tokenizer.text_len", "missing required key"),
        (_delete("dvae"), "dvae", "missing required key"),
        (_set("data.image_size", "32"), "data.image_size", "expected an integer"),
        (_set("data.n_train", True), "data.n_train", "expected an integer"),
        (_set("seed", 1.5), "seed", "expected an integer"),
        (_set("data.heldout_fraction", "half"), "data.heldout_fraction", "expected a number"),
        (_set("data.source", "s3"), "data.source", "one of 'shapes', 'folder', 'manifest'"),
        (_set("data", [1, 2]), "data", "expected a section"),
        (_set("data.holdout_pairs", [["red"]]), "data.holdout_pairs[0]", "list of 2 items"),
        (_set("data.holdout_pairs", [["purple", "circle"]]), "data.holdout_pairs", "unknown colour 'purple'"),
        (_set("data.holdout_pairs", [["red", "hexagon"]]), "data.holdout_pairs", "unknown shape 'hexagon'"),
        (_set("data.holdout_pairs", [["red", "circle"], ["red", "circle"]]), "data.holdout_pairs", "twice"),
        (_set("data.image_size", 8), "data.image_size", "16..256"),
        (_set("data.image_size", 34), "data.image_size", "not divisible by dvae.downsample=4"),
        (_set("data.n_train", -3), "data.n_train", ">= 1"),
        (_set("data.n_val", 0), "data.n_val", ">= 1"),
        (_set("data.max_objects", 3), "data.max_objects", "1 or 2"),
        (_set("data.heldout_fraction", 1.5), "data.heldout_fraction", "[0, 1]"),
        (_set("data.source", "folder"), "data.path", "required when data.source is 'folder'"),
        (_set("data.workers", 0), "data.workers", ">= 1"),
        (_set("data.source", "tar"), "data.source", "'manifest', 'webdataset'"),
        (_set("data.val_fraction", 0.0), "data.val_fraction", "(0, 1)"),
        (_set("data.test_fraction", 0.96), "data.test_fraction", "must leave a training share"),
        (_set("data.group_key", " "), "data.group_key", "non-empty field name"),
        (_set("data.caption_key", 3), "data.caption_key", "expected a string"),
        (_set("data.background", [255, 255]), "data.background", "list of 3 items"),
        (_set("data.background", [0, 0, 300]), "data.background", "0..255"),
        (_set("data.min_size", 0), "data.min_size", ">= 1"),
        (_set("data.max_aspect", 0.5), "data.max_aspect", ">= 1"),
        (_set("data.max_pixels", 0), "data.max_pixels", ">= 1"),
        (_set("data.image_format", "gif"), "data.image_format", "'png', 'jpeg', 'webp'"),
        (_set("data.image_quality", 101), "data.image_quality", "1..100"),
        (_set("data.shard_size", 0), "data.shard_size", ">= 1"),
        (_set("data.cache_mb", -1), "data.cache_mb", ">= 0"),
        (_set("loader.order", "sequential"), "loader.order", "random"),
        (_set("prior.lr", float("inf")), "prior.lr", "a finite number"),
        (_set("data.max_aspect", float("nan")), "data.max_aspect", "a finite number"),
        (_set("loader.shuffle_block", 0), "loader.shuffle_block", ">= 1"),
        (_set("tokenizer.vocab_size", 100), "tokenizer.vocab_size", "> 256"),
        (_set("tokenizer.text_len", 0), "tokenizer.text_len", ">= 1"),
        (_set("dvae.downsample", 3), "dvae.downsample", "power of two"),
        (_set("dvae.codebook_size", 1), "dvae.codebook_size", ">= 2"),
        (_set("dvae.hidden", 30), "dvae.hidden", "divisible by 4"),
        (_set("dvae.recon_loss", "l2"), "dvae.recon_loss", "one of 'logit_laplace', 'mse', 'smooth_l1'"),
        (_set("dvae.tau_end", 2.0), "dvae.tau_end", "0 < tau_end <= tau_start"),
        (_set("dvae.ema_decay", 1.0), "dvae.ema_decay", "[0, 1)"),
        (_set("dvae.hard", "yes"), "dvae.hard", "true or false"),
        (_set("dvae.steps", 0), "dvae.steps", ">= 1"),
        (_set("dvae.lr_min", 1.0), "dvae.lr_min", "[0, lr]"),
        (_set("dvae.train_images", 0), "dvae.train_images", ">= 1 or null"),
        (_set("dvae.train_images", "all"), "dvae.train_images", "expected an integer"),
        (_set("seed", -1), "seed", ">= 0"),
        (_set("mlflow.experiment", " "), "mlflow.experiment", "non-empty"),
        (_set("prior.schedule", "diagonal"), "prior.schedule", "unknown attention schedule 'diagonal'"),
        (_set("prior.schedule", ["row", "column"]), "prior.schedule", "lists 2 kinds but the model has n_layers=4"),
        (_set("prior.schedule", ["row", "row", "row", "strided"]), "prior.schedule", "unknown mask kind 'strided'"),
        (_set("prior.schedule", 3), "prior.schedule", "expected a string or a list"),
        (_set("prior.d_model", 130), "prior.d_model", "not divisible by n_heads=4"),
        (_set("prior.conv_kernel", 4), "prior.conv_kernel", "must be odd"),
        (_set("prior.attn_impl", "sparse"), "prior.attn_impl", "one of 'dense', 'flex'"),
        (_set("prior.text_loss_weight", 1.5), "prior.text_loss_weight", "[0, 1]"),
        (_set("prior.grad_clip", 0.0), "prior.grad_clip", "> 0"),
        (_set("prior.samples", 0), "prior.samples", ">= 1"),
        (_set("prior.lr_min", 0.1), "prior.lr_min", "[0, lr]"),
        (_set("clip.image_stages", 6), "clip.image_stages", "2**6 does not divide data.image_size=32"),
        (_set("sample.top", 20), "sample.top", "keeps 20 of only 16 candidates"),
        (_set("sample.top_p", 0.0), "sample.top_p", "(0, 1] or null"),
        (_set("eval.fid_features", "inception"), "eval.inception_weights", "is required when eval.fid_features"),
        (_set("eval.rerank_n", [4, 2]), "eval.rerank_n", "increasing"),
        (_set("ablation.schedules", ["paper", "diagonal"]), "ablation.schedules", "unknown schedule 'diagonal'"),
        (_set("sweep.prior", {"lrr": ["float", 0.1, 1.0]}), "sweep.prior.lrr", "unknown parameter of the prior"),
        (_set("sweep.prior", {"lr": ["float", 0.1, 0.01]}), "sweep.prior.lr", "empty range: low 0.1"),
        (_set("sweep.dvae", {"lr": ["uniform", 0.1, 1.0]}), "sweep.dvae.lr", "must start with float, int or"),
        (_set("sweep.prior", {"n_layers": ["int", 2.5, 6]}), "sweep.prior.n_layers", "int bounds must be integers"),
        (_set("sweep.prior", {"lr": ["float", 0.0, 1.0, "log"]}), "sweep.prior.lr", "a log range needs low > 0"),
        (_set("sweep.prior", {"lr": ["categorical"]}), "sweep.prior.lr", "at least one choice"),
        (_set("sweep.prior", [1, 2]), "sweep.prior", "expected a mapping"),
        (_set("sweep.pruner", "asha"), "sweep.pruner", "one of 'median', 'hyperband', 'none'"),
        (_set("bench.attention_image_tokens", [300]), "bench.attention_image_tokens", "300 is not a square grid"),
        (_set("bench.attn_impls", ["sparse"]), "bench.attn_impls", "unknown attention implementation 'sparse'"),
        (_set("bench.guidance_scale", 1.0), "bench.guidance_scale", "must differ from 1"),
        (_set("bench.repeats", 0), "bench.repeats", ">= 1"),
        (_set("bench.schedules", ["diagonal"]), "bench.schedules", "unknown schedule 'diagonal'"),
        (_set("bench.uncached_positions", 1), "bench.uncached_positions", ">= 2"),
    ],
)
def test_bad_value_names_file_section_and_key(tmp_path, edit, key, words):
    path = write_params(tmp_path, edit)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message, message


def test_valid_override_is_typed_and_frozen(tmp_path):
    path = write_params(tmp_path, _set("data.holdout_pairs", [["green", "square"]]))
    params = load_params(path)
    assert params.data.holdout_pairs == (("green", "square"),)
    assert isinstance(params.data.heldout_fraction, float)
    with pytest.raises(AttributeError):
        params.data.image_size = 64  # type: ignore[misc]


def test_schedule_is_a_name_or_a_list_of_kinds(tmp_path):
    params = load_params(write_params(tmp_path, _set("prior.schedule", ["row", "column", "conv", "full"])))
    assert params.prior.schedule == ("row", "column", "conv", "full")
    assert Params().prior.schedule == "full"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match=f"{bad}: not valid YAML"):
        load_params(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="expected a mapping of sections"):
        load_params(bad)


def test_dataclass_validates_when_built_in_code():
    with pytest.raises(ValueError, match="image_size: must be in 16..256"):
        DataConfig(image_size=300)


def test_a_key_written_twice_names_the_key_and_both_lines(tmp_path):
    text = (REPO / "params.yaml").read_text()
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("  lr: "))  # the dVAE's lr
    lines.insert(first + 2, "  lr: 0.1")
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ParamsError, match=rf"duplicate key 'lr' \(first on line {first + 1}, again on line {first + 3}\)"
    ):
        load_params(path)
    prior = text.index("\nprior:\n")  # the first steps key after it is the prior's
    path.write_text(text[:prior] + re.sub(r"(\n  steps:) \d+", r"\1 .inf", text[prior:], count=1))
    with pytest.raises(ParamsError, match=r"prior\.steps: expected an integer"):
        load_params(path)
