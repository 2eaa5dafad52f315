"""The benchmark: FLOP counts against a hand count and torch's own counter, the cache-free sampler baseline against
the cached one, timing and memory helpers, and the stage on a tiny config (every key, resume, MLflow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from test_dvae_stages import tiny_params
from torch.utils.flop_counter import FlopCounterMode

from dalle import peer
from dalle.bench import PeakMemory, measure, prefix_logits, random_stream
from dalle.config import PriorConfig
from dalle.flops import allowed_pairs, prior_flops
from dalle.peer import missing as peer_missing
from dalle.peer import peer_measurements
from dalle.prior import Prior, PriorGeometry
from pipelines import benchmark

CPU = torch.device("cpu")
ONE_LAYER = PriorGeometry(text_vocab=10, text_len=3, image_vocab=12, grid=2)


def test_flops_of_a_one_layer_model_match_a_hand_count():
    cfg = PriorConfig(n_layers=1, n_heads=2, d_model=8, schedule="full")
    # T = 3 text + 4 image = 7 positions, d = 8.
    # Weight matrices: (3d² + d² + 4d² + 4d²) = 12·64 multiply-adds per position → 2·12·64·7 = 10752 FLOPs.
    # Heads: text head at 2 positions (10 outputs), image head at 4 positions (12 outputs): 2·8·(20 + 48) = 1088.
    # Full causal mask: 1 + 2 + ... + 7 = 28 pairs, QKᵀ and AV 2·8 FLOPs each: 4·8·28 = 896.
    counted = prior_flops(cfg, ONE_LAYER)
    assert (counted.layers, counted.heads, counted.attention) == (10752, 1088, 896)
    assert counted.training == 3 * (10752 + 1088 + 896)


def test_row_mask_pairs_by_hand():
    # Text queries see 1 + 2 + 3 = 6 keys. Image query i sees 3 text keys and image keys max(0, i - 2)..i:
    # 1, 2, 3, 3 → 12 + 9 = 21. Total 27: only image token 3 loses image token 0 (the full mask has 28).
    assert allowed_pairs("row", 3, 2) == 27
    assert allowed_pairs("full", 3, 2) == 28
    cfg = PriorConfig(n_layers=1, n_heads=2, d_model=8, schedule="row")
    assert prior_flops(cfg, ONE_LAYER).attention == 4 * 8 * 27


@pytest.mark.parametrize("schedule", ["full", "paper"])
def test_matrix_flops_match_torch_flop_counter(schedule):
    """torch's FlopCounterMode counts the matrix products of forward + backward: they must equal 3× our
    forward count without attention (the counter does not see inside the CPU attention kernel)."""
    cfg = PriorConfig(n_layers=3, n_heads=2, d_model=16, schedule=schedule)
    geometry = PriorGeometry(text_vocab=20, text_len=5, image_vocab=24, grid=3)
    prior, batch_size = Prior(cfg, geometry), 4
    batch = random_stream(geometry, batch_size, CPU)
    with FlopCounterMode(display=False) as counter:
        _, loss = prior(*batch)
        loss.backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    counted = prior_flops(cfg, geometry)
    assert counts["aten.mm"] + counts["aten.addmm"] == batch_size * 3 * (counted.layers + counted.heads)


def test_uncached_baseline_computes_the_same_logits_as_the_cache():
    """The cache-free sampler the benchmark times must be a correct sampler: at every position its logits are
    the cached sampler's."""
    torch.manual_seed(0)
    geometry = PriorGeometry(text_vocab=20, text_len=5, image_vocab=24, grid=3)
    prior = Prior(PriorConfig(n_layers=2, n_heads=2, d_model=16, schedule="paper", conv_kernel=3), geometry).eval()
    text_ids, text_lengths, image_tokens = random_stream(geometry, 3, CPU)
    with torch.no_grad():
        logits, cache = prior.prefill(text_ids, text_lengths)
        for index in range(geometry.grid**2):
            assert torch.allclose(prefix_logits(prior, text_ids, text_lengths, image_tokens, index), logits, atol=1e-5)
            if index < geometry.grid**2 - 1:
                logits, _ = prior.step(cache, image_tokens[:, index])


def test_measure_runs_warmup_then_repeats_and_orders_its_statistics():
    calls = []
    measured = measure(lambda: calls.append(1), CPU, warmup=2, repeats=5)
    assert len(calls) == 7 and measured.runs == 5
    assert 0 <= measured.min_s <= measured.median_s <= measured.max_s
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure(lambda: None, CPU, warmup=0, repeats=0)


