"""Parse and check the shipped source files: gzip'd CSV (digits, mnist5k) and gzip'd IDX (Fashion-MNIST).

What: ``read_source(info, paths, raw)`` turns the raw (still compressed) bytes of a dataset's
source files into ``(X uint8 (n, p), labels int64 (n,))``: raw pixel values and class labels.

Why: the source files are the ground truth, so everything about them is checked before anything
is written: a truncated or corrupt gzip stream (the gzip CRC and length trailer catch a cut-off
file), wrong IDX magic numbers or sizes, CSV rows of the wrong length, non-numeric cells, NaN,
infinite, non-integer or out-of-range pixels, labels outside 0..9. Each problem is a
``DataError`` whose one-line message names the file, says what is wrong and how to repair it
(reinstall the package that ships it). The caller hands in bytes it has already read, so the
checksum it records is the checksum of exactly the bytes that were parsed.
"""
from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pipeline.core.arrays import DataError
from pipeline.datasets.registry import DatasetInfo

__all__ = ["read_source", "gunzip"]

N_CLASSES = 10
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801  # ubyte magic: 3-D images, 1-D labels


def _fail(info: DatasetInfo, path: Path, problem: str) -> DataError:
    return DataError(f"{info.name} source {path}: {problem}; reinstall {info.package} (`{info.reinstall}`)",
                     path=path)


def gunzip(info: DatasetInfo, path: Path, raw: bytes) -> bytes:
    """The decompressed bytes; a truncated or corrupt stream is a ``DataError`` naming ``path``."""
    try:
        return gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise _fail(info, path, f"truncated or corrupt gzip ({type(e).__name__}: {reason[:120]})") from e


def _check_pixels(info: DatasetInfo, path: Path, values: np.ndarray, what: str, hi: int) -> None:
    """``values`` (float64, any shape) must be finite integers in 0..hi."""
    n_nan = int(np.isnan(values).sum())
    if n_nan:
        raise _fail(info, path, f"{n_nan} NaN {what} values")
    n_inf = int(np.isinf(values).sum())
    if n_inf:
        raise _fail(info, path, f"{n_inf} infinite {what} values")
    bad = (values < 0) | (values > hi)
    if bad.any():
        raise _fail(info, path, f"{int(bad.sum())} {what} values outside 0..{hi} "
                                f"(min {values.min():g}, max {values.max():g})")
    frac = values != np.floor(values)
    if frac.any():
        raise _fail(info, path, f"{int(frac.sum())} non-integer {what} values")


def _read_csv(info: DatasetInfo, path: Path, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One image per row: ``p`` pixel values, then the label."""
    data = gunzip(info, path, raw)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        raise _fail(info, path, f"not a text CSV (non-ASCII byte at offset {e.start})") from e
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise _fail(info, path, "empty CSV (no rows)")
    want = info.p + 1
    for i, line in enumerate(lines):  # 5000 rows: a few ms; gives the row number loadtxt would not
        got = line.count(",") + 1
        if got != want:
            raise _fail(info, path, f"row {i + 1} has {got} values, expected {want} ({info.p} pixels + label)")
    try:
        table = np.loadtxt(io.StringIO("\n".join(lines)), delimiter=",", dtype=np.float64, ndmin=2)  # (n, p + 1)
    except ValueError as e:
        raise _fail(info, path, f"not numeric CSV ({' '.join(str(e).split())[:120]})") from e
    pixels, labels = table[:, : info.p], table[:, info.p]  # (n, p), (n,)
    _check_pixels(info, path, pixels, "pixel", info.max_pixel)
    _check_pixels(info, path, labels, "label", N_CLASSES - 1)
    return pixels.astype(np.uint8), labels.astype(np.int64)


def _idx_header(info: DatasetInfo, path: Path, data: bytes, magic: int, ndim: int) -> tuple[int, ...]:
    """The dimensions of a big-endian ubyte IDX file; checks the magic number and the payload size."""
    head = 4 + 4 * ndim
    if len(data) < head:
        raise _fail(info, path, f"not an IDX file (only {len(data)} bytes, header needs {head})")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise _fail(info, path, f"wrong IDX magic 0x{got:08x} (expected 0x{magic:08x})")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    if len(data) - head != size:
        raise _fail(info, path, f"IDX dimensions {dims} need {size} data bytes, the file has {len(data) - head}")
    return dims


def _read_idx(info: DatasetInfo, paths: Mapping[str, Path],
              raw: Mapping[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    ip, lp = paths["images"], paths["labels"]
    images, labels = gunzip(info, ip, raw["images"]), gunzip(info, lp, raw["labels"])
    n, rows, cols = _idx_header(info, ip, images, _IDX_IMAGES, 3)
    if rows * cols != info.p:
        raise _fail(info, ip, f"images are {rows}x{cols}, expected {info.p} pixels")
    (n_labels,) = _idx_header(info, lp, labels, _IDX_LABELS, 1)
    if n_labels != n:
        raise _fail(info, lp, f"{n_labels} labels for the {n} images of {ip}")
    if n == 0:
        raise _fail(info, ip, "no images")
    x = np.frombuffer(images, dtype=np.uint8, offset=16).reshape(n, info.p).copy()  # (n, p) uint8: 0..255 by type
    y = np.frombuffer(labels, dtype=np.uint8, offset=8).astype(np.int64)  # (n,)
    if (y >= N_CLASSES).any():
        raise _fail(info, lp, f"{int((y >= N_CLASSES).sum())} label values outside 0..{N_CLASSES - 1}")
    return x, y


def read_source(info: DatasetInfo, paths: Mapping[str, Path],
                raw: Mapping[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(X uint8 (n, p), labels int64 (n,))`` from the raw bytes of each source file (role -> bytes)."""
    if info.fmt == "csv":
        return _read_csv(info, paths["csv"], raw["csv"])
    if info.fmt == "idx":
        return _read_idx(info, paths, raw)
    raise ValueError(f"dataset {info.name}: unknown source format {info.fmt!r}")
