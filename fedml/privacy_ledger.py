"""Privacy ledgers: what a client has spent, the plan of its next DP-SGD round, and a
data site's ledger file.

A `PrivacyLedger` is one client's spending in one experiment: the Opacus accountant's
history of (noise multiplier, sample rate, steps) over the rounds it trained in. In
simulation it lives in the node's `Context.state` (clients/privacy.py).

A data site keeps a `SiteLedger` in its state folder (`privacy-ledger.json`, the node
config's "privacy-ledger"): one `PrivacyLedger` per experiment it served, keyed by the
experiment's digest (`fedml.config.experiment_digest`: a resumed run continues its own,
another experiment starts its own). An experiment's epsilon is what the site reports to
that run's server; the site's lifetime epsilon is that of all its experiments' histories
together (composition), which the site's policy may cap (fedml.site_policy). The file is
rewritten atomically after every round, read under an exclusive lock (`locked`) from
the moment a task is judged until its spending is written, so two runs training at one
site at once cannot both spend the last of its budget. A damaged file is an error, never
a fresh start. Format 1 (one lifetime history, before experiments were kept apart) is
read as one experiment of its own.

This module is NumPy- and PyTorch-free: a site judges a task before it loads anything.
"""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord

from fedml.errors import FedmlError
from fedml.privacy import HistoryEntry, epsilon_of, planned_delta, planned_noise, with_steps
from fedml.regular_files import read_bytes
from fedml.runstore import atomic_write
from fedml.settings import TrainSettings

if TYPE_CHECKING:
    from fedml.config import DPConfig

LEDGER_FORMAT = 2
FORMAT_1_RUN = "before-format-2"  # the experiment a format 1 file's history becomes


@dataclass
class PrivacyLedger:
    """What one client has spent: the accountant history and the rounds it trained in.

    `noise_multiplier` is the noise of its latest round; with a target epsilon, that is
    the noise derived at its first training, which later rounds (and a resumed run) reuse
    so that the plan holds.
    """

    history: list[HistoryEntry] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    noise_multiplier: float = 0.0

    def epsilon(self, accountant: str, delta: float) -> float:
        """Epsilon spent so far, at `delta`, by Opacus's `accountant` ("rdp"/"prv")."""
        return epsilon_of(tuple(self.history), accountant, delta)

    def projected(self, noise: float, sample_rate: float, steps: int) -> list[HistoryEntry]:
        """The history after `steps` more steps, merged as Opacus's accountant does."""
        return with_steps(self.history, noise, sample_rate, steps)

    # -- persistence ----------------------------------------------------------------------
    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "noise": [float(n) for n, _, _ in self.history],
                "sample-rate": [float(q) for _, q, _ in self.history],
                "steps": [int(s) for _, _, s in self.history],
                "rounds": [int(r) for r in self.rounds],
                "noise-multiplier": float(self.noise_multiplier),
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> PrivacyLedger:
        history = zip(record["noise"], record["sample-rate"], record["steps"], strict=True)
        return cls(
            history=[(float(n), float(q), int(s)) for n, q, s in history],
            rounds=[int(r) for r in record["rounds"]],
            noise_multiplier=float(record["noise-multiplier"]),
        )

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "history": [list(entry) for entry in self.history],
            "rounds": self.rounds,
            "noise_multiplier": self.noise_multiplier,
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        history = [(float(n), float(q), int(s)) for n, q, s in data["history"]]
        return cls(history, [int(r) for r in data["rounds"]], float(data["noise_multiplier"]))


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RoundPlan:
    """One client's DP-SGD round: the noise, Poisson sample rate, steps, and epsilons."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_after: float
    history_before: tuple[HistoryEntry, ...]
    history_after: tuple[HistoryEntry, ...]


def plan_round(
    dp: DPConfig,
    ledger: PrivacyLedger,
    num_examples: int,
    settings: TrainSettings,
    planned_rounds: int,
) -> RoundPlan:
    """What this round will spend. Opacus samples each batch with probability
    q = 1 / ceil(n / batch_size) and takes ceil(n / batch_size) steps per epoch. With a
    target epsilon the noise is derived for `planned_rounds` rounds at the client's first
    training and read back from the ledger afterwards."""
    batches = math.ceil(num_examples / settings.batch_size)
    sample_rate, steps = 1.0 / batches, settings.local_epochs * batches
    delta = planned_delta(dp, num_examples)
    derived = ledger.noise_multiplier if dp.target_epsilon > 0 else None  # kept once derived
    noise = derived or planned_noise(dp, delta, sample_rate, planned_rounds * steps)
    after = tuple(ledger.projected(noise, sample_rate, steps))
    return RoundPlan(
        noise_multiplier=noise,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        epsilon_after=epsilon_of(after, dp.accountant, delta),
        history_before=tuple(ledger.history),
        history_after=after,
    )


# --------------------------------------------------------------------- a site's file
@dataclass
class SiteLedger:
    """A data site's spending, one `PrivacyLedger` per experiment (in first-spent order)."""

    runs: dict[str, PrivacyLedger] = field(default_factory=dict)

    def run(self, experiment: str) -> PrivacyLedger:
        """The experiment's ledger (a fresh one before it first trained here)."""
        return self.runs.get(experiment, PrivacyLedger())

    def lifetime(
        self, experiment: str = "", history: tuple[HistoryEntry, ...] = ()
    ) -> tuple[HistoryEntry, ...]:
        """Every experiment's history together; with `experiment`, its history replaced
        by `history` (a round's projection)."""
        entries: list[HistoryEntry] = []
        for key, ledger in self.runs.items():
            if key != experiment:
                entries.extend(ledger.history)
        entries.extend(history if experiment else ())
        return tuple(entries)

    @classmethod
    def load(cls, path: Path) -> SiteLedger:
        """The site's ledger file (empty when there is none yet)."""
        if not path.exists():
            return cls()
        try:
            data = json.loads(read_bytes(path))
            if data.get("format") == 1:
                return cls({FORMAT_1_RUN: PrivacyLedger.from_json_dict(data)})
            if data.get("format") != LEDGER_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {LEDGER_FORMAT}")
            return cls({str(k): PrivacyLedger.from_json_dict(v) for k, v in data["runs"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FedmlError(
                f"Privacy ledger {path} is unreadable ({exc}). It records what this site "
                "has spent, so it is never replaced silently: restore it from a backup, "
                "or move it away only if this site's data has never been trained on."
            ) from exc

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        runs = {key: ledger.to_json_dict() for key, ledger in self.runs.items()}
        atomic_write(path, json.dumps({"format": LEDGER_FORMAT, "runs": runs}, indent=1).encode())


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the site ledger `path`'s lock (`path` + ".lock", exclusive, blocking): from
    judging a task to writing what it spent. Not re-entrant."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
