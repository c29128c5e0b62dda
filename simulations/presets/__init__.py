"""Bundled run configs, usable by name: `fedml simulate fedprox-synthetic`."""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).parent


def preset_names() -> list[str]:
    """Names of the bundled presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path | None:
    """The bundled preset called `name`, or None."""
    path = PRESET_DIR / f"{name}.toml"
    return path if path.is_file() else None