def test_peak_memory_sees_an_allocation_inside_the_block():
    with PeakMemory(CPU) as memory:
        block = torch.ones(300 * 2**20 // 4)  # 300 MB, touched
        del block
    if memory.kind == "rss_high_water":
        assert memory.peak_mb >= 300
        with PeakMemory(CPU) as after:  # the high-water mark is reset between measurements
            pass
        assert after.peak_mb < memory.peak_mb - 200
    else:
        assert memory.peak_mb > 0


def bench_params(tmp_path: Path, **bench) -> Path:
    path = tiny_params(tmp_path, "test-bench")
    raw = yaml.safe_load(path.read_text())
    raw["prior"].update(n_layers=2, n_heads=2, d_model=16)
    raw["tokenizer"].update(vocab_size=300, text_len=8)
    raw["bench"].update(
        warmup=1,
        repeats=2,
        gemm_size=64,
        batch_size=4,
        big_grid=8,
        big_batch_size=2,
        attention_image_tokens=[16],
        attention_text_len=8,
        sample_batch_size=2,
        uncached_positions=3,
        dvae_batch_size=4,
        paper_batch_size=1,
        paper_d_model=16,
        paper_layers=2,
        **bench,
    )
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mlflow_store) -> Path:
    root = tmp_path_factory.mktemp("bench")
    params = bench_params(root)
    benchmark.main(["--params", str(params), "--out", str(root / "out"), "--peer", "dalle-pytorch"])
    return root


def test_benchmark_writes_every_measurement(tiny_run):
    results = json.loads((tiny_run / "out/results.json").read_text())
    assert set(results) == {
        "machine",
        "settings",
        "peak",
        "prior_training",
        "attention",
        "sampling",
        "dvae",
        "peer",
        "headline",
    }
    assert results["machine"]["torch"] == torch.__version__ and results["machine"]["cpu"]
    assert results["peak"]["fp32"]["flops_per_s"] > 0
    # data grid 16 / 4 = 4 and the big grid 8; two schedules, three kernels
    kernels = ("dense", "flex", "blocked")
    assert set(results["prior_training"]) == {
        f"grid{g}_{s}_{k}" for g in (4, 8) for s in ("full", "paper") for k in kernels
    } | {f"paper_geometry_{k}" for k in kernels}
    paper = results["prior_training"]["paper_geometry_blocked"]
    assert paper["tokens_per_step"] == 256 + 1024 and paper["d_model"] == 16 and paper["peak_memory_mb"] > 0
    assert results["prior_training"]["grid8_paper_blocked"]["tokens_per_s"] > 0
    dense = results["prior_training"]["grid8_paper_dense"]
    assert dense["tokens_per_step"] == 2 * (8 + 64)
    assert dense["tokens_per_s"] == pytest.approx(dense["tokens_per_step"] / dense["median_s"])
    assert 0 < dense["mfu"] == pytest.approx(dense["model_flops_per_s"] / results["peak"]["fp32"]["flops_per_s"])
    assert dense["peak_memory_mb"] > 0
    flex = results["prior_training"]["grid8_paper_flex"]
    assert ("mfu" in flex) != ("error" in flex)  # measured, or a reason why not (torch has no CPU flex backward)
    assert set(results["attention"]) == {f"16_{kind}" for kind in ("full", "row", "column", "conv")}
    row = results["attention"]["16_row"]
    assert 0 < row["block_density"] <= 1 and row["dense_forward_ms"] > 0 and row["dense_train_ms"] > 0
    assert row["flex_speedup_forward"] == pytest.approx(row["dense_forward_ms"] / row["flex_forward_ms"])
    assert row["blocked_speedup_train"] == pytest.approx(row["dense_train_ms"] / row["blocked_train_ms"])
    assert set(results["sampling"]) == {"grid4", "grid8"}
    sampled = results["sampling"]["grid8"]
    assert sampled["cache_speedup"] == pytest.approx(sampled["uncached_s_estimated"] / sampled["cached_s"])
    assert sampled["cached_images_per_s"] > 0 and sampled["guidance_cost"] > 0
    assert {"encode_images_per_s", "decode_images_per_s", "train_images_per_s"} <= set(results["dvae"]["default"])
    assert results["headline"]["cache_speedup_grid8"] == sampled["cache_speedup"]
    assert results["headline"]["mfu_grid8_paper_dense"] == dense["mfu"]
    assert json.loads((tiny_run / "out/metrics.json").read_text()) == results["headline"]
    assert not (tiny_run / "out/partial.json").exists()
    for grid in (4, 8):  # the peer is optional: measured where installed, else one line saying so
        peer = results["peer"][f"grid{grid}"]
        assert peer["tokens_per_s"] > 0 if peer_missing("dalle-pytorch") is None else "not installed" in peer["summary"]


