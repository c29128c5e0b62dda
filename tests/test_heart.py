"""fed-heart-disease: FLamby's Fed-Heart-Disease built in (fedml.data.heart), checked
against FLamby's own recipe run with pandas and scikit-learn on the same UCI files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedml.config import load_config
from fedml.data import federation_for
from fedml.data.heart import FILES_DIR, HOSPITAL_FILES, HOSPITALS, flamby_split, read_hospitals
from fedml.errors import FedmlError


def test_each_hospital_has_flambys_train_and_test_sizes_and_13_features():
    hospitals = read_hospitals()
    assert [h.name for h in hospitals] == ["cleveland", "hungary", "switzerland", "va-long-beach"]
    assert [len(h.train) for h in hospitals] == [199, 172, 30, 85]
    assert [len(h.test) for h in hospitals] == [104, 89, 16, 45]
    for h in hospitals:
        assert h.train.x.shape[1] == 13 and h.train.x.dtype == np.float32
        assert set(np.unique(np.concatenate([h.train.y, h.test.y]))) <= {0, 1}
        assert not np.isnan(h.train.x).any()  # FLamby drops the rows with a missing value
    # Switzerland's patients are almost all positive, Cleveland's about half
    assert hospitals[2].train.y.mean() > 0.9 and 0.4 < hospitals[0].train.y.mean() < 0.5


def test_the_rows_are_flambys_row_for_row():
    """FLamby's HeartDiseaseRaw, step by step, with pandas and scikit-learn."""
    pd = pytest.importorskip("pandas")
    from sklearn.model_selection import train_test_split

    frames, sets = [], []
    for center, (file_name, _) in enumerate(HOSPITAL_FILES.values()):
        df = pd.read_csv(FILES_DIR / file_name, header=None)
        df = df.replace("?", np.nan).drop([10, 11, 12], axis=1).dropna(axis=0)
        df = df.apply(pd.to_numeric)
        labels = df.iloc[:, -1].where(df.iloc[:, -1] == 0, 1)
        counts = labels.value_counts()
        stratify = labels if len(counts) > 1 and (counts > 2).all() else None
        _, test = train_test_split(
            np.arange(len(df)), test_size=1.0 - 0.66, train_size=0.66, random_state=43,
            shuffle=True, stratify=stratify,
        )  # fmt: skip
        sets += [(center, "test" if i in test else "train") for i in range(len(df))]
        frames.append(df)
    pooled = pd.concat(frames, ignore_index=True)
    y = (pooled.iloc[:, -1] > 0).astype(int).to_numpy()
    x = pd.get_dummies(pooled.iloc[:, :-1], columns=[2, 6], drop_first=True).to_numpy(np.float32)
    for center, hospital in enumerate(read_hospitals()):
        for name, shard in (("train", hospital.train), ("test", hospital.test)):
            rows = [i for i, s in enumerate(sets) if s == (center, name)]
            np.testing.assert_array_equal(shard.x, x[rows])
            np.testing.assert_array_equal(shard.y, y[rows])


def test_the_split_is_scikit_learns_with_and_without_stratification():
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(1)
    for labels in (rng.integers(0, 2, 57), np.array([0] + [1] * 45)):
        counts = np.bincount(labels)
        stratify = labels if (counts > 2).all() else None
        train, test = train_test_split(
            np.arange(len(labels)), test_size=1.0 - 0.66, train_size=0.66, random_state=43,
            shuffle=True, stratify=stratify,
        )  # fmt: skip
        ours = flamby_split(labels)
        np.testing.assert_array_equal(ours[0], np.sort(train))
        np.testing.assert_array_equal(ours[1], np.sort(test))


def test_the_federation_is_one_client_per_hospital_with_the_pooled_test_set():
    cfg = load_config(None, {"data.dataset": "fed-heart-disease"})
    assert cfg.simulation.clients == 4  # the hospitals, unless told otherwise
    federation = federation_for(cfg)
    assert federation.names == HOSPITALS and federation.input_shape == (13,)
    assert federation.num_classes == 2 and len(federation.test) == 254
    for index, hospital in enumerate(read_hospitals()):
        np.testing.assert_array_equal(federation.client(index).x, hospital.train.x)
    with pytest.raises(FedmlError, match=r"4 hospitals, one client each.*simulation\.clients is 3"):
        federation_for(
            load_config(None, {"data.dataset": "fed-heart-disease", "simulation.clients": 3})
        )
    iid = federation_for(
        load_config(
            None,
            {"data.dataset": "fed-heart-disease", "data.partition": "iid", "simulation.clients": 3},
        )
    )
    assert sum(len(iid.client(i)) for i in range(3)) == 486


def test_a_changed_table_is_refused_by_its_checksum(tmp_path, monkeypatch):
    from fedml.data import heart

    for _, (file_name, _) in HOSPITAL_FILES.items():
        (tmp_path / file_name).write_bytes((FILES_DIR / file_name).read_bytes())
    (tmp_path / "processed.va.data").write_text("63,1,4,140,260,0,1,112,1,3,2,?,?,2\n")
    monkeypatch.setattr(heart, "FILES_DIR", tmp_path)
    heart.read_hospitals.cache_clear()
    try:
        with pytest.raises(FedmlError, match=r"processed\.va\.data is not the UCI.*reinstall"):
            heart.read_hospitals()
    finally:
        heart.read_hospitals.cache_clear()


def test_the_preset_is_as_good_as_pooling_the_data(tmp_path):
    """`fedml simulate fed-heart-disease` (seed 0): the hospitals' mean test accuracy is
    within 0.01 of the same model trained centrally on the pooled rows, which no
    federation may do (bench.heart measures seeds 0-4: 0.804 against 0.803)."""
    from bench.heart import central, federated
    from simulations.presets import resolve_config

    hospitals, pooled = federated(0, tmp_path / "run", resolve_config(Path("fed-heart-disease")))
    central_hospitals, _ = central(1.0)
    assert hospitals >= central_hospitals - 0.01 and hospitals >= 0.79
    assert pooled >= 0.78
