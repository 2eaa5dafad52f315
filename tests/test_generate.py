"""`python -m dalle generate` on tiny untrained models: files and manifest contract, reranking order,
reproducibility, and every bad input with its message."""

from __future__ import annotations

import csv
import dataclasses
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle import __main__ as cli
from dalle import generate as generate_module
from dalle.checkpoint import save_weights
from dalle.clip import Clip
from dalle.config import ClipConfig, DvaeConfig, PriorConfig
from dalle.dvae import DiscreteVAE
from dalle.generate import generate, load_models, prime_tokens_from_image
from dalle.prior import Prior, PriorGeometry
from dalle.text import TextTokenizer

TEXT_LEN = 8


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """dvae/, prior/ (with tokenizer.json) and clip/ as the pipeline writes them, randomly initialised."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tokenizer = TextTokenizer.train(["a small red circle", "a big blue square at the top"] * 20, vocab_size=300)
    dvae_cfg = DvaeConfig(codebook_size=16, hidden=8, codebook_dim=16)
    save_weights(DiscreteVAE(dvae_cfg), root / "dvae", {**dataclasses.asdict(dvae_cfg), "image_size": 16})
    geometry = PriorGeometry(text_vocab=tokenizer.vocab_size, text_len=TEXT_LEN, image_vocab=16, grid=4)
    prior_cfg = PriorConfig(n_layers=2, n_heads=2, d_model=32, conv_kernel=3, schedule="paper")
    config = {**dataclasses.asdict(prior_cfg), "geometry": dataclasses.asdict(geometry)}
    save_weights(Prior(prior_cfg, geometry), root / "prior", config)
    tokenizer.save(root / "prior" / "tokenizer.json")
    clip_cfg = ClipConfig(embed_dim=16, text_layers=1, text_width=32, text_heads=2, image_channels=8, image_stages=2)
    geometry = {"text_vocab": tokenizer.vocab_size, "text_len": TEXT_LEN, "image_size": 16}
    config = {**dataclasses.asdict(clip_cfg), **geometry}
    save_weights(Clip(clip_cfg, tokenizer.vocab_size, TEXT_LEN, 16), root / "clip", config)
    return root


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_generate_writes_the_manifest_contract(tmp_path, models_dir, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("a small red circle\n\n  \na big blue square at the top\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["generate", "--captions", str(captions), "--out", str(out), "--models", str(models_dir)]
    assert cli.main([*args, "--candidates", "5", "--top", "2", "--batch-size", "2", "--top-k", "8"]) == 0
    assert "skipped 2 blank line(s)" in capsys.readouterr().err
    rows = read_manifest(out / "manifest.csv")
    assert list(rows[0]) == ["caption", "path", "rank", "score"]
    assert [(r["caption"], r["path"], r["rank"]) for r in rows] == [
        ("a small red circle", "0_0.png", "0"),
        ("a small red circle", "0_1.png", "1"),
        ("a big blue square at the top", "1_0.png", "0"),
        ("a big blue square at the top", "1_1.png", "1"),
    ]
    assert float(rows[0]["score"]) >= float(rows[1]["score"]) and float(rows[2]["score"]) >= float(rows[3]["score"])
    assert all((out / r["path"]).is_file() for r in rows) and (out / "sheet.png").is_file()


def test_best_candidates_are_the_highest_scored_and_reproducible(models_dir):
    models = load_models(models_dir)
    (first,) = generate(models, ["a small red circle"], candidates=6, seed=3, progress=False)
    (again,) = generate(models, ["a small red circle"], candidates=6, seed=3, progress=False)
    np.testing.assert_array_equal(first.images, again.images)
    images, scores = first.best(2)
    assert list(scores) == sorted(first.scores, reverse=True)[:2]
    np.testing.assert_array_equal(images[0], first.images[int(np.argmax(first.scores))])
    # A caption's candidates do not depend on the captions after it.
    together, _ = generate(models, ["a small red circle", "a big blue square"], candidates=6, seed=3, progress=False)
    np.testing.assert_array_equal(together.images, first.images)


def test_long_captions_are_truncated_with_a_warning(models_dir):
    models = load_models(models_dir)
    with pytest.warns(UserWarning, match="truncated to text_len=8"):
        list(generate(models, ["a small red circle " * 6], candidates=1, progress=False))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--candidates", "2", "--top", "3"], "--top 3 is more than --candidates 2"),
        (["--temperature", "0"], "temperature: must be > 0"),
        (["--top-p", "1.5"], "top_p: must be in (0, 1]"),
    ],
)
def test_bad_options_fail_with_a_message(tmp_path, models_dir, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--caption", "x", "--out", str(tmp_path), "--models", str(models_dir), *extra])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_empty_file_and_missing_models_name_the_problem(tmp_path, models_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--captions", str(empty), "--out", str(tmp_path), "--models", str(models_dir)])
    assert "has no captions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--caption", "x", "--out", str(tmp_path), "--models", str(tmp_path / "none")])
    assert "dvae/model.safetensors not found; run the train_dvae stage first" in capsys.readouterr().err


def test_priming_keeps_the_images_top_rows(tmp_path, models_dir, monkeypatch):
    models = load_models(models_dir)
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    prime = prime_tokens_from_image(models, image, prime_rows=2)
    with torch.no_grad():
        codes = models.dvae.encode(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    torch.testing.assert_close(prime, codes[:, :2].reshape(1, 8))
    seen = []
    original = generate_module.sample_image_tokens

    def spy(*args, **kwargs):
        tokens = original(*args, **kwargs)
        seen.append(tokens)
        return tokens

    monkeypatch.setattr(generate_module, "sample_image_tokens", spy)
    Image.fromarray(image).save(tmp_path / "prime.png")
    args = ["generate", "--caption", "a small red circle", "--out", str(tmp_path / "out"), "--models", str(models_dir)]
    priming = ["--prime-image", str(tmp_path / "prime.png"), "--prime-rows", "2"]
    assert cli.main([*args, "--candidates", "3", *priming]) == 0
    (tokens,) = seen
    torch.testing.assert_close(tokens[:, :8], prime.expand(3, -1))
    with pytest.raises(ValueError, match="prime_rows must be in 1..3"):
        prime_tokens_from_image(models, image, prime_rows=4)
    with pytest.raises(ValueError, match=r"must be uint8 \(16, 16, 3\)"):
        prime_tokens_from_image(models, image[:8], prime_rows=1)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Bad input must fail before any model is loaded (the expensive part)."""

    def refuse(*args, **kwargs):
        raise AssertionError("models were loaded before the input was checked")

    monkeypatch.setattr(cli, "load_models", refuse)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", "-1"], "--seed -1 is out of range"),
        (["--seed", str(2**63)], f"--seed {2**63} is out of range"),
        (["--guidance", "3"], "--guidance 3.0 needs a prior trained with prior.null_text_prob > 0"),
    ],
)
def test_bad_seed_and_unsupported_guidance_fail_before_loading(
    tmp_path, models_dir, capsys, no_model_loading, extra, message
):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--caption", "x", "--out", str(tmp_path), "--models", str(models_dir), *extra])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_bad_out_prime_image_and_caption_file_name_the_culprit(tmp_path, models_dir, capsys, no_model_loading):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not pixels")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a red circle\ncaf\xe9 square\n".encode("latin-1"))
    base = ["generate", "--models", str(models_dir)]
    cases = [
        ([*base, "--caption", "x", "--out", str(a_file)], f"--out {a_file} exists and is not a directory"),
        ([*base, "--caption", "x", "--out", str(a_file / "sub")], f"{a_file} is not writable"),
        (
            [*base, "--caption", "x", "--out", str(tmp_path / "o"), "--prime-image", str(not_an_image)],
            f"--prime-image {not_an_image} is not a readable image",
        ),
        ([*base, "--captions", str(latin1), "--out", str(tmp_path / "o")], f"{latin1} is not UTF-8: byte 16 (0xe9)"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a refused call


def test_a_bom_is_dropped_and_force_allows_guidance(tmp_path, models_dir):
    captions = tmp_path / "captions.txt"
    captions.write_bytes("\ufeffa small red circle\n".encode())
    argv = ["generate", "--captions", str(captions), "--out", str(tmp_path / "out"), "--models", str(models_dir)]
    assert cli.main([*argv, "--candidates", "2", "--top", "1", "--guidance", "2", "--force"]) == 0
    assert [row["caption"] for row in read_manifest(tmp_path / "out" / "manifest.csv")] == ["a small red circle"]


def test_models_from_different_runs_are_refused_naming_both_folders(tmp_path, models_dir):
    shutil.copytree(models_dir, tmp_path / "models")
    dvae_cfg = DvaeConfig(codebook_size=32, hidden=8, codebook_dim=16)
    save_weights(
        DiscreteVAE(dvae_cfg), tmp_path / "models" / "dvae", {**dataclasses.asdict(dvae_cfg), "image_size": 32}
    )
    root = tmp_path / "models"
    with pytest.raises(ValueError, match=rf"{root / 'dvae'} has 32 codes but {root / 'prior'} models 16") as info:
        load_models(root)
    assert f"{root / 'dvae'} turns 32 px images into a 8² grid but {root / 'prior'} models a 4² grid" in str(info.value)
    assert f"{root / 'clip'} scores 16 px images but {root / 'dvae'} makes 32 px" in str(info.value)


def test_a_crash_midway_keeps_every_finished_caption(tmp_path, models_dir, monkeypatch):
    """Output is written per caption: a failure at caption 3 of 5 leaves captions 0-1 complete on disk."""
    real = generate_module.generate

    def failing(*args, **kwargs):
        for index, result in enumerate(real(*args, **kwargs)):
            if index == 2:
                raise RuntimeError("out of memory at caption 2")
            yield result

    monkeypatch.setattr(cli, "generate", failing)
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"a small red circle {i}\n" for i in range(5)), encoding="utf-8")
    out = tmp_path / "out"
    args = ["generate", "--captions", str(captions), "--out", str(out), "--models", str(models_dir), "--top", "2"]
    with pytest.raises(RuntimeError, match="caption 2"):
        cli.main([*args, "--candidates", "3"])
    rows = read_manifest(out / "manifest.csv")
    assert [(r["caption"], r["path"]) for r in rows] == [
        ("a small red circle 0", "0_0.png"),
        ("a small red circle 0", "0_1.png"),
        ("a small red circle 1", "1_0.png"),
        ("a small red circle 1", "1_1.png"),
    ]
    assert sorted(p.name for p in out.glob("*.png")) == ["0_0.png", "0_1.png", "1_0.png", "1_1.png"]
    assert not list(out.glob(".*tmp*"))


def test_candidates_are_not_accumulated(tmp_path, models_dir, monkeypatch):
    """The CLI holds one caption's candidates at a time: the previous ones are freed before the next is drawn."""
    real, alive = generate_module.generate, []

    def watched(*args, **kwargs):
        for result in real(*args, **kwargs):
            alive.append(weakref.ref(result))
            assert sum(ref() is not None for ref in alive) == 1, "an earlier caption's candidates are still held"
            yield result

    monkeypatch.setattr(cli, "generate", watched)
    out = tmp_path / "out"
    args = ["generate", "--out", str(out), "--models", str(models_dir), "--candidates", "2"]
    assert cli.main([*args, *sum((["--caption", f"a small red circle {i}"] for i in range(4)), [])]) == 0
    assert len(read_manifest(out / "manifest.csv")) == 4
