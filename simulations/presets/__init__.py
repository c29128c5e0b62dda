"""Bundled run configs, usable by name: `fedml simulate fedprox-synthetic`."""

from __future__ import annotations

from pathlib import Path

from fedml.errors import FedmlError

PRESET_DIR = Path(__file__).parent


def preset_names() -> list[str]:
    """Names of the bundled presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path | None:
    """The bundled preset called `name`, or None."""
    path = PRESET_DIR / f"{name}.toml"
    return path if path.is_file() else None


def resolve_config(path: Path | None) -> Path | None:
    """What `fedml simulate [CONFIG]` means by CONFIG: a TOML file, or the name of a
    bundled preset (its file here). None stays None (the defaults)."""
    if path is None or path.is_file():
        return path
    preset = preset_path(str(path))
    if preset is not None:
        return preset
    raise FedmlError(
        f"Config file {path} does not exist. Pass the path of a TOML file or a bundled "
        f"preset name ({', '.join(preset_names())})."
    )
