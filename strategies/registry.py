"""Strategy names -> classes (built-ins, plugins, `module:Class`), and construction.

A strategy is any subclass of Flower's `flwr.serverapp.strategy.Strategy` (ours included).
It is found by

- a built-in name (`BUILTIN`),
- a plugin name: an installed package registers it under the entry-point group
  `fedml.strategies` (`[project.entry-points."fedml.strategies"]`,
  `my-strategy = "my_package.module:MyStrategy"`), or
- a direct reference `my_package.module:MyStrategy` (nothing to install).

It is built with keyword arguments: the sampling settings of `[strategy]` it accepts
(`fraction_train`, `fraction_evaluate`, `min_train_nodes`, `min_evaluate_nodes`,
`min_available_nodes`, `seed`, `proximal_mu`) and every other key of `[strategy]` (the
strategy's own options, all of which it must accept). A strategy that keeps state across
rounds offers `state_dict()`/`load_state_dict()` so a resumed run restores it; without
them resume still works and logs that the strategy's internal state restarts.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedml.config import RunConfig
from fedml.errors import FedmlError
from strategies.catalog import CATALOG, CatalogAdapter
from strategies.user_dp import wrap_user_dp

ENTRY_POINT_GROUP = "fedml.strategies"

BUILTIN: dict[str, str] = {
    "fedavg": "strategies.fedavg:FedAvg",
    "fedprox": "strategies.fedprox:FedProx",
    "scaffold": "strategies.scaffold:Scaffold",
    **CATALOG,
}


@dataclass(frozen=True)
class StrategyEntry:
    """One strategy that `--strategy NAME` can use: where its class lives and whence."""

    name: str
    reference: str  # "module:Class"
    origin: str  # "built-in" or "plugin (<distribution>)"

    def load(self) -> type[Strategy]:
        return load_reference(self.reference, self.name)


def available() -> dict[str, StrategyEntry]:
    """Every strategy name: the built-ins, then installed plugins (a plugin cannot take
    a built-in's name)."""
    found = {name: StrategyEntry(name, ref, "built-in") for name, ref in BUILTIN.items()}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name not in found:
            distribution = point.dist.name if point.dist is not None else "unknown package"
            found[point.name] = StrategyEntry(point.name, point.value, f"plugin ({distribution})")
    return found


def summary(cls: type) -> str:
    """The first paragraph of a strategy class's docstring, on one line."""
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())


def resolve(name: str) -> type[Strategy]:
    """The strategy class that `name` (a registered name or `module:Class`) refers to."""
    if ":" in name:
        return load_reference(name, name)
    entries = available()
    entry = entries.get(name.lower())
    if entry is None:
        close = difflib.get_close_matches(name.lower(), entries, n=2)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise FedmlError(
            f"Unknown strategy '{name}'.{hint} Available: {', '.join(entries)} "
            "(`fedml strategies` lists them), or give a 'module:Class' reference."
        )
    return entry.load()


