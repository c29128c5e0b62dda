"""A data site's shard: .npz, folders of them and CSV files, prepared once and mapped,
the ClientApp's view of it, and `fedml client`'s checks before it starts anything."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading

import numpy as np
import pytest
from bounded import within
from flwr.app import ConfigRecord

from clients.app import LocalJob
from fedml.arrays import from_state_dict
from fedml.config import load_config
from fedml.data.site import X_FILE, load_prepared, prepare_site, read_site_data
from fedml.deploy.client import _check_certificate
from fedml.deploy.processes import free_port
from fedml.errors import FedmlError
from fedml.models import model_for
from fedml.pki import add_node, init_pki


def _npz(path, n=20, features=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    np.savez(path, x=x, y=y)
    return x, y


def test_an_npz_shard_is_prepared_once_and_then_memory_mapped(tmp_path):
    x, y = _npz(tmp_path / "shard.npz")
    folder, shard = prepare_site(tmp_path / "shard.npz", tmp_path / "state")
    assert isinstance(shard.x, np.memmap) and isinstance(shard.y, np.memmap)
    np.testing.assert_array_equal(shard.x, x)
    np.testing.assert_array_equal(shard.y, y)
    written = (folder / X_FILE).stat().st_mtime_ns
    prepare_site(tmp_path / "shard.npz", tmp_path / "state")
    assert (folder / X_FILE).stat().st_mtime_ns == written  # not parsed or written again
    x2, _ = _npz(tmp_path / "shard.npz", seed=1)  # the site's data changed
    os.utime(tmp_path / "shard.npz", ns=(written + 10**9, written + 10**9))
    _, again = prepare_site(tmp_path / "shard.npz", tmp_path / "state")
    np.testing.assert_array_equal(again.x, x2)


def test_a_folder_of_npz_files_is_one_shard_in_name_order(tmp_path):
    (tmp_path / "site").mkdir()
    x1, y1 = _npz(tmp_path / "site" / "b.npz", n=5, seed=2)
    x0, y0 = _npz(tmp_path / "site" / "a.npz", n=7, seed=1)
    shard = read_site_data(tmp_path / "site")
    np.testing.assert_array_equal(shard.x, np.concatenate([x0, x1]))
    np.testing.assert_array_equal(shard.y, np.concatenate([y0, y1]))


def test_empty_na_and_question_mark_cells_are_missing_values(tmp_path):
    path = tmp_path / "site.csv"
    path.write_text("age,chol,label\n50,,1\nNA,240,0\n61, ? ,1\nnan,NULL,0\n")
    shard = read_site_data(path)
    assert np.isnan(shard.x).tolist() == [[False, True], [True, False], [False, True], [True, True]]
    np.testing.assert_array_equal(shard.y, [1, 0, 1, 0])


def test_a_csv_with_a_label_column_anywhere(tmp_path):
    path = tmp_path / "site.csv"
    path.write_text("age,outcome,bmi\n50,1,22.5\n61,0,30.25\n\n45,2,19\n")
    shard = read_site_data(path, label_column="outcome")
    np.testing.assert_array_equal(shard.x, [[50, 22.5], [61, 30.25], [45, 19]])
    np.testing.assert_array_equal(shard.y, [1, 0, 2])
    assert shard.x.dtype == np.float32 and shard.y.dtype == np.int64


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a,b\n1,2\n", "has no column 'label' (columns: a, b)"),
        ("a,label\n1,0\nx,1\n", "line 3: 'x' (column 'a') is not a number"),
        ("a,label\n1,0.5\n", "line 2: label '0.5' is not a class index"),
        ("a,label\n1,-1\n", "label '-1' is not a class index"),
        ("a,label\n1,99999999999999999999\n", "label '99999999999999999999' is not a class"),
        ("a,label\n1,0\n1,2,3\n", "line 3: 3 cells where the header has 2"),
        ("a,label\n", "has a header but no examples"),
        ("", "is empty"),
        ("a,label\ninf,1\n", "line 2: 'inf' (column 'a') is not a finite number"),
        ("a,label\n1,NA\n", "line 2: the label is missing"),
    ],
)
def test_a_malformed_csv_is_one_clear_error(tmp_path, text, fragment):
    path = tmp_path / "site.csv"
    path.write_text(text)
    with pytest.raises(FedmlError) as error:
        read_site_data(path)
    assert fragment in str(error.value)


def test_missing_and_unsupported_data_are_clear_errors(tmp_path):
    with pytest.raises(FedmlError, match="does not exist"):
        read_site_data(tmp_path / "nowhere.npz")
    (tmp_path / "data.parquet").write_bytes(b"x")
    with pytest.raises(FedmlError, match=r"neither an \.npz file"):
        read_site_data(tmp_path / "data.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedmlError, match=r"holds no \.npz files"):
        read_site_data(tmp_path / "empty")
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 2)), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(FedmlError, match="one label per row"):
        read_site_data(tmp_path / "bad.npz")
    with pytest.raises(FedmlError, match="does not hold prepared site data"):
        load_prepared(tmp_path / "empty")


def test_a_site_job_builds_the_servers_model_even_without_every_class(tmp_path):
    """A site that holds only classes 0..2 still trains the server's 10-class model:
    the model's size comes from the server's "num-classes"."""
    _npz(tmp_path / "shard.npz", n=30, features=64, classes=3)
    folder, _ = prepare_site(tmp_path / "shard.npz", tmp_path / "state")
    cfg = load_config(None, {"model.name": "logreg"})
    job = LocalJob.load_site(cfg, folder, device="cpu")
    assert job.partition_id is None and job.num_classes == 3
    assert len(job.train) + len(job.val) == 30
    global_model = model_for(cfg, (64,), 10)
    model = job.model(from_state_dict(global_model.state_dict()), ConfigRecord({"num-classes": 10}))
    assert model(np_tensor(job.train.x[:2])).shape == (2, 10)
    # a plain SuperNode may name the site's file itself: the same examples, parsed
    direct = LocalJob.load_site(cfg, tmp_path / "shard.npz", device="cpu")
    np.testing.assert_array_equal(direct.train.x, job.train.x)


def np_tensor(array):
    import torch

    return torch.as_tensor(np.asarray(array))


def _tls_server(cert, key):
    """A TLS listener on a free loopback port that completes handshakes; its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        with listener:
            listener.settimeout(10)
            try:
                raw, _ = listener.accept()
                with context.wrap_socket(raw, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return port


def test_a_superlink_certificate_from_another_ca_is_refused_before_joining(tmp_path):
    init_pki(tmp_path / "ours")
    init_pki(tmp_path / "theirs")
    port = _tls_server(tmp_path / "theirs/server.crt", tmp_path / "theirs/server.key")
    with pytest.raises(FedmlError, match="does not vouch for"):
        _check_certificate("127.0.0.1", port, tmp_path / "ours/ca.crt")
    port = _tls_server(tmp_path / "ours/server.crt", tmp_path / "ours/server.key")
    _check_certificate("127.0.0.1", port, tmp_path / "ours/ca.crt")  # ours: accepted


def test_fedml_client_errors_before_it_starts_anything(tmp_path):
    init_pki(tmp_path / "pki")
    add_node(tmp_path / "pki", "a")
    _npz(tmp_path / "shard.npz")
    free = free_port()

    def client(*args):
        return subprocess.run(
            [sys.executable, "-m", "fedml.cli", "client", "--superlink", f"127.0.0.1:{free}",
             "--pki", str(tmp_path / "pki/sites/a"), "--state-dir", str(tmp_path / "state"),
             "--join-timeout", "1", *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    unreachable = client("--data", str(tmp_path / "shard.npz"))
    assert unreachable.returncode == 2
    assert "Cannot reach the SuperLink" in unreachable.stderr
    missing = client("--data", str(tmp_path / "none.npz"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in unreachable.stderr + missing.stderr


def test_a_site_clientapp_process_loads_no_heavy_package_it_does_not_use(tmp_path):
    """Every message to a SuperNode starts a fresh process: importing the ClientApp and
    loading a prepared site job must not pull in scikit-learn, Opacus or plotting."""
    _npz(tmp_path / "shard.npz")
    folder, _ = prepare_site(tmp_path / "shard.npz", tmp_path / "state")
    code = (
        "import sys; from clients.app import LocalJob; from fedml.config import load_config; "
        f"LocalJob.load_site(load_config(None, {{}}), __import__('pathlib').Path({str(folder)!r}),"
        " 'cpu'); print([m for m in ('sklearn', 'opacus', 'matplotlib', 'mlflow') "
        "if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_sites_supernode_gets_its_data_ledger_and_device_through_the_node_config(tmp_path):
    from fedml.deploy.client import ClientOptions, prepare

    _npz(tmp_path / "shard.npz")
    listener = socket.create_server(("127.0.0.1", 0))  # stands in for a SuperLink
    with listener:
        port = listener.getsockname()[1]
        options = ClientOptions(
            f"127.0.0.1:{port}", tmp_path / "shard.npz", None, insecure=True,
            device="cpu", state_dir=tmp_path / "site", port=9999,
        )  # fmt: skip
        said: list[str] = []
        command = prepare(options, said.append).command
    node_config = command[command.index("--node-config") + 1]
    assert node_config == (
        f'data-path="{tmp_path / "site" / "data"}" '
        f'privacy-ledger="{tmp_path / "site" / "privacy-ledger.json"}" site-name="shard" '
        f'state-dir="{tmp_path / "site"}" data-rows=20 device="cpu" '
        f'superlink="127.0.0.1:{port}"'
    )
    assert command[-1] == "--insecure" and command[command.index("--port") + 1] == "9999"
    assert said[0].startswith("site data: 20 examples of (4,) features, labels 0..2")
    assert (tmp_path / "site" / "data" / X_FILE).is_file()


def test_the_log_watch_returns_lines_written_in_pieces_once_each_after_the_offset(tmp_path):
    from fedml.deploy.client import REFUSED_MARK, NewLines

    log = tmp_path / "supernode.log"
    log.write_text("old attempt: " + REFUSED_MARK + "\n")
    watch = NewLines(log, log.stat().st_size)  # only what this attempt writes counts
    assert watch.read() == []
    with log.open("a") as handle:
        handle.write("ERROR: " + REFUSED_MARK[:9])
    assert watch.read() == []  # half a line is not a line yet
    with log.open("a") as handle:
        handle.write(REFUSED_MARK[9:] + ".\nnext\n")
    assert watch.read() == ["ERROR: " + REFUSED_MARK + ".", "next"]
    assert watch.read() == [] and watch.offset == log.stat().st_size


def test_the_site_console_names_each_failed_task_and_shouts_after_three_in_a_row(tmp_path):
    from fedml.deploy.client import TaskReport
    from fedml.deploy.site_state import TASK_DONE_MARK, TASK_FAILED_MARK

    log = tmp_path / "executor.log"
    log.write_text(f"{TASK_FAILED_MARK}train: an old run's failure\n")
    said: list[str] = []
    report = TaskReport(log, said.append)

    def task(line: str) -> None:
        with log.open("a") as handle:
            handle.write(f"2026-12-03 INFO {line}\n")
        report.read()

    task(f"{TASK_DONE_MARK}train")
    assert said == []  # a task that worked is not news; the old failure is not this run's
    for _ in range(3):
        task(f"{TASK_FAILED_MARK}train: site a: FedmlError: <x.npy> is damaged")
    assert said[0] == f"task failed: train: site a: FedmlError: <x.npy> is damaged (details: {log})"
    assert len(said) == 4 and "FAILED ITS LAST 3 TASKS" in said[3]
    task(f"{TASK_DONE_MARK}train")
    assert said[-1] == "tasks succeed again after 3 failures"


def test_a_flower_federation_with_fewer_nodes_splits_the_data_that_many_ways(caplog):
    """Under a plain `flwr run`, Flower's local simulation starts 2 SuperNodes (node
    config num-partitions 2) while the config says 10 clients: each node holds its
    partition of 2, as `fedml simulate --clients 2` would, and the log says so."""
    from flwr.app import Context, RecordDict

    from clients.app import LocalJob

    cfg = load_config(None, {"simulation.clients": 10})
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 1, "num-partitions": 2},
        state=RecordDict(),
        run_config=cfg.to_flat(),
    )
    with caplog.at_level(logging.WARNING, logger="clients.app"):
        job = LocalJob.from_context(context)
    two = LocalJob.load(load_config(None, {"simulation.clients": 2}), 1)
    assert np.array_equal(job.train.x, two.train.x) and np.array_equal(job.val.y, two.val.y)
    assert len(job.train) + len(job.val) > 500  # half of digits' training pool, not a tenth
    assert "split 2 ways" in caplog.text


@pytest.mark.parametrize("name", ["site.npz", "site.csv", "folder/client-0.npz"])
def test_a_fifo_as_site_data_is_a_clear_error_not_a_hang(tmp_path, name):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    os.mkfifo(path)
    target = path.parent if name.startswith("folder") else path
    with pytest.raises(FedmlError, match="is a FIFO, not a regular file"):
        within(20, lambda: read_site_data(target))


def _npz_declaring(path, shape: tuple[int, ...]) -> None:
    """An .npz whose x.npy header declares `shape` (float64) but holds 64 bytes."""
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": shape}
    )
    y = io.BytesIO()
    np.save(y, np.zeros(shape[0] if shape[0] < 100 else 1, dtype=np.int64))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(64))  # the header has the magic
        archive.writestr("y.npy", y.getvalue())


def test_an_npz_whose_header_declares_more_than_memory_is_refused_before_allocating(tmp_path):
    """Issue 34: shape (10**12, 64) in x's header gave a NumPy _ArrayMemoryError traceback."""
    _npz_declaring(tmp_path / "site.npz", (10**12, 64))
    with pytest.raises(FedmlError, match="more than half this machine's memory"):
        within(20, lambda: read_site_data(tmp_path / "site.npz"))


def test_a_decompression_bomb_is_refused_before_it_is_inflated(tmp_path):
    """100 MB of zeros compress to about 100 KB: no real data does that."""
    np.savez_compressed(
        tmp_path / "site.npz", x=np.zeros((100_000, 125)), y=np.zeros(100_000, dtype=np.int64)
    )
    assert (tmp_path / "site.npz").stat().st_size < 200_000
    with pytest.raises(FedmlError, match="real data does not compress that well"):
        within(20, lambda: read_site_data(tmp_path / "site.npz"))
    # ordinary compressed data passes
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2_000, 8)).astype(np.float32)
    np.savez_compressed(tmp_path / "fine.npz", x=x, y=np.arange(2_000) % 3)
    assert read_site_data(tmp_path / "fine.npz").x.shape == (2_000, 8)


