"""A data site's policy: what the site agrees to do with its data, whatever a server asks.

The site's operator writes it as TOML and starts `fedml client --policy FILE`; every task
is judged against it at the site before any data is read (fedml.deploy.policy_check),
and a task that breaks a rule is refused with the rule named. What is not written is not
restricted. The file is checked strictly when it is read: an unknown section or key is
an error with the nearest known one suggested, and every value is checked for its type
and range, so a typo never silently leaves a rule out.

    [privacy]
    require = "sample"            # "none" | "sample" (DP-SGD at the site) | "user"
    min_noise_multiplier = 0.8    # DP-SGD noise, as the site derives it
    max_epsilon_per_run = 8.0     # epsilon one experiment may spend of this site's data
    max_epsilon_total = 20.0      # across every run this site ever serves
    max_delta = 1e-5              # default: 1/(10 n) rounded down to a power of ten
    min_batch_size = 16           # under DP-SGD
    [training]
    models = ["logreg", "mlp"]
    strategies = ["fedavg", "fedprox"]
    max_local_epochs = 5
    max_rounds = 100
    [aggregation]
    require_secagg = true
    [server]
    certificate_sha256 = "9f86d0..."  # the SuperLink's TLS certificate, pinned

`refusal` judges a task's facts (`TaskFacts`) against the rules that need no data;
`privacy_refusal` judges a DP-SGD round's plan against the privacy budgets.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from fedml.errors import FedmlError
from fedml.regular_files import read_bytes

DP_LEVELS = ("none", "sample", "user")
MAX_POLICY_BYTES = 1 << 16


class PolicyFileError(FedmlError):
    """The policy file itself is wrong: the site does not start (or refuses every task)."""


@dataclass(frozen=True)
class PrivacyRules:
    """[privacy]: the differential privacy the site requires and what it may spend."""

    require: str = "none"  # "none" | "sample" | "user"
    min_noise_multiplier: float | None = None
    max_epsilon_per_run: float | None = None
    max_epsilon_total: float | None = None
    max_delta: float | None = None  # None: fedml's default delta of the site's rows
    min_batch_size: int | None = None  # under DP-SGD


@dataclass(frozen=True)
class TrainingRules:
    """[training]: what the site trains, and how much per round and per run."""

    models: tuple[str, ...] = ()  # empty: any model the site builds
    strategies: tuple[str, ...] = ()  # empty: any strategy
    max_local_epochs: int | None = None
    max_rounds: int | None = None


@dataclass(frozen=True)
class AggregationRules:
    """[aggregation]: how the site's updates must reach the server."""

    require_secagg: bool = False


@dataclass(frozen=True)
class ServerRules:
    """[server]: which server the site talks to."""

    certificate_sha256: str | None = None  # hex, 64 digits, colons and case ignored


@dataclass(frozen=True)
class SitePolicy:
    """The whole policy; `SitePolicy()` restricts nothing."""

    privacy: PrivacyRules = field(default_factory=PrivacyRules)
    training: TrainingRules = field(default_factory=TrainingRules)
    aggregation: AggregationRules = field(default_factory=AggregationRules)
    server: ServerRules = field(default_factory=ServerRules)

    def summary(self) -> list[str]:
        """The rules in force, one line each (what `fedml client` prints at start)."""
        lines = []
        for section in fields(self):
            rules = getattr(self, section.name)
            for rule in fields(rules):
                value = getattr(rules, rule.name)
                if value not in (None, (), False, "none"):
                    shown = ", ".join(value) if isinstance(value, tuple) else value
                    lines.append(f"{section.name}.{rule.name} = {shown}")
        return lines or ["(no rule: the policy restricts nothing)"]


SECTIONS: dict[str, type] = {
    "privacy": PrivacyRules,
    "training": TrainingRules,
    "aggregation": AggregationRules,
    "server": ServerRules,
}


def load_policy(path: Path) -> SitePolicy:
    """Read and check the policy file at `path` (one clear error naming what is wrong)."""
    try:
        data = read_bytes(path)
    except OSError as exc:  # missing, unreadable, a FIFO or a folder
        raise PolicyFileError(f"Cannot read the policy file {path}: {exc}.") from exc
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyFileError(
            f"The policy file {path} is {len(data)} bytes; a policy is a few lines."
        )
    return parse_policy(data.decode("utf-8", errors="replace"), str(path))


