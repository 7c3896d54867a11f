"""The user's own data files: .npz, .npy and .csv (also ; or tab separated), checked and made a Dataset."""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from kronograph.cli.datasets.dataset import INPUT, Dataset
from kronograph.errors import KronographError


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

