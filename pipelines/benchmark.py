"""Stage ``benchmark``: what a step costs on this machine, at the model sizes in params.yaml (random weights).

    python -m pipelines.benchmark [--params params.yaml] [--out reports/bench] [--peer dalle-pytorch]

Measures (each the median of ``bench.repeats`` runs after ``bench.warmup``, with min, max and peak memory): the
dense GEMM peak (fp32; bf16 too on CUDA), prior training tokens/s and model FLOP utilisation at the data's grid
and at ``bench.big_grid`` for each schedule and attention kernel, one attention layer per mask kind (dense-masked
vs flex, forward and forward+backward), sampling images/s with the key/value cache, without it and with
guidance, and the dVAE's encode / decode / training step. Writes ``reports/bench/results.json`` (everything),
``metrics.json`` (the headline ratios) and ``results.md``, and logs them to MLflow with the machine description.
A killed run resumes: finished measurements are kept in ``partial.json`` and reused when the settings and the
machine are the same.

Not part of the default ``dvc repro`` (it would break the pipeline's time budget): run it with
``dvc repro pipelines/bench/dvc.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from dalle.bench import (
    attention_call,
    dvae_runs,
    first_line,
    gemm,
    grid_of,
    machine,
    measure,
    prior_training_step,
    sampling_runs,
)
from dalle.config import Params, PriorConfig
from dalle.flops import prior_flops
from dalle.masks import block_density, mask_density
from dalle.peer import PEERS, peer_measurements
from dalle.prior import Prior, PriorGeometry
from dalle.training import default_device
from pipelines.bench_report import headline, markdown
from pipelines.params import load_params
from pipelines.reports import write_json
from pipelines.tracking import flat_metrics, log_artifact, log_dict, log_metrics, stage_run

REPORT_DIR = Path("reports/bench")


@dataclasses.dataclass(frozen=True)
class Task:
    key: str  # "section/name"
    run: Callable[[], dict]  # one measurement → one row of results


def geometry(params: Params, grid: int) -> PriorGeometry:
    tok, image_vocab = params.tokenizer, params.dvae.codebook_size
    return PriorGeometry(text_vocab=tok.vocab_size, text_len=tok.text_len, image_vocab=image_vocab, grid=grid)


def data_grid(params: Params) -> int:
    return params.data.image_size // params.dvae.downsample


class Workloads:
    """The measurements of one benchmark run; each method returns one row (plain numbers and strings)."""

    def __init__(self, params: Params, device: torch.device):
        self.params, self.bench, self.device = params, params.bench, device
        self.timed = {"device": device, "warmup": self.bench.warmup, "repeats": self.bench.repeats}
        self.batch = {data_grid(params): self.bench.batch_size, self.bench.big_grid: self.bench.big_batch_size}

    def tasks(self, peer: str | None = None) -> list[Task]:
        bench, grids = self.bench, sorted(self.batch)
        out = [Task("peak/fp32", partial(self.peak, torch.float32))]
        if self.device.type == "cuda":
            out.append(Task("peak/bf16", partial(self.peak, torch.bfloat16)))
        for grid in grids:
            for schedule in bench.schedules:
                for impl in bench.attn_impls:
                    out.append(
                        Task(
                            f"prior_training/grid{grid}_{schedule}_{impl}", partial(self.training, grid, schedule, impl)
                        )
                    )
        if bench.paper_batch_size:
            for impl in bench.attn_impls:
                out.append(Task(f"prior_training/paper_geometry_{impl}", partial(self.paper_training, impl)))
        for tokens in bench.attention_image_tokens:
            for kind in ("full", "row", "column", "conv"):
                out.append(Task(f"attention/{tokens}_{kind}", partial(self.attention, tokens, kind)))
        for grid in grids:
            out.append(Task(f"sampling/grid{grid}", partial(self.sampling, grid)))
        out.append(Task("dvae/default", self.dvae))
        if peer is not None:
            for grid in grids:
                out.append(Task(f"peer/grid{grid}", partial(self.peer, peer, grid)))
        return out

    def peak(self, dtype: torch.dtype) -> dict:
        run, flops = gemm(self.bench.gemm_size, dtype, self.device)
        measured = measure(run, **self.timed)
        return {"n": self.bench.gemm_size, "flops_per_s": flops / measured.median_s, **measured.as_dict()}

    def paper_training(self, impl: str) -> dict:
        """A prior training step at the paper's geometry (Appendix B: text 256, 32×32 image tokens, vocabularies
        16384 and 8192, 11×11 conv window, paper schedule) at ``paper_d_model`` / ``paper_layers``."""
        bench = self.bench
        heads = 8 if bench.paper_d_model % 8 == 0 else 1
        cfg = dataclasses.replace(
            self.params.prior, n_layers=bench.paper_layers, d_model=bench.paper_d_model, n_heads=heads, conv_kernel=11
        )
        g = PriorGeometry(text_vocab=16384, text_len=256, image_vocab=8192, grid=32)
        row = self.training(32, "paper", impl, cfg, g, bench.paper_batch_size)
        return {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "text_len": g.text_len, **row}

    def training(
        self,
        grid: int,
        schedule: str,
        impl: str,
        cfg: PriorConfig | None = None,
        g: PriorGeometry | None = None,
        size: int | None = None,
    ) -> dict:
        """A prior training step; the params' prior and geometry at ``grid`` unless others are given."""
        cfg = dataclasses.replace(cfg or self.params.prior, schedule=schedule, attn_impl=impl)
        g, size = g or geometry(self.params, grid), size or self.batch[grid]
        row = {
            "grid": grid,
            "schedule": schedule,
            "attn_impl": impl,
            "batch_size": size,
            "tokens_per_step": size * g.seq_len,
            "model_flops_per_step": size * prior_flops(cfg, g).training,
        }
        try:
            measured = measure(prior_training_step(cfg, g, size, self.device), **self.timed)
        except Exception as err:  # flex may not run here (no CPU backward in torch 2.13, no compiler): say why
            if impl != "flex":
                raise
            return {**row, "error": first_line(err)}
        return {
            **row,
            "tokens_per_s": row["tokens_per_step"] / measured.median_s,
            "model_flops_per_s": row["model_flops_per_step"] / measured.median_s,
            **measured.as_dict(),
        }

    def attention(self, image_tokens: int, kind: str) -> dict:
        prior, text_len, grid = self.params.prior, self.bench.attention_text_len, grid_of(image_tokens)
        kernel = prior.conv_kernel
        row: dict = {
            "image_tokens": image_tokens,
            "text_len": text_len,
            "kind": kind,
            "block_density": block_density(kind, text_len, grid, kernel),
            "mask_density": mask_density(kind, text_len, grid, kernel),
        }
        call = partial(attention_call, kind, text_len, grid, prior.n_heads, prior.d_model // prior.n_heads)
        for impl in self.bench.attn_impls:
            for backward, name in ((False, "forward"), (True, "train")):
                try:
                    measured = measure(call(impl, backward, self.device, kernel), **self.timed)
                except Exception as err:  # see training(): flex may not run here
                    if impl != "flex":
                        raise
                    row[f"{impl}_{name}_error"] = first_line(err)
                    continue
                row[f"{impl}_{name}_ms"] = measured.median_s * 1e3
                row[f"{impl}_{name}_min_ms"] = measured.min_s * 1e3
                row[f"{impl}_{name}_max_ms"] = measured.max_s * 1e3
                row[f"{impl}_{name}_peak_memory_mb"] = measured.peak_memory_mb
        for name in ("forward", "train"):
            for impl in ("flex", "blocked"):
                if f"dense_{name}_ms" in row and f"{impl}_{name}_ms" in row:
                    row[f"{impl}_speedup_{name}"] = row[f"dense_{name}_ms"] / row[f"{impl}_{name}_ms"]
        return row

    def sampling(self, grid: int) -> dict:
        bench = self.bench
        torch.manual_seed(0)
        prior = Prior(self.params.prior, geometry(self.params, grid)).to(self.device).eval()
        runs = sampling_runs(
            prior, bench.sample_batch_size, bench.guidance_scale, bench.uncached_positions, self.device
        )
        cached, guided, uncached = (measure(run, **self.timed) for run in (runs.cached, runs.guided, runs.uncached))
        uncached_s = uncached.median_s * runs.uncached_scale
        size = bench.sample_batch_size
        return {
            "grid": grid,
            "batch_size": size,
            "cached_images_per_s": size / cached.median_s,
            "uncached_images_per_s": size / uncached_s,
            "guided_images_per_s": size / guided.median_s,
            "cache_speedup": uncached_s / cached.median_s,
            "guidance_cost": guided.median_s / cached.median_s,
            "cached_s": cached.median_s,
            "uncached_s_estimated": uncached_s,
            "uncached_positions_timed": bench.uncached_positions,
            "cached_peak_memory_mb": cached.peak_memory_mb,
            "uncached_peak_memory_mb": uncached.peak_memory_mb,
            "guided_peak_memory_mb": guided.peak_memory_mb,
        }

    def dvae(self) -> dict:
        size, image_size = self.bench.dvae_batch_size, self.params.data.image_size
        runs = dvae_runs(self.params.dvae, image_size, size, self.device)
        row: dict = {"batch_size": size, "image_size": image_size}
        for name in ("encode", "decode", "train"):
            measured = measure(runs[name], **self.timed)
            row[f"{name}_images_per_s"] = size / measured.median_s
            row[f"{name}_s"] = measured.median_s
            row[f"{name}_peak_memory_mb"] = measured.peak_memory_mb
        return row

    def peer(self, name: str, grid: int) -> dict:
        return peer_measurements(
            name,
            self.params.prior,
            geometry(self.params, grid),
            self.batch[grid],
            self.bench.sample_batch_size,
            **self.timed,
        )


def run_benchmark(params: Params, device: torch.device, partial_path: Path, peer: str | None = None) -> dict:
    """Every measurement, resuming from ``partial_path`` when it was made with the same settings and machine."""
    fingerprint = {
        "settings": {key: dataclasses.asdict(getattr(params, key)) for key in ("bench", "prior", "dvae", "tokenizer")},
        "image_size": params.data.image_size,
        "machine": machine(device),
        "peer": peer,
    }
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples → lists, as they come back from the file
    rows: dict[str, dict] = {}
    if partial_path.is_file():
        saved = json.loads(partial_path.read_text())
        if saved.get("fingerprint") == fingerprint:
            rows = saved["rows"]
        else:
            print(f"{partial_path}: made with other settings or on another machine; measuring afresh")
    todo = [task for task in Workloads(params, device).tasks(peer) if task.key not in rows]
    for task in (progress := tqdm(todo, desc="benchmark", unit="measurement")):
        progress.set_postfix_str(task.key)
        rows[task.key] = task.run()
        _write_atomic(partial_path, {"fingerprint": fingerprint, "rows": rows})
    results: dict = {"machine": fingerprint["machine"], "settings": fingerprint["settings"]}
    for key, row in rows.items():
        section, name = key.split("/", 1)
        results.setdefault(section, {})[name] = row
    results["headline"] = headline(results)
    return results


def _write_atomic(path: Path, data: dict) -> None:
    """Replace ``path`` in one step, so a kill never leaves half a file."""
    temporary = path.with_suffix(".tmp")
    write_json(temporary, data)
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=REPORT_DIR)
    parser.add_argument("--peer", choices=PEERS, help="also time this other implementation, if it is installed")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    device = default_device()
    description = machine(device)
    tags = {f"machine.{key}": str(value) for key, value in description.items()}
    with stage_run("benchmark", params, tags=tags, reports=args.out):
        results = run_benchmark(params, device, args.out / "partial.json", args.peer)
        write_json(args.out / "results.json", results)
        write_json(args.out / "metrics.json", results["headline"])  # the ratios, for `dvc metrics show`
        (args.out / "results.md").write_text(markdown(results))
        (args.out / "partial.json").unlink(missing_ok=True)
        log_metrics(flat_metrics({k: v for k, v in results.items() if k not in ("machine", "settings")}))
        log_dict(results["machine"], "machine.json")
        log_artifact(str(args.out / "results.json"))
        log_artifact(str(args.out / "results.md"))
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