def parse_policy(text: str, source: str = "the policy") -> SitePolicy:
    """The policy in TOML `text`, checked strictly (see the module docstring)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError(f"{source} is not valid TOML: {exc}.") from exc
    sections = {}
    for name, table in document.items():
        if name not in SECTIONS:
            raise PolicyFileError(f"{source}: unknown section [{name}]{_nearest(name, SECTIONS)}.")
        if not isinstance(table, dict):
            raise PolicyFileError(f"{source}: {name} must be a [{name}] table.")
        sections[name] = _section(SECTIONS[name], name, table, source)
    policy = SitePolicy(**sections)
    _check_together(policy, source)
    return policy


def _section(kind: type, name: str, table: dict[str, Any], source: str) -> Any:
    known = {f.name: f for f in fields(kind)}
    values = {}
    for key, value in table.items():
        if key not in known:
            raise PolicyFileError(
                f"{source}: unknown key {name}.{key}{_nearest(key, known, name + '.')}."
            )
        values[key] = _value(f"{name}.{key}", known[key].type, value, source)
    return kind(**values)


def _value(key: str, kind: str, value: Any, source: str) -> Any:
    """`value` checked against the field's declared type (the annotation's text)."""
    where = f"{source}: {key}"
    if kind == "bool":
        if not isinstance(value, bool):
            raise PolicyFileError(f"{where} must be true or false, got {value!r}.")
        return value
    if kind.startswith("tuple[str"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise PolicyFileError(
                f'{where} must be a list of names, e.g. ["logreg"], got {value!r}.'
            )
        return tuple(value)
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PolicyFileError(f"{where} must be a number, got {value!r}.")
        if not math.isfinite(value) or value <= 0:
            raise PolicyFileError(f"{where} must be a finite number > 0, got {value!r}.")
        return float(value)
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PolicyFileError(f"{where} must be a whole number >= 1, got {value!r}.")
        return value
    if not isinstance(value, str):  # str and "str | None"
        raise PolicyFileError(f"{where} must be text, got {value!r}.")
    if key == "privacy.require" and value not in DP_LEVELS:
        raise PolicyFileError(
            f"{where} must be one of {', '.join(DP_LEVELS)}, got {value!r}"
            f"{_nearest(value, DP_LEVELS)}."
        )
    if key == "server.certificate_sha256":
        return certificate_digest(value, where)
    return value


def _check_together(policy: SitePolicy, source: str) -> None:
    privacy = policy.privacy
    if privacy.max_delta is not None and privacy.max_delta >= 1:
        raise PolicyFileError(
            f"{source}: privacy.max_delta must be below 1, got {privacy.max_delta}."
        )
    run, total = privacy.max_epsilon_per_run, privacy.max_epsilon_total
    if run is not None and total is not None and run > total:
        raise PolicyFileError(
            f"{source}: privacy.max_epsilon_per_run ({run}) is above privacy.max_epsilon_total "
            f"({total}); a run can never spend more than the site's total."
        )


def certificate_digest(text: str, where: str = "the certificate fingerprint") -> str:
    """A SHA-256 fingerprint as 64 lower-case hex digits (colons, blanks and a "sha256:"
    prefix, as `openssl x509 -fingerprint -sha256` prints it, are accepted)."""
    digits = re.sub(
        r"[\s:]", "", text.lower().removeprefix("sha256:").removeprefix("sha256 fingerprint=")
    )
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        raise PolicyFileError(
            f"{where} must be a SHA-256 fingerprint (64 hex digits), got {text!r}. Print it "
            "with: openssl x509 -in superlink.crt -noout -fingerprint -sha256"
        )
    return digits


def _nearest(word: str, known: Any, prefix: str = "") -> str:
    match = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {prefix}{match[0]}?)" if match else ""


# --------------------------------------------------------------------------- judging
@dataclass(frozen=True)
class TaskFacts:
    """What a task asks of the site, read from its run config and message (no data)."""

    kind: str  # "train" (a training round), "evaluate", "statistics", "step" (secagg), "other"
    model: str
    strategy: str
    rounds: int  # the run's planned rounds
    server_round: int  # the round the message names (0: none)
    dp_mode: str  # the run config's dp.mode
    secagg: bool  # the run config's secagg.enabled
    masked: bool  # the message asks for a masked (secure aggregation) reply
    implied: tuple[str, ...] = ()  # strategies the message's training implies beyond the run's
    epochs: int = 0  # the round's local training in epochs (local steps: rounded up)
    work: str = ""  # the same, as the message asks it ("3 epochs", "40 steps (2 epochs)")
    batch_size: int = 0


def refusal(policy: SitePolicy, task: TaskFacts) -> str | None:
    """The first rule `task` breaks, in words naming the rule; None when it keeps them
    all (the privacy budgets aside: `privacy_refusal`). Rules on the run apply to every
    message of it; rules on a round's training to training messages only."""
    training, privacy = policy.training, policy.privacy
    secagg_rule = "aggregation.require_secagg"
    if training.models and task.model not in training.models:
        return _broken(
            "training.models",
            f"the run's model {task.model!r} is not one of {list(training.models)}",
        )
    for strategy in (task.strategy, *task.implied):
        if training.strategies and strategy not in training.strategies:
            return _broken(
                "training.strategies",
                f"the run trains as strategy {strategy!r}, not one of {list(training.strategies)}",
            )
    most = training.max_rounds
    if most is not None and max(task.rounds, task.server_round) > most:
        return _broken(
            "training.max_rounds",
            f"the run plans {task.rounds} rounds (this is round {task.server_round}); at "
            f"most {most}",
        )
    required = {"sample": ("sample",), "user": ("user-fixed", "user-adaptive")}
    if privacy.require in required and task.dp_mode not in required[privacy.require]:
        return _broken(
            "privacy.require",
            f"the site requires dp.mode {' or '.join(required[privacy.require])}; the run "
            f"has dp.mode = {task.dp_mode!r}",
        )
    if policy.aggregation.require_secagg and not task.secagg:
        return _broken(secagg_rule, "the run does not use secure aggregation")
    unmasked = task.kind in ("train", "statistics") and not task.masked
    if policy.aggregation.require_secagg and unmasked:
        return _broken(
            secagg_rule,
            "the message asks for an unmasked reply; this site sends its update and its "
            "statistics only masked",
        )
    if task.kind not in ("train", "evaluate"):  # an evaluation may fine-tune (epochs)
        return None
    if training.max_local_epochs is not None and task.epochs > training.max_local_epochs:
        return _broken(
            "training.max_local_epochs",
            f"the round asks for {task.work} of local training; at most "
            f"{training.max_local_epochs} epochs",
        )
    smallest = privacy.min_batch_size
    private = task.kind == "train" and task.dp_mode == "sample"
    if private and smallest is not None and task.batch_size < smallest:
        return _broken(
            "privacy.min_batch_size",
            f"the round asks for batches of {task.batch_size} under DP-SGD; at least {smallest}",
        )
    return None


