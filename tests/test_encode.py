"""The encode stage's token shards: the sharded view equals the old concatenated arrays; a SIGKILLed run resumes
bit-identically; torchrun with 2 processes, and shard ranges then a merge, give the same bytes as one run."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dalle.checkpoint import save_weights
from dalle.config import DvaeConfig
from dalle.data.prepare import prepare_dataset
from dalle.data.store import SPLITS, load_split
from dalle.data.tokens import ShardedRows, encode_images, load_tokens
from dalle.dvae import DiscreteVAE, load_dvae
from dalle.text import TextTokenizer
from pipelines import encode
from pipelines.params import load_params

REPO = Path(__file__).resolve().parents[1]
DVAE = DvaeConfig(codebook_size=16, hidden=8, codebook_dim=16)
N_SHARDS = 8  # train 40 / 8 + val 8 / 8 + test 16 / 8


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def save_dvae(directory: Path, seed: int) -> None:
    torch.manual_seed(seed)
    save_weights(DiscreteVAE(DVAE), directory, {**dataclasses.asdict(DVAE), "image_size": 16})


@pytest.fixture(scope="module", autouse=True)
def on_cpu():
    """Every comparison here runs on the CPU (bf16 CUDA kernels may round differently for other batch shapes)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, on_cpu) -> Path:
    """A prepared dataset of several shards per split, a random tiny dVAE, and one uninterrupted encode in ref/."""
    root = tmp_path_factory.mktemp("encode")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["mlflow"]["experiment"] = "test-encode"
    raw["data"].update(n_train=40, n_val=8, n_test=16, image_size=16, shard_size=8, captions_per_image=2)
    raw["eval"]["blur_radii"] = [0, 8, 16]  # >= 0.5 px at 16 px
    raw["tokenizer"].update(vocab_size=300, text_len=12)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    prepare_dataset(load_params(root / "params.yaml"), root / "prepared")
    save_dvae(root / "dvae", seed=0)
    encode.main(args(root, root / "ref"))
    return root


def args(root: Path, out: Path, *extra: str, models: Path | None = None) -> list[str]:
    return [
        *("--params", str(root / "params.yaml"), "--prepared", str(root / "prepared")),
        *("--models", str(models or root / "dvae"), "--out", str(out / "data" / "tokens")),
        *("--reports", str(out / "reports"), *extra),
    ]


def outputs(out: Path) -> dict[str, bytes]:
    """Everything a run publishes, except shards.csv (which process encoded what, and how long it took)."""
    reports = {f"reports/{name}": data for name, data in tree(out / "reports").items() if name != "shards.csv"}
    return {**{f"data/{name}": data for name, data in tree(out / "data").items()}, **reports}


def shard_rows(out: Path) -> list[dict]:
    with (out / "reports" / "shards.csv").open() as handle:
        return list(csv.DictReader(handle))


def staged_shards(staging: Path) -> set[str]:
    return {f"{path.parent.name}/{path.name}" for path in staging.glob("*/shard-*")}


def test_sharded_tokens_equal_the_concatenated_arrays(inputs):
    ref = inputs / "ref"
    model = load_dvae(inputs / "dvae")
    tokenizer = TextTokenizer.from_file(inputs / "prepared" / "tokenizer.json")
    for split, cache_bytes in ((split, cache) for split in SPLITS for cache in (0, 2**30)):
        prepared = load_split(inputs / "prepared", split)
        tokens = load_tokens(ref / "data" / "tokens", split, cache_bytes)  # sharded views, then in memory
        assert isinstance(tokens.text_ids, np.ndarray if cache_bytes else ShardedRows)
        index = json.loads((ref / "data" / "tokens" / split / "index.json").read_text())
        assert len(index["shards"]) == len(prepared) // 8  # 5, 1 and 2 shards
        # What the single-array format held: one pass over the split, all captions at once.
        captions = [caption for caps in prepared.records["captions"] for caption in caps]
        encoded = tokenizer.encode(captions, 12)
        offsets = np.concatenate([[0], np.cumsum(prepared.records["captions"].map(len))])
        image_tokens = encode_images(model, prepared.images, range(len(prepared)), batch_size=256)
        assert np.array_equal(np.asarray(tokens.image_tokens), image_tokens)
        assert tokens.image_tokens.dtype == np.uint16 and tokens.image_tokens.shape == (len(prepared), 4, 4)
        assert np.array_equal(np.asarray(tokens.text_ids), encoded.ids) and tokens.text_ids.dtype == np.int32
        assert np.array_equal(np.asarray(tokens.text_lengths), encoded.lengths)
        assert np.array_equal(tokens.caption_offsets, offsets) and len(tokens) == len(prepared)
        rows = np.random.default_rng(0).integers(0, len(captions), 50)  # unsorted, repeats, across shards
        assert np.array_equal(tokens.text_ids[rows], encoded.ids[rows])
        assert int(tokens.text_lengths[int(rows[0])]) == encoded.lengths[rows[0]]
    metrics = json.loads((ref / "reports" / "metrics.json").read_text())
    assert metrics["captions"] == {"train": 80, "val": 16, "test": 32} and metrics["grid"] == 4
    with (ref / "reports" / "codebook_usage.csv").open() as handle:
        assert sum(int(row["count"]) for row in csv.DictReader(handle)) == 40 * 16
    assert sorted(p.name for p in (ref / "data").iterdir()) == ["tokens"]


