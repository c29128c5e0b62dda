"""The run directory: resolved config, per-round history, global model.

Layout (a public format, documented in README):

    config.toml         the resolved RunConfig of the run
    history.jsonl       one JSON object per completed round
    model.safetensors   the latest global model (torch state-dict names)

Files are replaced atomically (temp file in the same directory, fsync, rename, fsync of
the directory), so a crash never leaves a half-written model or config.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedml.arrays import to_numpy
from fedml.config import RunConfig
from fedml.errors import FedmlError

CONFIG = "config.toml"
HISTORY = "history.jsonl"
MODEL = "model.safetensors"


def default_run_path(root: Path = Path("runs")) -> Path:
    """runs/<timestamp>, made unique with a suffix when two runs start the same second."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = root / stamp, 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunDir:
    """Writes one run's directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, path: Path, cfg: RunConfig) -> RunDir:
        """Start a new run directory; refuse one that already holds a run."""
        if (path / HISTORY).exists() or (path / CONFIG).exists():
            raise FedmlError(
                f"{path} already holds a run. Choose another --out directory (or delete that one)."
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FedmlError(f"Cannot create run directory {path}: {exc}.") from exc
        run_dir = cls(path)
        atomic_write(path / CONFIG, cfg.to_toml().encode())
        (path / HISTORY).touch()
        return run_dir

    def commit_round(self, arrays: ArrayRecord, row: dict[str, Any]) -> None:
        """Persist a completed round: the global model, then its history line."""
        from safetensors.numpy import save

        tensors = {k: np.ascontiguousarray(to_numpy(v)) for k, v in arrays.items()}
        atomic_write(self.path / MODEL, save(tensors, metadata={"round": str(row["round"])}))
        with open(self.path / HISTORY, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def history(self) -> list[dict[str, Any]]:
        """All history rows written so far."""
        lines = (self.path / HISTORY).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
