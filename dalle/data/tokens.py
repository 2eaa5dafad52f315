"""The token dataset the prior trains on: per split, dVAE image tokens and the BPE ids of every caption, in one token
shard per prepared shard (the layout of mosaicml/streaming: shards plus an ``index.json`` written last).

A split directory holds::

    shard-00000/image_tokens.npy     (n, grid, grid) uint16 (int32 when the codebook exceeds 65536)
    shard-00000/text_ids.npy         (m, text_len) int32, zero past each caption's end; m = captions of its n images
    shard-00000/text_lengths.npy     (m,) int32, tokens kept per caption (pads are positions, not ids: dalle/text.py)
    shard-00000/caption_offsets.npy  (n + 1,) int64: captions of the shard's image i are rows offsets[i]:offsets[i+1]
    ...
    index.json                       format, grid, text_len, totals, and per shard its name, the prepared shard it
                                     encodes, images, captions, truncated captions and the sha256 of each file

Token shard k holds the images of prepared shard k, in order, so image row r of the split is the same image in
``data/prepared`` and here. :func:`load_tokens` presents a split as the four arrays of one concatenated token set
(``image_tokens[r]``, ``text_ids[caption_offsets[r]:caption_offsets[r + 1]]``): each array is a
:class:`ShardedRows` view that memory-maps shard files on first use and copies only the rows asked for, and
``caption_offsets`` is global and in memory. A split whose token files fit in ``cache_bytes`` is read into
memory instead (plain arrays: small data stays as fast as one memory-mapped array). Batches stay a pure function of
seed and step.
"""

from __future__ import annotations

import json
import resource
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dalle.data.store import Split
from dalle.dvae import DiscreteVAE
from dalle.pixels import to_float_images
from dalle.text import TextTokenizer
from dalle.training import mixed_precision

FORMAT = "dalle-token-shards/1"
INDEX_FILE = "index.json"
ARRAYS = ("image_tokens", "text_ids", "text_lengths", "caption_offsets")
DEFAULT_CACHE_BYTES = 1024 * 2**20  # a split up to this size is read into memory (~300k images at 5 x 64 ids)
# Memory maps kept open per array (each holds a file descriptor): a share of the process's limit.
OPEN_SHARDS = int(np.clip(resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 16, 64, 4096))


class ShardedRows(np.lib.mixins.NDArrayOperatorsMixin):
    """Read-only ``(N, ...)`` array-like: the row-wise concatenation of one ``.npy`` array per shard.

    Supports ``len``, ``shape``, ``dtype``, integer / slice / index-array indexing (any order, repeats), and
    ``np.asarray``, operators and ufuncs (these read every row). Shards are memory-mapped when first read (at most
    ``OPEN_SHARDS`` at a time), and only the rows asked for are copied.
    """

    def __init__(self, paths: list[Path], lengths: list[int], row_shape: tuple[int, ...], dtype: np.dtype):
        self.paths = paths
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)  # (shards + 1,)
        self.shape = (int(self.starts[-1]), *row_shape)
        self.dtype = np.dtype(dtype)
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self.shards_read: set[int] = set()  # every shard opened so far (what a rank streaming its own shards touched)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getstate__(self) -> dict:  # memory maps do not pickle; a copy reopens them
        return {**self.__dict__, "_maps": OrderedDict()}

    def _shard(self, shard: int) -> np.ndarray:
        if shard in self._maps:
            self._maps.move_to_end(shard)
            return self._maps[shard]
        array = np.load(self.paths[shard], mmap_mode="r")
        expected = (int(self.starts[shard + 1] - self.starts[shard]), *self.shape[1:])
        if array.shape != expected or array.dtype != self.dtype:
            raise ValueError(
                f"{self.paths[shard]}: {array.dtype} {array.shape}, index.json says {self.dtype} {expected}; "
                "rerun the encode stage"
            )
        self._maps[shard] = array
        self.shards_read.add(shard)
        if len(self._maps) > OPEN_SHARDS:
            self._maps.popitem(last=False)
        return array

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        flat = rows.ravel()
        if flat.size and (flat.min() < -len(self) or flat.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        flat = np.where(flat < 0, flat + len(self), flat)
        out = np.empty((len(flat), *self.shape[1:]), dtype=self.dtype)
        shard_of = np.searchsorted(self.starts, flat, side="right") - 1
        order = np.argsort(shard_of, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(shard_of[order])) + 1):
            if len(group):
                shard = int(shard_of[group[0]])
                out[group] = self._shard(shard)[flat[group] - self.starts[shard]]
        return out.reshape(rows.shape + self.shape[1:])

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple):  # e.g. text_ids[rows, :4]: rows first, then the rest
            row_axes = 1 if isinstance(index[0], slice) else np.ndim(index[0])
            return self[index[0]][(slice(None),) * row_axes + index[1:]]
        if isinstance(index, slice):
            return self._gather(np.arange(*index.indices(len(self))))
        rows = np.asarray(index)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise IndexError(f"boolean index of shape {rows.shape} for {len(self)} rows")
            rows = np.flatnonzero(rows)
        if not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"rows must be integers, slices or booleans, got {rows.dtype}")
        return self._gather(rows.astype(np.int64))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        arrays = [np.asarray(x) if isinstance(x, ShardedRows) else x for x in inputs]
        return getattr(ufunc, method)(*arrays, **kwargs)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype)

    def __iter__(self):
        for start in range(0, len(self), 4096):
            yield from self[start : start + 4096]