def test_a_csv_saved_by_excel_with_a_byte_order_mark_reads_its_header(tmp_path):
    path = tmp_path / "site.csv"
    path.write_text("\ufefflabel,age\n1,50\n0,61\n", encoding="utf-8")
    shard = read_site_data(path)
    np.testing.assert_array_equal(shard.y, [1, 0])


def test_a_policy_that_pins_the_superlinks_certificate_refuses_any_other(tmp_path):
    """Even a certificate the site's CA vouches for is refused when it is not the one
    the policy pins (a CA key that leaked, a server replaced by its own operator)."""
    import hashlib

    from fedml.deploy.client import ClientOptions, _check_server
    from fedml.site_policy import parse_policy

    init_pki(tmp_path / "pki")
    add_node(tmp_path / "pki", "a")
    served = ssl.PEM_cert_to_DER_cert((tmp_path / "pki/server.crt").read_text())
    digest = hashlib.sha256(served).hexdigest()
    options = ClientOptions("127.0.0.1:1", tmp_path / "x.npz", tmp_path / "pki/sites/a")
    pinned = ":".join(digest[i : i + 2] for i in range(0, 64, 2)).upper()  # as openssl prints
    policy = parse_policy(f'[server]\ncertificate_sha256 = "{pinned}"\n')
    port = _tls_server(tmp_path / "pki/server.crt", tmp_path / "pki/server.key")
    _check_server(options, "127.0.0.1", port, policy)  # the pinned one: accepted
    other = parse_policy(f'[server]\ncertificate_sha256 = "{"0" * 64}"\n')
    port = _tls_server(tmp_path / "pki/server.crt", tmp_path / "pki/server.key")
    with pytest.raises(FedmlError, match=f"of SHA-256 {digest}, but this site's policy"):
        _check_server(options, "127.0.0.1", port, other)


