"""Image grids for humans: contact sheets of images with their captions underneath."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def contact_sheet(
    images: Sequence[np.ndarray] | np.ndarray,
    captions: Sequence[str],
    columns: int = 8,
    cell: int = 128,
    text_lines: int = 4,
) -> Image.Image:
    """Lay uint8 (H, W, 3) images out on a grid, each upscaled to ``cell`` px with its caption below."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise ValueError("contact_sheet needs at least one image")
    font_size = max(9, cell // 11)
    font = ImageFont.load_default(size=font_size)
    line_height = font_size + 2
    chars_per_line = max(8, int(cell / (font_size * 0.55)))
    rows = -(-len(images) // columns)
    text_height = text_lines * line_height + 4
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_height)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_height)
        # Nearest-neighbour keeps the pixels the model sees; smoothing would hide aliasing.
        tile = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)
        sheet.paste(tile, (x, y))
        lines = textwrap.wrap(caption, chars_per_line)[:text_lines]
        for j, line in enumerate(lines):
            draw.text((x + 2, y + cell + 2 + j * line_height), line, fill=(0, 0, 0), font=font)
    return sheet
