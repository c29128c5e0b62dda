"""The floor plan: imports point down the layers of ARCHITECTURE.md, and never in a cycle.

Every module of the four packages belongs to exactly one layer. A module may import
modules of its own group and of any lower layer; the groups of one layer are independent
of each other (strategies never import clients, and the other way round). Function-local
imports count like top-level ones (they are edges all the same); imports under
`if TYPE_CHECKING:` count too, so type hints cannot hide an upward edge either.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedml", "strategies", "clients", "simulations")

# Top to bottom. Each layer is a list of groups; a group is a list of modules, where
# "pkg.*" stands for a package and everything in it (a new module there is placed by it).
LAYERS: list[tuple[str, list[list[str]]]] = [
    ("entry", [["fedml.cli"]]),
    ("views", [["fedml.progress", "fedml.report", "fedml.runs_view", "fedml.trackers"]]),
    (
        "engines",
        [
            ["simulations.engine", "simulations.inprocess", "simulations.ray_engine"],
            [
                "fedml.deploy.server",
                "fedml.deploy.client",
                "fedml.deploy.site_executor",
                "fedml.deploy.site_task",
            ],
            ["simulations.presets"],
        ],
    ),
    (
        "deployment plumbing",
        [
            [
                "fedml.deploy.launch",
                "fedml.deploy.front",
                "fedml.deploy.front_guard",
                "fedml.deploy.processes",
                "fedml.deploy.flower_runtime",
                "fedml.deploy.app_check",
                "fedml.deploy.site_state",
                "fedml.deploy.site_audit",
                "fedml.deploy.policy_check",
                "fedml.deploy",  # the package's own __init__ only
                "fedml.pki",
            ]
        ],
    ),
    (
        "round loop",
        [
            [
                "fedml.server",
                "fedml.controls",
                "fedml.components",
                "fedml.secure_round",
                "fedml.preprocessing",
                "fedml.site_results",
                "fedml.reply_stream",
                "fedml.run_audit",
            ]
        ],
    ),
    (
        "parts",
        [
            ["strategies.*"],
            ["clients.*"],
            [
                "simulations",  # the package's own __init__ (a docstring)
                "simulations.scenarios",
                "simulations.virtual_nodes",
                "simulations.flower_internals",
            ],
        ],
    ),
    (
        "core",
        [
            [
                "fedml",  # the package's own __init__: FedmlError and the version
                "fedml.errors",
                "fedml.regular_files",
                "fedml.failures",
                "fedml.arrays",
                "fedml.statefile",
                "fedml.records",
                "fedml.node_state",
                "fedml.monitor",
                "fedml.config",
                "fedml.settings",
                "fedml.contracts",
                "fedml.data.*",
                "fedml.models",
                "fedml.privacy",
                "fedml.validation",
                "fedml.metrics",
                "fedml.runstore.*",
                "fedml.secagg.*",
                "fedml.audit",
                "fedml.site_policy",
                "fedml.privacy_ledger",
            ]
        ],
    ),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(name: str, path: Path, typing_too: bool) -> set[str]:
    """Every module of our packages that `name` imports, wherever the import sits; with
    `typing_too`, also those imported only under `if TYPE_CHECKING:` (never run)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If)
        and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for statement in node.body
        for inner in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only and not typing_too:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            # `from package import module` imports that submodule
            targets.update(f"{module}.{alias.name}" for alias in node.names)
    return {t for t in targets if t.split(".")[0] in PACKAGES}


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The module `target` names (`from fedml.config import RunConfig` -> fedml.config)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _matches(module: str, entry: str) -> bool:
    package = entry.removesuffix(".*")
    return module == package or (entry.endswith(".*") and module.startswith(package + "."))


def _place(module: str) -> tuple[int, int]:
    """(layer index, group index) of `module`."""
    places = [
        (layer, group)
        for layer, (_, groups) in enumerate(LAYERS)
        for group, entries in enumerate(groups)
        if any(_matches(module, entry) for entry in entries)
    ]
    assert places, f"{module} belongs to no layer: add it to LAYERS and ARCHITECTURE.md"
    assert len(places) == 1, f"{module} is placed twice in LAYERS"
    return places[0]


def _graph(typing_too: bool) -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        resolved = {_resolve(t, modules) for t in _imports(name, path, typing_too)}
        targets = {t for t in resolved if t is not None and t != name}
        # importing `a.b.c` runs the packages `a` and `a.b` first (except those that are
        # already running because they contain `name`)
        graph[name] = targets | {
            parent
            for target in targets
            for parent in _parents(target)
            if parent in modules and not name.startswith(parent + ".")
        }
    return graph


def test_every_import_points_down_or_stays_in_its_group():
    upward = []
    for module, targets in sorted(_graph(typing_too=True).items()):
        layer, group = _place(module)
        for target in sorted(targets):
            target_layer, target_group = _place(target)
            if target_layer < layer or (target_layer == layer and target_group != group):
                upward.append(
                    f"{module} ({LAYERS[layer][0]}) imports {target} ({LAYERS[target_layer][0]})"
                )
    assert upward == []


def test_no_import_cycle_between_modules():
    """Tarjan's strongly connected components: any component of two or more modules is a
    cycle, whether Python tolerates it today (a function-local import) or not. Imports
    under `if TYPE_CHECKING:` never run and are left out here (the layer test sees them)."""
    graph = _graph(typing_too=False)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert cycles == []


def test_architecture_md_puts_every_module_in_its_layer():
    """ARCHITECTURE.md is the page a newcomer reads first: its layer table names every
    entry of LAYERS in that layer's row, and the test fails when the two disagree."""
    rows = {
        line.split("|")[1].strip(): line
        for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines()
        if line.startswith("| ")
    }
    modules = set(_modules())
    for layer, groups in LAYERS:
        assert layer in rows, f"ARCHITECTURE.md has no row for the layer '{layer}'"
        for entries in groups:
            for entry in entries:
                package = entry.removesuffix(".*")
                if package in modules:
                    assert f"`{package}`" in rows[layer], f"{package} is not in the row {layer}"
