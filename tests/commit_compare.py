"""Compare commit directories of two runs (shared by the resume and kill tests)."""

from __future__ import annotations

import json
from pathlib import Path


def same_commit(a: Path, b: Path) -> bool:
    """Two commit directories hold the same files, byte for byte. Their manifests agree
    on every file's checksum; they differ in creation time and in the history prefix
    they cover (history rows record wall-clock seconds)."""
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False

    def manifest(path: Path) -> dict:
        data = json.loads((path / "MANIFEST.json").read_text())
        return {k: v for k, v in data.items() if k not in ("created", "sha256", "history")}

    return manifest(a) == manifest(b) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names if n != "MANIFEST.json"
    )
