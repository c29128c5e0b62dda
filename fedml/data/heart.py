"""FLamby's Fed-Heart-Disease, built in: the UCI Heart Disease tables of four hospitals,
one client per hospital, preprocessed and split exactly as FLamby does.

The four tables ship with fedml (`fedml/data/files/heart-disease/`, CC BY 4.0, see its
ATTRIBUTION.md): no download, and their SHA-256 is checked when they are read. FLamby's
`HeartDiseaseRaw` (flamby/datasets/fed_heart_disease/dataset.py), step by step:

- the 14 attributes of each `processed.<hospital>.data`, `?` a missing value;
- `slope`, `ca` and `thal` dropped (mostly missing outside Cleveland), then every row
  that still has a missing value;
- the label: `num > 0` (heart disease), else 0;
- each hospital's rows split 66/34 into train and test by scikit-learn's
  `train_test_split(random_state=43, shuffle=True)`, stratified on the label when both
  classes have more than two rows (Switzerland has one negative row: a plain shuffle);
- `cp` (chest pain, 1-4) and `restecg` (0-2) one-hot, the first level dropped, after the
  eight other features: 13 features.

Sizes: train 199/172/30/85, test 104/89/16/45 (486 and 254 rows). The rows stay raw
(age ~50, cholesterol ~240): FLamby standardises each hospital with its own training
statistics; fedml standardises with statistics computed across the hospitals
(`fedml.data.features`), the federated way.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedml.data.bundled import stratified_split
from fedml.data.shard import Shard
from fedml.errors import FedmlError

DATASET = "fed-heart-disease"
FILES_DIR = Path(__file__).parent / "files" / "heart-disease"
# hospital name -> (its UCI file, the file's SHA-256), in FLamby's center order 0..3
HOSPITAL_FILES = {
    "cleveland": (
        "processed.cleveland.data",
        "a74b7efa387bc9d108d7d0115d831fe9b414b29ae7124f331b622b4efa0427c8",
    ),
    "hungary": (
        "processed.hungarian.data",
        "d1ad108f785768cd3d7e82dc522e6f5a61eea93cccfb3a46ee8076f73fc3d796",
    ),
    "switzerland": (
        "processed.switzerland.data",
        "834a405ccf5b66ab4056bb77794adc8df0b7125186454c0a1d002d33c6c3b314",
    ),
    "va-long-beach": (
        "processed.va.data",
        "e7c93d8d0d2acdadfa4c5e8de768e2191e7f618b952e29623f1f0d5949ff6b8f",
    ),
}
HOSPITALS = tuple(HOSPITAL_FILES)
TRAIN_FRACTION = 0.66
SPLIT_SEED = 43
KEPT = (0, 1, 3, 4, 5, 7, 8, 9)  # age sex trestbps chol fbs thalach exang oldpeak
CP, RESTECG, LABEL = 2, 6, 13  # UCI column indices
CP_LEVELS, RESTECG_LEVELS = (2.0, 3.0, 4.0), (1.0, 2.0)  # one-hot; levels 1 and 0 dropped
FEATURES = (
    "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
    "cp=2", "cp=3", "cp=4", "restecg=1", "restecg=2",
)  # fmt: skip


@dataclass(frozen=True)
class Hospital:
    """One hospital's raw training and test rows (13 features, label 0/1)."""

    name: str
    train: Shard
    test: Shard


@lru_cache(maxsize=1)
def read_hospitals() -> tuple[Hospital, ...]:
    """The four hospitals, in FLamby's order (cleveland, hungary, switzerland,
    va-long-beach)."""
    return tuple(_hospital(name, *HOSPITAL_FILES[name]) for name in HOSPITALS)


def _hospital(name: str, file_name: str, sha256: str) -> Hospital:
    table = _read_table(FILES_DIR / file_name, sha256)
    table = np.delete(table, [10, 11, 12], axis=1)  # slope, ca, thal
    table = table[~np.isnan(table).any(axis=1)]
    label = (table[:, -1] > 0).astype(np.int64)
    x = np.concatenate(
        [
            table[:, KEPT],
            table[:, [CP]] == np.array(CP_LEVELS),
            table[:, [RESTECG]] == np.array(RESTECG_LEVELS),
        ],
        axis=1,
    ).astype(np.float32)
    train, test = flamby_split(label)
    return Hospital(name, Shard(x[train], label[train]), Shard(x[test], label[test]))


def flamby_split(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices, each in file order, as FLamby's
    `train_test_split(test_size=1 - 0.66, train_size=0.66, random_state=43,
    shuffle=True, stratify=...)` picks them."""
    n = len(label)
    counts = np.bincount(label, minlength=2)
    if (counts > 0).sum() > 1 and counts[counts > 0].min() > 2:
        _, test = stratified_split(label, 1.0 - TRAIN_FRACTION, SPLIT_SEED)
    else:  # scikit-learn's ShuffleSplit: one permutation, the test rows first
        n_test = math.ceil((1.0 - TRAIN_FRACTION) * n)
        test = np.random.RandomState(SPLIT_SEED).permutation(n)[:n_test]
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _read_table(path: Path, sha256: str) -> np.ndarray:
    """A UCI table as floats (NaN where it says `?`), after checking its checksum."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FedmlError(
            f"Cannot read {path} ({exc}): fedml's copy of the UCI heart disease data is "
            "missing; reinstall fedml."
        ) from exc
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise FedmlError(
            f"{path} is not the UCI heart disease table fedml shipped (its SHA-256 "
            "differs); reinstall fedml."
        )
    rows = [line.split(",") for line in raw.decode("ascii").splitlines() if line.strip()]
    return np.array([[math.nan if v == "?" else float(v) for v in row] for row in rows])