def load_reference(reference: str, shown: str) -> type[Strategy]:
    """Import `module:Class` and check that it is a Flower Strategy class."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise FedmlError(f"Strategy '{shown}': '{reference}' is not a 'module:Class' reference.")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is the user's to fix
        raise FedmlError(
            f"Strategy '{shown}': module '{module_name}' cannot be imported "
            f"({type(exc).__name__}: {exc}). Install it or put it on PYTHONPATH."
        ) from exc
    cls = getattr(module, attr, None)
    if cls is None:
        raise FedmlError(f"Strategy '{shown}': module '{module_name}' has no '{attr}'.")
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise FedmlError(
            f"Strategy '{shown}': {reference} is not a subclass of "
            "flwr.serverapp.strategy.Strategy. A strategy plugin must subclass Flower's "
            "Strategy (or fedml's FedAvg/FedProx)."
        )
    return cls


def accepted_arguments(cls: type) -> tuple[set[str], bool]:
    """The keyword arguments `cls(...)` accepts, following `**kwargs` up the class
    hierarchy; and whether it takes any keyword at all (a `**kwargs` no base consumes)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {
            p.name
            for p in params
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names, False
    return names, True


def strategy_arguments(cfg: RunConfig, cls: type) -> dict[str, Any]:
    """The keyword arguments to build `cls` with (see the module docstring)."""
    s = cfg.strategy
    standard: dict[str, Any] = {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_train_nodes": s.min_train_clients,
        "min_evaluate_nodes": s.min_evaluate_clients if s.fraction_evaluate > 0 else 0,
        "min_available_nodes": 1,
        "seed": cfg.seed,
        "proximal_mu": s.proximal_mu,
    }
    accepted, takes_any = accepted_arguments(cls)
    rejected = [key for key in s.options if key not in accepted and not takes_any]
    if rejected:
        hints = []
        for key in rejected:
            close = difflib.get_close_matches(key, sorted(accepted), n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise FedmlError(
            f"Strategy '{s.name}' ({cls.__module__}.{cls.__qualname__}) does not accept "
            f"{', '.join(hints)} from [strategy]. It accepts: "
            f"{', '.join(sorted(accepted)) or 'no keyword arguments'}."
        )
    _check_option_values(s.name, cls, s.options)
    _check_byzantine_quorum(s.name, cls, s.options, cfg.simulation.clients)
    kwargs = {k: v for k, v in standard.items() if k in accepted or takes_any}
    kwargs.update(s.options)
    return kwargs


def _check_option_values(name: str, cls: type, options: dict[str, Any]) -> None:
    """A catalog (Flower) strategy's options must have the type of the parameter's
    default, and numbers must be finite and >= 0 (counts, rates, fractions: every numeric
    parameter of Flower's strategies): `num_malicious_nodes = -5` is an error before
    the run starts, not a silent no-op. Plugins check their own options."""
    if not issubclass(cls, CatalogAdapter):
        return
    defaults = _parameter_defaults(cls)
    for key, value in options.items():
        default = defaults.get(key)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise FedmlError(
                    f"[strategy] {key} for '{name}' must be true or false, not {value!r}."
                )
        elif isinstance(default, int | float):
            wants = "a whole number" if isinstance(default, int) else "a number"
            number = not isinstance(value, bool) and isinstance(value, int | float)
            whole = isinstance(value, int) or not isinstance(default, int)
            if not (number and whole and math.isfinite(value) and value >= 0):
                raise FedmlError(
                    f"[strategy] {key} for '{name}' must be {wants} >= 0 (default "
                    f"{default}), not {value!r}."
                )


def _check_byzantine_quorum(name: str, cls: type, options: dict[str, Any], clients: int) -> None:
    """Krum and Bulyan resist f Byzantine clients only when a round has enough replies
    (`BYZANTINE_QUORUM`); a federation that can never have them is an error before the
    run starts, not a strategy that silently guarantees nothing."""
    quorum = getattr(cls, "BYZANTINE_QUORUM", None)
    malicious = options.get("num_malicious_nodes", 0)
    if quorum is None or not malicious:
        return
    needed = quorum[0] * malicious + quorum[1]
    if needed > clients:
        raise FedmlError(
            f"[strategy] num_malicious_nodes = {malicious} for '{name}' needs at least "
            f"{needed} clients a round ({quorum[0]} x {malicious} + {quorum[1]}); the "
            f"federation has {clients}. Lower num_malicious_nodes to at most "
            f"{max(0, (clients - quorum[1]) // quorum[0])}."
        )


def _parameter_defaults(cls: type) -> dict[str, Any]:
    """Each keyword parameter's default along the `__init__`s of `cls`'s hierarchy."""
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for param in inspect.signature(init).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                defaults[param.name] = param.default
    return defaults


def build_strategy(cfg: RunConfig, reproducible: bool = True) -> Strategy:
    """The strategy `cfg.strategy.name` names, configured from the run config; with
    client-level DP (`dp.mode = "user-*"`), inside Flower's DP wrapper. `reproducible`
    lets that wrapper's noise follow the run seed (simulation only: see user_dp.py)."""
    cls = resolve(cfg.strategy.name)
    try:
        strategy = cls(**strategy_arguments(cfg, cls))
    except FedmlError:
        raise
    except Exception as exc:  # a plugin's constructor refusing its options
        raise FedmlError(
            f"Strategy '{cfg.strategy.name}' could not be built from [strategy] "
            f"({type(exc).__name__}: {exc})."
        ) from exc
    if cfg.dp.mode.startswith("user"):
        return wrap_user_dp(strategy, cfg, reproducible)
    return strategy
