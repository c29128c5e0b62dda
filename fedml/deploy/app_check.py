"""What a data site accepts to run: fedml's own ClientApp and nothing else.

A SuperNode receives each run's app (FAB: a zip holding `pyproject.toml`, code files and
Flower's `.info/CONTENT` manifest) from the SuperLink, and stock Flower would import the
ClientApp named there from the code that came with it. A site cannot tell an honest
server from a compromised one, so before anything of a run is imported the site checks
its app and message here (fedml.deploy.site_task calls `refusal`):

- the FAB carries no file besides `pyproject.toml` and the manifest: no code travels;
- its publisher is `fedml` and its ClientApp component is `clients.app:app`, which the
  site then imports from the fedml installed at the site, never from the FAB;
- the run's model is a built-in one, or a `module:factory` the site's operator allowed
  (`fedml client --allow-model`): a factory is code installed at the site, called with
  the run's arguments;
- the message does not carry node state (`SimulatedNodesGrid`'s records): at a site the
  node's state is the site's own.

Anything else is refused with one line saying why, which the site logs and sends back as
its error reply.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Collection, Mapping
from typing import Any

import tomllib

from fedml.node_state import STATE_MARKER

CLIENTAPP = "clients.app:app"
PUBLISHER = "fedml"
ALLOWED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
BUILTIN_MODELS = frozenset({"logreg", "mlp", "cnn", "lenet", "resnet18-gn"})  # fedml.models.BUILTIN
MODEL_KEY = "model.name"  # in the flat run config
ALLOWED_MODELS_KEY = "allowed-models"  # node config: the allowed module:factory, comma-separated
MAX_FAB_BYTES = 1 << 20  # a config-only app is a few KB
MAX_FILE_BYTES = 1 << 16  # its pyproject.toml, unpacked (no zip bomb is ever inflated)


def fab_refusal(fab: bytes) -> str | None:
    """Why the app bundle `fab` is not fedml's config-only app, or None when it is."""
    if len(fab) > MAX_FAB_BYTES:
        return f"its app bundle is {len(fab)} bytes; fedml's carries only its config"
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
            names = bundle.namelist()
            extra = sorted(set(names) - ALLOWED_FILES)
            if extra:
                shown = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
                return (
                    f"its app carries files ({shown}); a fedml site runs only the fedml "
                    "installed here, and no code may come with a run"
                )
            if "pyproject.toml" not in names:
                return "its app has no pyproject.toml"
            if bundle.getinfo("pyproject.toml").file_size > MAX_FILE_BYTES:
                return "its pyproject.toml is larger than any fedml app's"
            project = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
    except Exception as exc:  # hostile bytes: encrypted, nested 20,000 deep, any damage
        return f"its app bundle is not a valid Flower app ({type(exc).__name__}: {exc})"[:300]
    app = _table(_table(project.get("tool")).get("flwr")).get("app")
    app = _table(app)
    publisher = app.get("publisher")
    if publisher != PUBLISHER:
        return f"its app comes from publisher {publisher!r}, not {PUBLISHER!r}"
    clientapp = _table(app.get("components")).get("clientapp")
    if clientapp != CLIENTAPP:
        return f"its app names ClientApp {clientapp!r}; a fedml site runs only {CLIENTAPP!r}"
    return None


def config_refusal(run_config: Mapping[str, Any], allowed_models: Collection[str]) -> str | None:
    """Why the run's config asks for something the site does not run, or None."""
    model = run_config.get(MODEL_KEY, "")
    if not isinstance(model, str) or (model not in BUILTIN_MODELS and model not in allowed_models):
        return (
            f"the run asks for model {model!r}, which is not a built-in model "
            f"({', '.join(sorted(BUILTIN_MODELS))}) nor one this site allows "
            "(fedml client --allow-model MODULE:FACTORY)"
        )
    return None


def message_refusal(record_names: Collection[str]) -> str | None:
    """Why a message with these records is not for a data site, or None."""
    if STATE_MARKER in record_names:
        return "the message carries node state, which only simulated nodes accept"
    return None


def _table(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