def privacy_refusal(
    policy: SitePolicy,
    noise_multiplier: float,
    delta: float,
    run_epsilon: tuple[float, float],
    total_epsilon: tuple[float, float],
    site_delta: float,
) -> str | None:
    """The first privacy rule a DP-SGD round breaks: its noise, its delta, or a budget
    it would cross. `run_epsilon` and `total_epsilon` are (spent, after this round) for
    this experiment and over the site's lifetime, at `site_delta`, as the site's own
    ledger computes them."""
    privacy = policy.privacy
    floor = privacy.min_noise_multiplier
    if floor is not None and noise_multiplier < floor:
        return _broken(
            "privacy.min_noise_multiplier",
            f"the round's noise multiplier is {noise_multiplier:.4g}; at least {floor:g}",
        )
    if privacy.max_delta is not None and delta > privacy.max_delta:
        return _broken(
            "privacy.max_delta", f"the run's delta is {delta:g}; at most {privacy.max_delta:g}"
        )
    budgets = (
        ("privacy.max_epsilon_per_run", privacy.max_epsilon_per_run, run_epsilon, "this run's"),
        ("privacy.max_epsilon_total", privacy.max_epsilon_total, total_epsilon, "the site's total"),
    )
    for rule, limit, (spent, after), what in budgets:
        if limit is not None and after > limit:
            return _broken(
                rule,
                f"this round would raise {what} epsilon from {spent:.4g} to {after:.4g} "
                f"(delta {site_delta:g}); at most {limit:g}",
            )
    return None


def _broken(rule: str, why: str) -> str:
    return f"refused by the site's policy ({rule}): {why}"