@dataclass(frozen=True)
class TokenSplit:
    image_tokens: np.ndarray | ShardedRows  # (N, grid, grid)
    text_ids: np.ndarray | ShardedRows  # (M, text_len)
    text_lengths: np.ndarray | ShardedRows  # (M,)
    caption_offsets: np.ndarray  # (N + 1,) int64, in memory
    shard_lengths: tuple[int, ...] = ()  # images per token shard (= per prepared shard); () for one shard

    def __len__(self) -> int:
        return len(self.image_tokens)

    @property
    def shards(self) -> tuple[int, ...]:
        return self.shard_lengths or (len(self),)


@dataclass(frozen=True)
class EncodedShard:
    arrays: dict[str, np.ndarray]  # ARRAYS, for the images of one prepared shard
    truncated: int  # captions longer than text_len

    @property
    def images(self) -> int:
        return len(self.arrays["image_tokens"])

    @property
    def captions(self) -> int:
        return len(self.arrays["text_ids"])


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 2**16 else np.dtype(np.int32)


@torch.no_grad()
def encode_images(model: DiscreteVAE, images, rows: range, batch_size: int) -> np.ndarray:
    """uint8 (N, S, S, 3) array-like, rows ``rows`` → token grids (len(rows), S/d, S/d), batched, argmax codes.
    Batches start at ``rows.start``, so a shard's tokens do not depend on what else is encoded."""
    device = next(model.parameters()).device
    grid = images.shape[1] // model.cfg.downsample
    tokens = np.empty((len(rows), grid, grid), dtype=token_dtype(model.cfg.codebook_size))
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[start : start + batch_size]
        batch = to_float_images(images[batch_rows.start : batch_rows.stop], device)
        with mixed_precision(device):
            tokens[start : start + len(batch)] = model.encode(batch).cpu().numpy()
    return tokens


def encode_shard(
    model: DiscreteVAE, tokenizer: TextTokenizer, split: Split, rows: range, text_len: int, batch_size: int = 256
) -> EncodedShard:
    """Image tokens and caption ids of the images ``rows`` (one prepared shard) of ``split``."""
    image_tokens = encode_images(model, split.images, rows, batch_size)
    per_image = split.records["captions"].iloc[rows.start : rows.stop]
    encoded = tokenizer.encode([caption for caps in per_image for caption in caps], text_len)
    offsets = np.concatenate([[0], np.cumsum(per_image.map(len).to_numpy())]).astype(np.int64)
    arrays = {
        "image_tokens": image_tokens,
        "text_ids": encoded.ids.astype(np.int32, copy=False),
        "text_lengths": encoded.lengths.astype(np.int32, copy=False),
        "caption_offsets": offsets,
    }
    return EncodedShard(arrays=arrays, truncated=int(encoded.truncated.sum()))


def load_tokens(root: str | Path, split: str, cache_bytes: int = DEFAULT_CACHE_BYTES) -> TokenSplit:
    """Open one split of the token set at ``root`` (as published by the encode stage): in-memory arrays when its
    token files fit in ``cache_bytes``, else :class:`ShardedRows` views of the memory-mapped shards."""
    directory = Path(root) / split
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        old = (directory / "image_tokens.npy").exists()
        hint = "it holds the older single-array format" if old else "not encoded"
        raise FileNotFoundError(f"{index_path} not found ({hint}); run the encode stage")
    index = json.loads(index_path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}; rerun the encode stage")
    shards = index["shards"]
    grid, text_len, image_dtype = index["grid"], index["text_len"], np.dtype(index["image_dtype"])
    row_bytes = {"images": grid * grid * image_dtype.itemsize, "captions": (text_len + 1) * 4}
    in_memory = sum(index[count] * size for count, size in row_bytes.items()) <= cache_bytes

    def rows(name: str, count: str, row_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | ShardedRows:
        paths = [directory / shard["name"] / f"{name}.npy" for shard in shards]
        view = ShardedRows(paths, [shard[count] for shard in shards], row_shape, dtype)
        if not in_memory:
            return view
        array = np.asarray(view)
        array.setflags(write=False)  # read-only, like the memory-mapped view
        return array

    offsets, base = [np.zeros(1, np.int64)], 0
    for shard in shards:
        local = np.load(directory / shard["name"] / "caption_offsets.npy")
        assert len(local) == shard["images"] + 1 and local[-1] == shard["captions"], f"{directory}/{shard['name']}"
        offsets.append(local[1:] + base)
        base += shard["captions"]
    return TokenSplit(
        image_tokens=rows("image_tokens", "images", (grid, grid), image_dtype),
        text_ids=rows("text_ids", "captions", (text_len,), np.dtype(np.int32)),
        text_lengths=rows("text_lengths", "captions", (), np.dtype(np.int32)),
        caption_offsets=np.concatenate(offsets),
        shard_lengths=tuple(shard["images"] for shard in shards),
    )


def code_counts(tokens: TokenSplit, codebook_size: int, chunk: int = 65536) -> np.ndarray:
    """How often each code occurs in ``tokens.image_tokens``: (codebook_size,) int64."""
    counts = np.zeros(codebook_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        block = np.asarray(tokens.image_tokens[start : start + chunk]).ravel().astype(np.int64)
        counts += np.bincount(block, minlength=codebook_size)
    return counts