def test_benchmark_report_and_mlflow_run(tiny_run, mlflow_store):
    report = (tiny_run / "out/results.md").read_text()
    for heading in ("## Targets", "## Peak", "## Prior training", "## One attention layer", "## Sampling", "## dVAE"):
        assert heading in report
    assert "cached sampling ≥ 20× uncached at 8×8" in report
    assert "## Peer: dalle-pytorch" in report
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("test-bench")
    [run] = client.search_runs([experiment.experiment_id], "tags.stage = 'benchmark'")
    assert run.data.tags["machine.torch"] == torch.__version__
    assert run.data.metrics["headline.cache_speedup_grid8"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "results.md", "machine.json"} <= artifacts


def test_benchmark_resumes_finished_measurements_only_with_the_same_settings(tmp_path, mlflow_store):
    params = bench_params(tmp_path, attn_impls=["dense"], schedules=["full"])
    out = tmp_path / "out"
    benchmark.main(["--params", str(params), "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    rows = {
        f"{section}/{name}": row
        for section in ("peak", "prior_training", "attention", "sampling", "dvae")
        for name, row in results[section].items()
    }
    fingerprint = {"settings": results["settings"], "image_size": 16, "machine": results["machine"], "peer": None}
    rows["peak/fp32"] = {**rows["peak/fp32"], "flops_per_s": 12345.0}  # a measurement the resumed run must keep
    out.joinpath("partial.json").write_text(json.dumps({"fingerprint": fingerprint, "rows": rows}))
    benchmark.main(["--params", str(params), "--out", str(out)])
    assert json.loads((out / "results.json").read_text())["peak"]["fp32"]["flops_per_s"] == 12345.0

    out.joinpath("partial.json").write_text(
        json.dumps({"fingerprint": {**fingerprint, "image_size": 32}, "rows": rows})
    )
    benchmark.main(["--params", str(params), "--out", str(out)])
    assert json.loads((out / "results.json").read_text())["peak"]["fp32"]["flops_per_s"] != 12345.0


def test_a_peer_that_is_not_installed_is_skipped_with_one_line(monkeypatch):
    monkeypatch.setitem(peer.MODULES, "dalle-pytorch", "no_such_module_dalle_peer")
    row = peer_measurements("dalle-pytorch", PriorConfig(), ONE_LAYER, 2, 2, CPU, warmup=0, repeats=1)
    assert row == {
        "peer": "dalle-pytorch",
        "grid": 2,
        "summary": "dalle-pytorch is not installed (no_such_module_dalle_peer is not importable); "
        "peer comparison skipped",
    }
    with pytest.raises(ValueError, match="unknown peer 'minDALL-E'"):
        peer_measurements("minDALL-E", PriorConfig(), ONE_LAYER, 2, 2, CPU, warmup=0, repeats=1)


def test_peer_measured_at_our_sizes_when_installed():
    pytest.importorskip("dalle_pytorch")
    cfg = PriorConfig(n_layers=2, n_heads=2, d_model=32)
    geometry = PriorGeometry(text_vocab=300, text_len=8, image_vocab=16, grid=4)
    row = peer_measurements("dalle-pytorch", cfg, geometry, 4, 2, CPU, warmup=1, repeats=1)
    assert row["tokens_per_s"] > 0 and row["cached_images_per_s"] > 0 and row["train_batch_size"] == 4


def test_compiled_flex_may_hold_a_graph_per_mask_and_batch_shape():
    """A paper-schedule prior compiles flex for 3 kinds × training and validation batch shapes: more than
    dynamo's default 8 graphs, past which it would silently run the slow eager kernel."""
    from dalle.prior import FLEX_RECOMPILE_LIMIT, compiled_flex_attention

    compiled_flex_attention()
    assert torch._dynamo.config.recompile_limit >= FLEX_RECOMPILE_LIMIT >= 3 * 3
