"""IDX files (LeCun's MNIST format): reading, writing, and finding the MNIST-style file pairs in a folder.

The canonical names are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
and ``t10k-labels-idx1-ubyte``, each plain or ``.gz``; valid = the last 10k of the 60k training file.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from kronograph.cli.datasets.dataset import _concat
from kronograph.errors import KronographError

IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format, plain or gzip): magic 0 0 TYPE NDIM, big-endian dims."""
    path = Path(path)
    try:
        raw = _read_maybe_gzip(path)
    except FileNotFoundError:
        raise KronographError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise KronographError(f"{path}: cannot read it ({exc}); download or copy it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise KronographError(f"{path}: not an IDX file (bad magic number); expected MNIST-style IDX data")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise KronographError(f"{path}: IDX header is truncated; download or copy the file again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(dims)
    if len(raw) - header != count * dtype.itemsize:
        raise KronographError(
            f"{path}: IDX header says shape {dims} ({count * dtype.itemsize} bytes of data) but the file holds "
            f"{len(raw) - header}; it is truncated or corrupt, download or copy it again"
        )
    return np.frombuffer(raw, dtype, count, header).astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed if the name ends in .gz)."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("=").str[1:]: k for k, v in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.str[1:])
    if code is None:
        raise KronographError(f"IDX cannot hold dtype {array.dtype}; use uint8, int8, int16, int32, float32/64")
    body = struct.pack(f">BBBB{array.ndim}I", 0, 0, code, array.ndim, *array.shape)
    body += array.astype(np.dtype(_IDX_DTYPES[code]), copy=False).tobytes()
    Path(path).write_bytes(gzip.compress(body, compresslevel=1) if str(path).endswith(".gz") else body)


def _find_idx(folder: Path, stem: str) -> Path | None:
    """``stem`` (e.g. train-images-idx3-ubyte) in ``folder``, plain or .gz, also with '.idx' spelling."""
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    return None


def _load_idx_pair(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Images (n, rows*cols) in [0, 1] and int64 labels of the 'train' or 'test' file pair, or None."""
    paths = [_find_idx(folder, stem) for stem in IDX_STEMS[part]]
    if None in paths:
        return None
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise KronographError(
            f"{folder}: {paths[0].name} has shape {images.shape} and {paths[1].name} {labels.shape}; expected "
            "(n, rows, cols) images with n labels; replace them with the original files"
        )
    x = images.reshape(len(images), -1).astype(np.float32) / 255
    return x, labels.astype(np.int64)


def _idx_splits(folder: Path, parts: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """The named splits (train = first 5/6 of the training file, 50k of 60k; valid = the rest; test = t10k)."""
    files = {f: _load_idx_pair(folder, f) for f in {"test" if p == "test" else "train" for p in parts}}
    if None in files.values():
        return None
    chosen = []
    for part in parts:
        x, y = files["test" if part == "test" else "train"]
        train = len(x) * 5 // 6  # 50k of 60k
        cut = {"train": slice(None, train), "valid": slice(train, None), "test": slice(None)}[part]
        chosen.append((x[cut], y[cut]))
    return _concat(chosen)



def _idx_hint(folder: Path) -> str:
    names = ", ".join(f"{stem}.gz" for pair in IDX_STEMS.values() for stem in pair)
    return f"put the IDX files ({names}) in {folder} (set KRONOGRAPH_DATA to use another folder)"