def test_sharded_rows_index_like_one_array(tmp_path):
    parts = [np.arange(n * 3).reshape(n, 3) + 100 * i for i, n in enumerate((4, 0, 5, 2))]
    for i, part in enumerate(parts):
        np.save(tmp_path / f"{i}.npy", part)
    whole = np.concatenate(parts)
    view = ShardedRows([tmp_path / f"{i}.npy" for i in range(4)], [4, 0, 5, 2], (3,), whole.dtype)
    assert view.shape == whole.shape and len(view) == 11 and view.ndim == 2
    for index in (3, -1, np.int64(9), slice(2, 10, 3), slice(None), np.array([10, 0, 4, 4, -2]), whole[:, 0] > 300):
        assert np.array_equal(view[index], whole[index]), index
    assert np.array_equal(view[np.array([[1, 6], [8, 0]]), 1:], whole[np.array([[1, 6], [8, 0]]), 1:])
    assert np.array_equal(view[5, 2], whole[5, 2]) and np.array_equal(np.asarray(view), whole)
    assert np.array_equal(view > 200, whole > 200) and np.array_equal(1 + view, 1 + whole) and np.max(view) == 305
    with pytest.raises(IndexError):
        view[np.array([11])]


def test_sigkill_midway_then_rerun_is_bit_identical(inputs, tmp_path, monkeypatch):
    staging = tmp_path / "data" / ".tokens.staging"
    env = dict(os.environ, PYTHONPATH=str(REPO), **{encode.PAUSE_ENV: "1"})  # a second after each shard
    command = [sys.executable, "-m", "pipelines.encode", *args(inputs, tmp_path)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(staged_shards(staging)) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    kept = staged_shards(staging)
    assert 2 <= len(kept) < N_SHARDS and not (tmp_path / "data" / "tokens").exists()
    (staging / "test" / ".shard-00001.tmp-host-1").mkdir(parents=True)  # as a kill mid-write leaves it

    encoded = []
    original = encode.encode_shard
    monkeypatch.setattr(encode, "encode_shard", lambda *a, **k: encoded.append(a[3]) or original(*a, **k))
    encode.main(args(inputs, tmp_path))
    assert len(encoded) == N_SHARDS - len(kept)  # the finished shards were verified and kept
    assert outputs(tmp_path) == outputs(inputs / "ref")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["tokens"]  # no staging or temp left


def test_torchrun_two_processes_equal_one_and_split_the_shards(inputs, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "pipelines.encode", *args(inputs, tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert outputs(tmp_path) == outputs(inputs / "ref")
    rows = shard_rows(tmp_path)
    assert [int(row["rank"]) for row in rows] == [number % 2 for number in range(N_SHARDS)]
    assert {row["world"] for row in rows} == {"2"}
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["tokens"]


def test_shard_ranges_then_merge_equal_one_run(inputs, tmp_path):
    staging = tmp_path / "data" / ".tokens.staging"
    encode.main(args(inputs, tmp_path, "--shards", "0:3"))
    assert len(staged_shards(staging)) == 3 and not (tmp_path / "data" / "tokens").exists()
    with pytest.raises(FileNotFoundError, match=r"5 of 8 token shards .* \(train/shard-00003, .*--shards 3:8"):
        encode.main(args(inputs, tmp_path, "--merge"))
    encode.main(args(inputs, tmp_path, "--shards", "3:"))
    encode.main(args(inputs, tmp_path, "--merge"))
    assert outputs(tmp_path) == outputs(inputs / "ref")
    assert [row["range"] for row in shard_rows(tmp_path)] == ["0:3"] * 3 + ["3:8"] * 5
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["tokens"]


def test_changed_inputs_or_damaged_shards_are_encoded_again(inputs, tmp_path, monkeypatch):
    staging = tmp_path / "data" / ".tokens.staging"
    encoded = []
    original = encode.encode_shard
    monkeypatch.setattr(encode, "encode_shard", lambda *a, **k: encoded.append(a[3]) or original(*a, **k))
    encode.main(args(inputs, tmp_path, "--shards", "0:2"))
    damaged = staging / "train" / "shard-00001" / "text_ids.npy"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x7f")
    encode.main(args(inputs, tmp_path, "--shards", "0:2"))
    assert encoded == [range(0, 8), range(8, 16), range(8, 16)]  # only the damaged shard again

    save_dvae(tmp_path / "other_dvae", seed=1)
    with pytest.raises(ValueError, match="holds shards made from other inputs"):  # a range never wipes others' work
        encode.main(args(inputs, tmp_path, "--shards", "2:4", models=tmp_path / "other_dvae"))
    encode.main(args(inputs, tmp_path, models=tmp_path / "other_dvae"))  # a full run starts afresh
    assert len(encoded) == 3 + N_SHARDS and not staging.exists()
    assert outputs(tmp_path) != outputs(inputs / "ref")
