"""Command line: ``python -m dalle generate --caption "a small red circle in the top left" --out samples/``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dalle.config import SampleConfig
from dalle.generate import generate, load_models, prime_tokens_from_image, write_outputs
from dalle.training import default_device

SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a 64-bit seed; keep it a non-negative int64
SHEET_LIMIT = 64  # images on sheet.png: a preview of the first captions, not the whole output


def read_captions(path: Path) -> tuple[list[str], int]:
    """Captions of a UTF-8 file (a leading BOM is dropped), one per line → (captions, blank lines skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8: byte {err.start} ({data[err.start]:#04x}) cannot be decoded") from None
    lines = text.splitlines()
    captions = [line.strip() for line in lines if line.strip()]
    if not captions:
        raise ValueError(f"{path} has no captions (empty or only blank lines)")
    return captions, len(lines) - len(captions)


def parser() -> argparse.ArgumentParser:
    defaults = SampleConfig()
    root = argparse.ArgumentParser(prog="python -m dalle", description="DALL-E workbench tools")
    commands = root.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="draw images for captions, rerank, keep the best")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", type=Path, help="UTF-8 file, one caption per line")
    source.add_argument("--caption", action="append", help="a caption (repeat for several)")
    gen.add_argument("--out", type=Path, required=True, help="folder for the PNGs, manifest.csv and sheet.png")
    gen.add_argument("--candidates", type=int, default=defaults.candidates, help="N images drawn per caption")
    gen.add_argument("--top", type=int, default=defaults.top, help="K best images kept per caption")
    gen.add_argument("--temperature", type=float, default=defaults.temperature)
    gen.add_argument("--top-k", type=int, default=defaults.top_k)
    gen.add_argument("--top-p", type=float, default=defaults.top_p)
    gen.add_argument("--guidance", type=float, default=defaults.guidance_scale, help="classifier-free guidance scale")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=defaults.batch_size)
    gen.add_argument("--models", type=Path, default=Path("models"), help="folder with dvae/, prior/, clip/")
    gen.add_argument("--prime-image", type=Path, help="image whose top rows every candidate keeps (image-to-image)")
    gen.add_argument("--prime-rows", type=int, default=0, help="token rows of --prime-image to keep")
    gen.add_argument("--force", action="store_true", help="guide even a prior trained without caption dropout")
    return root


def check_out_dir(out: Path) -> None:
    """``--out`` must be a directory this process can write, or creatable where it would go."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")


def check_image(path: Path) -> np.ndarray:
    """The RGB pixels of ``--prime-image``; anything that is not a readable image names the path."""
    if not path.is_file():
        raise FileNotFoundError(f"priming image not found: {path}")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"--prime-image {path} is not a readable image ({err})") from None


def check_guidance(models: Path, guidance: float, force: bool) -> None:
    """Guidance contrasts the caption with the prior's unconditional stream, which exists only if the prior was
    trained with caption dropout (``prior.null_text_prob > 0``)."""
    config_path = models / "prior" / "config.json"
    if guidance == 1 or force or not config_path.is_file():
        return
    dropout = json.loads(config_path.read_text()).get("null_text_prob", 0.0)
    if not dropout:
        raise ValueError(
            f"--guidance {guidance} needs a prior trained with prior.null_text_prob > 0, but {config_path} says "
            f"{dropout}: it never learnt the unconditional stream guidance contrasts with. Use --guidance 1, "
            "retrain with null_text_prob (e.g. 0.1), or pass --force"
        )


def main(argv: list[str] | None = None) -> int:
    root = parser()
    args = root.parse_args(argv)
    if args.top > args.candidates:
        root.error(f"--top {args.top} is more than --candidates {args.candidates}")
    try:
        # Validated like params.yaml's sample section: the same rules, the same messages.
        SampleConfig(
            candidates=args.candidates,
            top=args.top,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            guidance_scale=args.guidance,
            batch_size=args.batch_size,
        )
        if not 0 <= args.seed < SEED_LIMIT:
            raise ValueError(f"--seed {args.seed} is out of range: 0 <= seed < 2**63")
        check_out_dir(args.out)
        check_guidance(args.models, args.guidance, args.force)
        image = check_image(args.prime_image) if args.prime_image is not None else None
        if args.captions is not None:
            captions, blank = read_captions(args.captions)
            if blank:
                print(f"skipped {blank} blank line(s) in {args.captions}", file=sys.stderr)
        else:
            captions = [c.strip() for c in args.caption]
            if not all(captions):
                raise ValueError("--caption must not be blank")
        if args.prime_rows and image is None:
            raise ValueError("--prime-rows needs --prime-image")
        models = load_models(args.models, default_device())
        prime = prime_tokens_from_image(models, image, args.prime_rows) if image is not None else None
    except (FileNotFoundError, ValueError) as err:
        root.exit(2, f"error: {err}\n")
    results = generate(
        models,
        captions,
        args.candidates,
        args.temperature,
        args.top_k,
        args.top_p,
        args.guidance,
        args.seed,
        args.batch_size,
        prime_tokens=prime,
    )
    # Written caption by caption: a crash keeps every finished caption's images and manifest rows.
    manifest = write_outputs(args.out, results, args.top, sheet_limit=SHEET_LIMIT)
    print(f"{len(captions)} caption(s) × {args.top} image(s) → {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