def test_a_pinned_certificate_with_insecure_is_an_error_before_anything_starts(tmp_path):
    from fedml.deploy.client import ClientOptions, prepare

    _npz(tmp_path / "shard.npz")
    (tmp_path / "policy.toml").write_text(f'[server]\ncertificate_sha256 = "{"a" * 64}"\n')
    options = ClientOptions(
        "127.0.0.1:1", tmp_path / "shard.npz", None, insecure=True,
        state_dir=tmp_path / "site", policy=tmp_path / "policy.toml",
    )  # fmt: skip
    with pytest.raises(FedmlError, match="pins the server's certificate"):
        prepare(options, lambda _: None)
    assert not (tmp_path / "site").exists()  # nothing prepared
    (tmp_path / "policy.toml").write_text("[privacy]\nmax_epsilon_per_run = 3\n")
    said: list[str] = []
    with pytest.raises(FedmlError, match="Cannot reach the SuperLink"):  # nothing listens
        prepare(dataclasses.replace(options, join_timeout=0.5), said.append)
    assert "  privacy.max_epsilon_per_run = 3.0" in said
    assert any("set privacy.max_epsilon_total for a limit over all" in line for line in said)
    (tmp_path / "policy.toml").write_text("[privacy]\nmax_epsilon = 3\n")
    with pytest.raises(FedmlError, match=r"did you mean privacy\.max_epsilon_total"):
        prepare(options, lambda _: None)
