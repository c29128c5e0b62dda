"""What the round loop asks of the parts it drives, written as `Protocol`s.

The round loop (`fedml.server`) works with any Flower `Strategy` and any Flower `Grid`.
Some of them can do more, and the loop uses that when they can; these protocols name
each such capability, so the loop asks `isinstance(part, Capability)` instead of probing
attribute names, and a plugin author can see (and type-check) what to implement.
Nothing here has to be inherited: a class that has the members qualifies.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeGuard, runtime_checkable

from flwr.app import ArrayRecord, RecordDict


class Stateful(Protocol):
    """A part whose state decides later rounds: the run store commits `state_dict()`
    with every round and a resumed run calls `load_state_dict()` with it. Values are
    JSON values, NumPy arrays or ArrayRecords (see `fedml.statefile`)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def is_stateful(part: object) -> TypeGuard[Stateful]:
    """Whether `part` is `Stateful`: both methods present and callable. Asked with
    `getattr`, not `isinstance`: a wrapper that forwards them through `__getattr__`
    qualifies on every Python version (3.12's runtime protocol check would not see
    them), and an attribute that merely has the name does not."""
    return all(callable(getattr(part, name, None)) for name in ("state_dict", "load_state_dict"))


@runtime_checkable
class NodeStateGrid(Protocol):
    """A grid that keeps each node's `Context.state` for it (the in-process engine, the
    Ray engine's `SimulatedNodesGrid`): the run store commits the states with every
    round, so a simulated client's privacy ledger survives a resume. A deployed site
    keeps its own state; Flower's grid for real SuperNodes is not one of these."""

    def node_states(self) -> dict[int, RecordDict]: ...

    def load_node_states(self, states: dict[int, RecordDict]) -> None: ...


class Proximal(Protocol):
    """A strategy with FedProx's proximal term: the history row records its mu, and
    `strategy.adaptive_mu` (fedml.controls.AdaptiveMu) changes it between rounds. The
    strategy is the only owner of the value."""

    proximal_mu: float


def is_proximal(strategy: object) -> TypeGuard[Proximal]:
    """Whether `strategy` is `Proximal`. Asked with `hasattr`, not `isinstance`: the
    user-level DP wrapper forwards `proximal_mu` with a property that raises when its
    inner strategy has none, and Python 3.12's runtime protocol check does not run
    properties."""
    return hasattr(strategy, "proximal_mu")


@runtime_checkable
class Retractable(Protocol):
    """A strategy that changes its own state while aggregating (a server optimiser's
    moments): `discard_attempt()` undoes what the last attempt changed when the round
    loop rolls that attempt back (too few replies, a diverged loss)."""

    def discard_attempt(self) -> None: ...


@runtime_checkable
class SecureReleaser(Protocol):
    """A strategy that releases what secure aggregation unmasked itself: client-level
    DP adds its noise to the mean of the sites' clipped updates (each site clipped its
    own) and accounts the release, where it would otherwise do so in `aggregate_train`."""

    def release_secure_mean(self, mean: ArrayRecord, answered: int) -> ArrayRecord: ...


def keeps_partial_work(strategy: object) -> bool:
    """Whether the strategy aggregates stragglers' partial work (FedProx) or drops it
    (FedAvg, and any strategy that does not say: the safe default). A class attribute
    `keeps_partial_work = True` says so."""
    return bool(getattr(strategy, "keeps_partial_work", False))
