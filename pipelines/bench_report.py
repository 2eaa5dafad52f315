"""The benchmark's headline ratios and its Markdown report (``reports/bench/results.md``)."""

from __future__ import annotations

# Issue targets the report checks (ratios measured in one run, so they hold across machines of one kind).
CACHE_TARGET, FLEX_ROW_TARGET, MFU_TARGET = 20.0, 3.0, 0.40


def mfu_reference(results: dict) -> tuple[str, float]:
    """The peak MFU is measured against: bf16 GEMM where it was measured (CUDA trains under bf16 autocast)."""
    peak = results["peak"]
    name = "bf16" if "bf16" in peak else "fp32"
    return name, peak[name]["flops_per_s"]


def headline(results: dict) -> dict[str, float]:
    """The ratios that summarise a run; adds ``mfu`` to each measured prior-training row."""
    reference_name, reference = mfu_reference(results)
    out = {f"peak_{reference_name}_tflops": reference / 1e12}
    for name, row in results.get("prior_training", {}).items():
        if "model_flops_per_s" in row:
            row["mfu"] = row["model_flops_per_s"] / reference
            out[f"mfu_{name}"] = row["mfu"]
    for name, row in results.get("sampling", {}).items():
        out[f"cache_speedup_{name}"] = row["cache_speedup"]
        out[f"guidance_cost_{name}"] = row["guidance_cost"]
    for name, row in results.get("peer", {}).items():
        for key, value in peer_ratios(results, row).items():
            out[f"peer_{key}_{name}"] = value
    for row in results.get("attention", {}).values():
        for phase in ("forward", "train"):
            if f"flex_speedup_{phase}" in row:
                out[f"flex_speedup_{phase}_{row['kind']}_{row['image_tokens']}"] = row[f"flex_speedup_{phase}"]
    return out


def peer_ratios(results: dict, row: dict) -> dict[str, float]:
    """Ours over the peer's, at the same grid: training tokens/s (full attention, dense, as the peer is built)
    and cached sampling images/s."""
    if "tokens_per_s" not in row:
        return {}
    out = {}
    ours = results.get("prior_training", {}).get(f"grid{row['grid']}_full_dense")
    if ours is not None:
        out["train_speedup"] = ours["tokens_per_s"] / row["tokens_per_s"]
    sampled = results.get("sampling", {}).get(f"grid{row['grid']}")
    if sampled is not None:
        out["sample_speedup"] = sampled["cached_images_per_s"] / row["cached_images_per_s"]
    return out


def _table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return "–" if value is None else _number(value) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _targets(results: dict) -> list[str]:
    lines = []
    big = max((row["grid"] for row in results.get("sampling", {}).values()), default=None)
    for row in results.get("sampling", {}).values():
        if row["grid"] == big:
            met = "met" if row["cache_speedup"] >= CACHE_TARGET else "NOT met"
            lines.append(
                f"- cached sampling ≥ {CACHE_TARGET:g}× uncached at {big}×{big}: {row['cache_speedup']:.1f}× ({met})"
            )
    flex = [
        (row["image_tokens"], phase, row[f"flex_speedup_{phase}"])
        for row in results.get("attention", {}).values()
        for phase in ("forward", "train")
        if row["kind"] == "row" and row["image_tokens"] >= 1024 and f"flex_speedup_{phase}" in row
    ]
    for tokens, phase, speedup in flex:
        met = "met" if speedup >= FLEX_ROW_TARGET else "NOT met"
        lines.append(
            f"- flex ≥ {FLEX_ROW_TARGET:g}× dense, row mask, {tokens} image tokens, {phase}: {speedup:.2f}× ({met})"
        )
    if not flex:
        lines.append(f"- flex ≥ {FLEX_ROW_TARGET:g}× dense for the row mask: not measured here (see errors)")
    reference_name, _ = mfu_reference(results)
    for name, row in results.get("prior_training", {}).items():
        if row["grid"] == big and "mfu" in row:
            met = "met" if row["mfu"] >= MFU_TARGET else "NOT met"
            lines.append(
                f"- MFU ≥ {MFU_TARGET:.0%} of the {reference_name} GEMM peak, {name}: {row['mfu']:.1%} ({met})"
            )
    return lines


