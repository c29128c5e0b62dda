"""A stock Flower App for the benchmarks' baselines: its code and `pyproject.toml` in a
folder, and a Flower config (`FLWR_HOME`) that reaches a local insecure SuperLink."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from fedml.deploy.launch import write_flower_config


def write_stock_app(folder: Path, code: str, config: dict[str, Any]) -> Path:
    """`folder/stock_app.py` (defining `server` and `client`) and the App's
    `pyproject.toml` with `config` as its run config."""
    folder.mkdir(parents=True)
    (folder / "stock_app.py").write_text(code)
    project = {
        "project": {
            "name": "stock-app",
            "version": "1.0.0",
            "description": "bench",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "bench",
                    "components": {
                        "serverapp": "stock_app:server",
                        "clientapp": "stock_app:client",
                    },
                    "config": config,
                }
            }
        },
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder


def write_local_connection(home: Path, port: int) -> None:
    """Flower's config in `home`: the insecure SuperLink on 127.0.0.1:`port`."""
    write_flower_config(home, f"127.0.0.1:{port}", None)