def markdown(results: dict) -> str:
    m, settings = results["machine"], results["settings"]
    prior, bench = settings["prior"], settings["bench"]
    device = m.get("cuda_device", m["cpu"])
    reference_name, reference = mfu_reference(results)
    out = [
        f"# Benchmark on {device}",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads, torch "
        f"{m['torch']}, device `{m['device']}`"
        + (f" ({m['cuda_device']}, CUDA {m['cuda']})" if "cuda_device" in m else "")
        + ".",
        f"Prior: {prior['n_layers']} layers, d_model {prior['d_model']}, {prior['n_heads']} heads, text_len "
        f"{settings['tokenizer']['text_len']}, vocabularies {settings['tokenizer']['vocab_size']} text / "
        f"{settings['dvae']['codebook_size']} image. Each time is the median of {bench['repeats']} runs after "
        f"{bench['warmup']} warm-up runs (min–max in brackets); weights are random.",
        "",
        "## Targets",
        *_targets(results),
        "",
        "## Peak: dense GEMM",
        _table(
            ["dtype", "n", "TFLOP/s", "ms (min–max)"],
            [[name, row["n"], row["flops_per_s"] / 1e12, _spread(row)] for name, row in results["peak"].items()],
        ),
        "",
        f"## Prior training (MFU: model FLOPs / {reference_name} GEMM peak {reference / 1e12:.3g} TFLOP/s)",
        _table(
            ["grid", "schedule", "kernel", "batch", "tokens/s", "model TFLOP/s", "MFU", "step ms (min–max)", "peak MB"],
            [
                [
                    f"{row['grid']}×{row['grid']}",
                    row["schedule"],
                    row["attn_impl"],
                    row["batch_size"],
                    row.get("tokens_per_s"),
                    row["model_flops_per_s"] / 1e12 if "model_flops_per_s" in row else None,
                    f"{row['mfu']:.1%}" if "mfu" in row else None,
                    _spread(row) if "median_s" in row else "not measurable (below)",
                    row.get("peak_memory_mb"),
                ]
                for row in results.get("prior_training", {}).values()
            ],
        ),
    ]
    attention = list(results.get("attention", {}).values())
    if attention:
        head = prior["d_model"] // prior["n_heads"]
        out += [
            "",
            f"## One attention layer ({attention[0]['text_len']} text + N image tokens, batch 1, {prior['n_heads']} "
            f"heads × {head}; ms; speedup = dense / flex)",
            _table(
                [
                    "image tokens",
                    "mask",
                    "block density",
                    "dense fwd",
                    "flex fwd",
                    "speedup fwd",
                    "dense fwd+bwd",
                    "flex fwd+bwd",
                    "speedup fwd+bwd",
                ],
                [
                    [
                        row["image_tokens"],
                        row["kind"],
                        row["block_density"],
                        row.get("dense_forward_ms"),
                        row.get("flex_forward_ms"),
                        row.get("flex_speedup_forward"),
                        row.get("dense_train_ms"),
                        row.get("flex_train_ms"),
                        row.get("flex_speedup_train"),
                    ]
                    for row in attention
                ],
            ),
        ]
    sampling = list(results.get("sampling", {}).values())
    if sampling:
        out += [
            "",
            f"## Sampling ({sampling[0]['batch_size']} captions at once; guidance scale {bench['guidance_scale']:g}; "
            f"uncached: the prefix recomputed at {bench['uncached_positions']} evenly spaced positions, × grid² / "
            "positions)",
            _table(
                [
                    "grid",
                    "cached img/s",
                    "uncached img/s",
                    "cache speedup",
                    "guided img/s",
                    "guidance cost",
                    "cached peak MB",
                    "uncached peak MB",
                ],
                [
                    [
                        f"{row['grid']}×{row['grid']}",
                        row["cached_images_per_s"],
                        row["uncached_images_per_s"],
                        row["cache_speedup"],
                        row["guided_images_per_s"],
                        row["guidance_cost"],
                        row["cached_peak_memory_mb"],
                        row["uncached_peak_memory_mb"],
                    ]
                    for row in sampling
                ],
            ),
        ]
    if "dvae" in results:
        row = results["dvae"]["default"]
        out += [
            "",
            "## dVAE",
            _table(
                ["batch", "image", "encode img/s", "decode img/s", "train img/s", "train step ms", "train peak MB"],
                [
                    [
                        row["batch_size"],
                        row["image_size"],
                        row["encode_images_per_s"],
                        row["decode_images_per_s"],
                        row["train_images_per_s"],
                        row["train_s"] * 1e3,
                        row["train_peak_memory_mb"],
                    ]
                ],
            ),
        ]
    errors: dict[str, list[str]] = {}  # reason → the measurements it stopped
    for section in ("prior_training", "attention"):
        for name, row in results.get(section, {}).items():
            for key, reason in row.items():
                if key.endswith("error"):
                    what = name if key == "error" else f"{name} {key.removesuffix('_error')}"
                    errors.setdefault(reason, []).append(f"{section} {what}")
    if errors:
        out += ["", "## Not measurable here"]
        out += [f"- {', '.join(where)}: {reason}" for reason, where in errors.items()]
    peers = list(results.get("peer", {}).values())
    measured = [row for row in peers if "tokens_per_s" in row]
    if peers:
        out += ["", f"## Peer: {peers[0]['peer']} at the same sizes (full attention; ours ÷ theirs)"]
        out += [f"- {row['summary']}" for row in peers if "summary" in row]
    if measured:
        out.append(
            _table(
                [
                    "grid",
                    "their train tokens/s",
                    "ours / theirs",
                    "their cached img/s",
                    "ours / theirs",
                    "their params",
                ],
                [
                    [
                        f"{row['grid']}×{row['grid']}",
                        row["tokens_per_s"],
                        peer_ratios(results, row).get("train_speedup"),
                        row["cached_images_per_s"],
                        peer_ratios(results, row).get("sample_speedup"),
                        row["trainable_params"],
                    ]
                    for row in measured
                ],
            )
        )
    return "\n".join(out) + "\n"


def _number(value: float) -> str:
    """Three significant digits, without exponents for the magnitudes a benchmark shows."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.2e}"


def _spread(row: dict) -> str:
    ms = [_number(row[key] * 1e3) for key in ("median_s", "min_s", "max_s")]
    return f"{ms[0]} ({ms[1]}–{ms[2]})"
