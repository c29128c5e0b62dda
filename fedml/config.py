"""One typed run configuration: TOML file, CLI overrides, validation.

A run is described by `RunConfig`, a tree of small dataclasses. It is loaded from a TOML
file (sections `[data]`, `[model]`, `[strategy]`, `[client]`, `[simulation]`,
`[validation]`, `[participation]`, `[server]`, `[guard]`, `[stop]`, `[dp]`, `[checkpoint]` and
top-level keys), overridden by CLI flags given as dotted keys
(`client.lr`), and validated in one place. Every problem raises `FedmlError` naming the
key, the bad value and the fix.

Flower passes run configuration as a flat `UserConfig` (`{"client.lr": 0.1, ...}`);
`to_flat()` / `from_flat()` convert, so the same config reaches the ServerApp whether the
run is started by `fedml simulate` or by `flwr run`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w
import tomllib

from fedml import regular_files
from fedml.data.datasets import natural_clients
from fedml.data.partition import parse_partition
from fedml.errors import FedmlError
from fedml.monitor import RECORDED_METRICS, TEST_SOURCE, Target

DATASETS = (
    "digits", "mnist-5k", "breast-cancer", "fed-heart-disease", "synthetic", "npz:<dir>",
    "csv:<dir>",
)  # fmt: skip
PREPROCESS = ("auto", "standardize", "none")
# The datasets that are a folder on this machine, and what it must hold.
FOLDER_DATASETS = {
    "npz:": "client-<i>.npz shards (or, for fedml server, just test.npz)",
    "csv:": "one CSV file per site (or, for fedml server, just test.csv)",
}
MAX_FINE_TUNE_EPOCHS = 1000
MAX_LOCAL_STEPS = 1_000_000
PERSONAL_MODES = ("none", "ditto", "fedper")
MAX_DITTO_LAMBDA = 100.0  # Ditto tunes lambda in 0.01 .. 2; far above, SGD on v diverges
# The built-in models (fedml.models.BUILTIN, which imports torch; a test keeps them equal).
MODELS = ("logreg", "mlp", "cnn", "lenet", "resnet18-gn")
OPTIMIZERS = ("sgd", "adam")
ENGINES = ("inprocess", "ray")
DP_MODES = ("off", "sample", "user-fixed", "user-adaptive")
ACCOUNTANTS = ("rdp", "prv")
# Opacus's per-example gradient engines that fedml offers ("auto": see
# clients.privacy.resolve_grad_sample_mode). Opacus's "ew" (expanded weights) is left out: it
# fails on the empty batches that Poisson sampling draws.
GRAD_SAMPLE_MODES = ("auto", "hooks", "ghost", "functorch")

# Flower run-config keys that are not RunConfig keys. `fedml server --resume` and
# `fedml simulate --engine ray --resume` set RESUME_KEY to tell the ServerApp to continue
# the run directory `out` from its newest commit; the Ray engine sets SIMULATED_KEY to
# tell it that its nodes are Flower's simulated SuperNodes (see simulations/virtual_nodes).
MAX_SEED = 2**32 - 1  # scikit-learn's random_state takes no larger seed
RESUME_KEY = "deploy.resume"
SIMULATED_KEY = "deploy.simulated"

# A deployed run's config travels to every site, so its server-side paths do not: `fedml
# server` sends these keys as the placeholders below and hands the ServerApp the real
# values in the environment variable SERVER_LOCAL_ENV (JSON), which its SuperLink passes
# on to the ServerApp process and to nothing else. A site needs neither: its data is its
# own `--data`.
SERVER_LOCAL_ENV = "FEDML_SERVER_LOCAL"
SERVER_LOCAL = {"out": "server-side", "data.dataset": "npz:server-side"}


@dataclass
class DataConfig:
    """Which data, how it is split across clients, what is held out."""

    dataset: str = "digits"
    partition: str = "auto"
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    # "auto": standardise tabular features (and impute missing values) with statistics
    # gathered across the sites (fedml.preprocessing); "standardize"; "none".
    preprocess: str = "auto"
    label_column: str = "label"  # the label column of csv:<dir> site files


@dataclass
class ModelConfig:
    """Which model the federation trains."""

    name: str = "mlp"
    hidden: int = 64


@dataclass
class StrategyConfig:
    """Aggregation strategy and client sampling. `name` is a built-in strategy, a plugin
    registered under the entry-point group `fedml.strategies`, or `module:Class`. Keys of
    `[strategy]` that are not fields here are the strategy's own keyword arguments
    (`options`), checked against its constructor when it is built."""

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_clients: int = 2
    min_evaluate_clients: int = 2
    proximal_mu: float = 0.01
    adaptive_mu: bool = False
    mu_step: float = 0.1
    mu_patience: int = 5
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientConfig:
    """Local training at each client; sent to clients in every train message."""

    local_epochs: int = 2
    # > 0: each round is this many optimiser steps (minibatches, reshuffled at every pass
    # over the rows) instead of `local_epochs` passes: every site does the same work
    # whatever its size (FLamby's protocol)
    local_steps: int = 0
    batch_size: int = 32
    lr: float = 0.1
    lr_decay: float = 1.0
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    device: str = "auto"
    # > 0: at every evaluation each site also fine-tunes the global model on its own
    # training rows for this many epochs and reports that personal model's metrics
    # beside the global model's (the personal model never leaves the site)
    fine_tune_epochs: int = 0
    # a personal model each site keeps (clients/personal.py; it never leaves the site):
    # "none", "ditto" (trained every round towards the global model with strength
    # `ditto_lambda`) or "fedper" (the site's own last layer under the shared body)
    personal: str = "none"
    ditto_lambda: float = 1.0


@dataclass
class SimulationConfig:
    """How the federation is simulated on one machine."""

    engine: str = "inprocess"
    clients: int = 10
    stragglers: float = 0.0
    dropout: float = 0.0
    # Ray engine only: resources each ClientApp reserves (a GPU fraction lets several
    # clients share one device), and the address of a Ray cluster to join ("": start one).
    num_cpus: int = 1
    num_gpus: float = 0.0
    ray_address: str = ""


@dataclass
class ValidationConfig:
    """Screening of client updates before aggregation (see fedml/validation.py):
    reject an update whose norm exceeds `norm_factor` x the round's median (0: off);
    clip accepted updates to L2 norm `clip_norm` (0: off); cap a reply's weight (its
    `num-examples`) at `max_weight_factor` x the previous round's median claim (0:
    off)."""

    norm_factor: float = 10.0
    clip_norm: float = 0.0
    max_weight_factor: float = 10.0


@dataclass
class ParticipationConfig:
    """When a round counts: at least `min_replies` updates aggregated, replies arriving
    within `timeout` seconds (0: wait for all). Too few: `on_too_few` = retry (up to
    `max_retries`, then stop), skip (keep the global model, go on) or stop."""

    min_replies: int = 1
    timeout: float = 0.0
    on_too_few: str = "retry"
    max_retries: int = 2


@dataclass
class ServerOptConfig:
    """Server-side optimiser on the aggregated update (FedAvgM): w += lr * v with
    v = momentum * v + (aggregate - w). lr 1, momentum 0 is plain averaging."""

    lr: float = 1.0
    momentum: float = 0.0


@dataclass
class GuardConfig:
    """Divergence guard: a round whose `metric` ("auto": server, else federated, else
    train loss) is NaN/inf or above `factor` x the best loss (0: NaN/inf only) is rolled
    back and retried with the client lr multiplied by `lr_factor`, at most
    `max_retries` times per round; then the run stops ("diverged")."""

    metric: str = "auto"
    factor: float = 10.0
    lr_factor: float = 0.5
    max_retries: int = 3


@dataclass
class StopConfig:
    """When to stop before `rounds`: early stopping on `metric` ("" off; mode max/min/
    auto) after `patience` rounds without an improvement above `min_delta`, restoring
    the best round's model at the end when `restore_best`; a `target` such as
    "server.accuracy >= 0.95" ("" off); a wall-clock budget `max_seconds` (0 off)."""

    metric: str = ""
    mode: str = "auto"
    patience: int = 5
    min_delta: float = 0.0
    restore_best: bool = True
    target: str = ""
    max_seconds: float = 0.0


@dataclass
class DPConfig:
    """Differential privacy (see clients/privacy.py and fedml/privacy.py).

    `mode`: "off"; "sample" (example-level DP-SGD at every client with Opacus, each
    client keeping a privacy ledger); "user-fixed" / "user-adaptive" (client-level DP:
    Flower's server-side clipping wrappers add Gaussian noise to the aggregate).
    The noise is `noise_multiplier`, or derived up front from `target_epsilon` for
    `rounds` rounds (0: use noise_multiplier). `delta` 0 means 1/(10 n) rounded down to
    a power of ten (n: a client's training examples; for user level, the clients).
    `max_epsilon` is the budget a client (sample) or the run (user) may not exceed
    (0: target_epsilon when set, else none). `max_grad_norm` clips per-example
    gradients (sample); `clip_norm` clips client updates (user; the initial norm when
    adaptive). `fix_model` lets Opacus replace layers it cannot train privately
    (BatchNorm -> GroupNorm) instead of refusing the model. `grad_sample_mode` is how
    Opacus computes per-example gradients (sample): "hooks", "ghost" (ghost clipping:
    per-example norms without per-example gradients), "functorch", or "auto" (ghost
    for models with a convolution, hooks otherwise: the faster of the two as measured
    in `bench.dp`). The mode changes speed, not the privacy accounting."""

    mode: str = "off"
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_epsilon: float = 0.0
    delta: float = 0.0
    max_epsilon: float = 0.0
    accountant: str = "rdp"
    clip_norm: float = 1.0
    fix_model: bool = False
    grad_sample_mode: str = "auto"


@dataclass
class SecAggConfig:
    """Secure aggregation (see fedml/secagg): the server learns only the sum of the
    sites' updates. `threshold`: sites needed to unmask (0: a majority of those taking
    part); `neighbours`: SecAgg+'s graph degree (0: every site, i.e. SecAgg); each
    update value is quantised to `bits` bits over [-`clip`, `clip`] (values beyond are
    clipped). Works with fedavg and fedprox (they need only the weighted sum)."""

    enabled: bool = False
    threshold: int = 0
    neighbours: int = 0
    clip: float = 1.0
    bits: int = 16


@dataclass
class CheckpointConfig:
    """What the run directory keeps: the newest `keep` commits plus the best one by
    `monitor`, whose model is also `best.safetensors`. The best is chosen on validation
    rows only: an `evaluate.*` (the sites' validation rows) or `train.*` metric of the
    history; "auto" picks federated accuracy, else federated loss, else train loss.
    `server.*` (the test set) is refused. `mode` is max or min; "auto" minimises metrics
    named like a loss and maximises the rest."""

    keep: int = 3
    monitor: str = "auto"
    mode: str = "auto"


@dataclass
class RunConfig:
    """Everything that defines a run. Same config + seed = same history, same model."""

    seed: int = 0
    rounds: int = 20
    out: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    server: ServerOptConfig = field(default_factory=ServerOptConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    # ----------------------------------------------------------------- conversions
    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Flat dotted-key form, Flower's `UserConfig` shape."""
        flat: dict[str, Any] = {}
        for key, value in self.to_tables().items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return flat

    def to_tables(self) -> dict[str, Any]:
        """The config as TOML tables; the strategy's options sit in `[strategy]`."""
        tables = dataclasses.asdict(self)
        tables["strategy"].update(tables["strategy"].pop("options"))
        return tables

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> RunConfig:
        """Build and validate a config from dotted keys; unknown keys are an error."""
        return with_overrides(cls(), flat)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> tuple[RunConfig, LaunchFlags]:
        """The config in a Flower run config (`Context.run_config`), and how our
        launchers started the run (the keys `RESUME_KEY` and `SIMULATED_KEY`)."""
        flat = dict(run_config)
        flags = LaunchFlags(
            resume=bool(flat.pop(RESUME_KEY, False)),
            simulated=bool(flat.pop(SIMULATED_KEY, False)),
        )
        return cls.from_flat(flat), flags

    def server_local(self) -> dict[str, str]:
        """The keys a deployed run keeps on the server (see SERVER_LOCAL), as JSON-able
        values for SERVER_LOCAL_ENV."""
        flat = self.to_flat()
        return {key: flat[key] for key in SERVER_LOCAL}

    def to_toml(self) -> str:
        """The resolved config as TOML text (what a run directory stores)."""
        return tomli_w.dumps(self.to_tables())


def with_server_local(run_config: dict[str, Any]) -> dict[str, Any]:
    """A ServerApp's run config with the server-side values `fedml server` kept out of
    it (SERVER_LOCAL_ENV); unchanged anywhere else (simulation, a plain `flwr run`)."""
    local = os.environ.get(SERVER_LOCAL_ENV)
    if local is None:
        return run_config
    values = json.loads(local)
    return {
        **run_config,
        **{
            key: values[key]
            for key, placeholder in SERVER_LOCAL.items()
            if key in values and run_config.get(key) == placeholder  # another run: as it is
        },
    }


@dataclass(frozen=True)
class LaunchFlags:
    """What `fedml server` / the Ray engine tell the ServerApp beside the config."""

    resume: bool = False  # continue the run directory `out` from its newest commit
    simulated: bool = False  # the nodes are Flower's simulated SuperNodes (Ray engine)


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a TOML file (or the defaults when `path` is None), apply overrides, validate.
    (A bundled preset's name becomes its path in `simulations.presets.resolve_config`.)"""
    flat: dict[str, Any] = {}
    if path is not None:
        if not path.exists():
            raise FedmlError(f"Config file {path} does not exist. Pass the path of a TOML file.")
        try:
            raw = tomllib.loads(regular_files.read_text(path))
        except OSError as exc:
            raise FedmlError(f"Cannot read config file {path}: {exc}.") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise FedmlError(f"Config file {path} is not valid TOML: {exc}.") from exc
        flat = _flatten(raw, source=str(path))
    flat.update({k: v for k, v in (overrides or {}).items() if v is not None})
    dataset = flat.get("data.dataset")
    if isinstance(dataset, str) and "simulation.clients" not in flat:
        # data split into sites (a folder of shards or site files, the hospitals of
        # fed-heart-disease) is a federation of that many clients, unless told otherwise
        sites = natural_clients(dataset)
        if sites:
            flat["simulation.clients"] = sites
    cfg = RunConfig.from_flat(flat)
    check_data_path(cfg)
    return cfg


DP_ONLY = ("dp.noise_multiplier", "dp.target_epsilon", "dp.max_epsilon", "dp.max_grad_norm")


def check_dp_flags(cfg: RunConfig, flags: dict[str, Any]) -> None:
    """DP settings given on the command line (`flags`: the dotted keys of the options
    typed) while DP is off would be ignored silently; a user who asks for noise believes
    the run is private. One error instead. (A config file may keep DP settings with DP
    switched off.)"""
    given = [key for key in DP_ONLY if flags.get(key) is not None]
    _check(
        cfg.dp.mode != "off" or not given,
        f"{', '.join(given)} only apply with differential privacy on, and dp.mode is "
        "'off'. Add --dp sample (DP-SGD at each site), --dp user-fixed or --dp "
        "user-adaptive (client-level DP), or drop them.",
    )


def check_data_path(cfg: RunConfig) -> None:
    """The run's `npz:<dir>` or `csv:<dir>` must exist on this machine. Checked where the
    data is read (the CLI, the ServerApp), never by `validate`: a data site parses the
    same run config and must not look for the server's folders on its own disk."""
    kind = cfg.data.dataset[:4]
    if kind in FOLDER_DATASETS:
        directory = Path(cfg.data.dataset[4:]).expanduser()
        _check(
            directory.is_dir(),
            f"data.dataset '{cfg.data.dataset}': directory {directory} does not exist. "
            f"Point {kind}<dir> at a directory holding {FOLDER_DATASETS[kind]}.",
        )


def with_overrides(base: RunConfig, flat: dict[str, Any]) -> RunConfig:
    """Return a validated copy of `base` with dotted-key values applied."""
    cfg = dataclasses.replace(
        base, **{f.name: dataclasses.replace(getattr(base, f.name)) for f in _sections()}
    )
    cfg.strategy.options = dict(base.strategy.options)
    for key, value in flat.items():
        _assign(cfg, key, value)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- internals
def _sections() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(f.default_factory)]


def _flatten(raw: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                if isinstance(sub_value, dict):
                    raise FedmlError(f"{source}: [{key}.{sub}] is not a known config table.")
                flat[f"{key}.{sub}"] = sub_value
        else:
            flat[key] = value
    return flat


def _known_keys() -> list[str]:
    return list(RunConfig().to_flat())


@cache
def _field_types(section: type) -> dict[str, Any]:
    return get_type_hints(section)


def _assign(cfg: RunConfig, key: str, value: Any) -> None:
    section_name, _, name = key.rpartition(".")
    target: Any = getattr(cfg, section_name, None) if section_name else cfg
    hints = _field_types(type(target)) if target is not None else {}
    if isinstance(target, StrategyConfig) and (name not in hints or name == "options"):
        cfg.strategy.options[name] = _option(key, value)
        return
    if target is None or name not in hints or dataclasses.is_dataclass(hints[name]):
        close = _closest_key(key)
        hint = f" Did you mean '{close}'?" if close else ""
        raise FedmlError(f"Unknown config key '{key}'.{hint}")
    expected = hints[name]
    setattr(target, name, _coerce(key, value, expected))


def _closest_key(key: str) -> str | None:
    """The known key a misspelled or spelled-out `key` most likely means: in its own
    section, one named by the key's initials (learning_rate -> lr);
    else the closest spelling, in its section first."""
    known = _known_keys()
    section, _, name = key.rpartition(".")
    prefix = f"{section}." if section else ""
    same_section = [k for k in known if k.rpartition(".")[0] == section]
    initials = "".join(word[0] for word in name.split("_") if word)
    for candidate in same_section:
        short = candidate[len(prefix) :]
        if len(name.split("_")) > 1 and short == initials:
            return candidate
    for pool in (same_section, known):
        close = difflib.get_close_matches(key, pool, n=1)
        if close:
            return close[0]
    return None


def _option(key: str, value: Any) -> Any:
    """A strategy option: a TOML scalar or a list of scalars (what Flower's UserConfig
    and a run directory's config.toml can carry)."""
    scalars = (bool, int, float, str)
    if isinstance(value, scalars) or (
        isinstance(value, list) and all(isinstance(v, scalars) for v in value)
    ):
        return value
    raise FedmlError(
        f"Config key '{key}' is a strategy option and must be a number, string, boolean or "
        f"a list of them, got {type(value).__name__}."
    )


def _coerce(key: str, value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and expected is not bool:
        raise FedmlError(f"Config key '{key}' must be {expected.__name__}, got a boolean.")
    if not isinstance(value, expected):
        raise FedmlError(
            f"Config key '{key}' must be {expected.__name__}, got {type(value).__name__} {value!r}."
        )
    return value


MAX_STEP = 1e3  # learning rates, weight decay, mu: beyond this a step overflows float32


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise FedmlError(message)


def validate(cfg: RunConfig) -> None:
    """Reject impossible values with one message naming the key and the fix."""
    _check(cfg.rounds >= 1, f"rounds must be at least 1, got {cfg.rounds}.")
    _check(
        0 <= cfg.seed <= MAX_SEED,
        f"seed must be a whole number 0 .. {MAX_SEED} (it seeds NumPy, scikit-learn and "
        f"PyTorch), got {cfg.seed}.",
    )
    for key, value in cfg.to_flat().items():
        _check(
            not isinstance(value, float) or math.isfinite(value),
            f"{key} must be a finite number, got {value}.",
        )

    data = cfg.data
    _check(
        data.dataset in ("digits", "mnist-5k", "breast-cancer", "fed-heart-disease")
        or data.dataset.startswith(("synthetic", "npz:", "csv:")),
        f"data.dataset '{data.dataset}' is unknown. Use one of: {', '.join(DATASETS)}.",
    )
    _check(
        data.preprocess in PREPROCESS,
        f"data.preprocess '{data.preprocess}' is unknown. Use one of: {', '.join(PREPROCESS)}.",
    )
    _check(
        bool(data.label_column.strip()),
        "data.label_column must name the label column of the site CSV files, e.g. 'label'.",
    )
    parse_partition(data.partition)
    _check(
        0.0 < data.test_fraction < 1.0,
        f"data.test_fraction must be in (0, 1), got {data.test_fraction}.",
    )
    _check(
        0.0 <= data.val_fraction < 1.0,
        f"data.val_fraction must be in [0, 1), got {data.val_fraction}.",
    )

    model = cfg.model
    _check(
        model.name in MODELS or ":" in model.name,
        f"model.name '{model.name}' is unknown. Use one of: {', '.join(MODELS)}, "
        "or <module>:<factory>.",
    )
    _check(model.hidden >= 1, f"model.hidden must be at least 1, got {model.hidden}.")

    sim = cfg.simulation
    _check(sim.clients >= 1, f"simulation.clients must be at least 1, got {sim.clients}.")
    _check(
        sim.engine in ENGINES,
        f"simulation.engine '{sim.engine}' is unknown. Use one of: {', '.join(ENGINES)}.",
    )
    _check(
        0.0 <= sim.stragglers <= 1.0,
        f"simulation.stragglers must be a fraction in [0, 1], got {sim.stragglers}.",
    )
    _check(
        0.0 <= sim.dropout < 1.0,
        f"simulation.dropout must be a fraction in [0, 1), got {sim.dropout}.",
    )
    _check(
        sim.num_cpus >= 1,
        f"simulation.num_cpus (whole CPUs per Ray client) must be at least 1, got {sim.num_cpus}.",
    )
    _check(
        sim.num_gpus >= 0.0,
        f"simulation.num_gpus (GPUs per Ray client, e.g. 0.25 to share one GPU by four "
        f"clients) must be 0 or more, got {sim.num_gpus}.",
    )
    _check(
        cfg.validation.norm_factor == 0.0 or cfg.validation.norm_factor > 1.0,
        f"validation.norm_factor must be 0 (off) or above 1, got {cfg.validation.norm_factor}.",
    )
    _check(
        cfg.validation.clip_norm >= 0.0,
        f"validation.clip_norm must be >= 0 (0: off), got {cfg.validation.clip_norm}.",
    )
    _check(
        cfg.validation.max_weight_factor == 0.0 or cfg.validation.max_weight_factor >= 1.0,
        "validation.max_weight_factor must be 0 (off) or at least 1, got "
        f"{cfg.validation.max_weight_factor}.",
    )

    strategy = cfg.strategy
    _check(
        0.0 < strategy.fraction_train <= 1.0,
        f"strategy.fraction_train must be in (0, 1], got {strategy.fraction_train}.",
    )
    _check(
        0.0 <= strategy.fraction_evaluate <= 1.0,
        f"strategy.fraction_evaluate must be in [0, 1], got {strategy.fraction_evaluate} "
        "(0 turns federated evaluation off).",
    )
    _check(
        0.0 <= strategy.proximal_mu <= MAX_STEP,
        f"strategy.proximal_mu must be in [0, {MAX_STEP:g}], got {strategy.proximal_mu}.",
    )
    for name in ("min_train_clients", "min_evaluate_clients"):
        value = getattr(strategy, name)
        _check(value >= 1, f"strategy.{name} must be at least 1, got {value}.")
        _check(
            value <= cfg.simulation.clients,
            f"strategy.{name} is {value} but the federation has only "
            f"{cfg.simulation.clients} clients; lower it or raise simulation.clients.",
        )

    client = cfg.client
    _check(
        client.local_epochs >= 1, f"client.local_epochs must be >= 1, got {client.local_epochs}."
    )
    _check(client.batch_size >= 1, f"client.batch_size must be >= 1, got {client.batch_size}.")
    _check(
        0 <= client.local_steps <= MAX_LOCAL_STEPS,
        f"client.local_steps must be 0 (use local_epochs) .. {MAX_LOCAL_STEPS}, got "
        f"{client.local_steps}.",
    )
    _check(
        client.local_steps == 0 or cfg.dp.mode != "sample",
        "client.local_steps is not available with dp.mode = 'sample': DP-SGD's privacy "
        "accounting counts passes over the rows. Set client.local_epochs instead "
        "(client.local_steps = 0).",
    )
    _check(
        0.0 < client.lr <= MAX_STEP,
        f"client.lr must be in (0, {MAX_STEP:g}], got {client.lr} (a larger step overflows "
        "float32 weights).",
    )
    _check(
        client.optimizer in OPTIMIZERS,
        f"client.optimizer '{client.optimizer}' is unknown. Use one of: {', '.join(OPTIMIZERS)}.",
    )
    _check(
        0.0 <= client.momentum < 1.0, f"client.momentum must be in [0, 1), got {client.momentum}."
    )
    _check(
        0.0 <= client.weight_decay <= MAX_STEP,
        f"client.weight_decay must be in [0, {MAX_STEP:g}], got {client.weight_decay}.",
    )
    _check(
        0.0 < client.lr_decay <= 1.0, f"client.lr_decay must be in (0, 1], got {client.lr_decay}."
    )
    _check(
        client.fine_tune_epochs == 0 or cfg.dp.mode != "sample",
        "client.fine_tune_epochs is not available with dp.mode = 'sample': the personal "
        "models would train without DP-SGD and their metrics would spend no privacy budget. "
        "Set client.fine_tune_epochs = 0.",
    )
    _check(
        client.personal in PERSONAL_MODES,
        f"client.personal '{client.personal}' is unknown. Use {', '.join(PERSONAL_MODES)}.",
    )
    _check(
        client.personal == "none" or cfg.dp.mode != "sample",
        f"client.personal = '{client.personal}' is not available with dp.mode = 'sample': "
        "personal models would train without DP-SGD and their metrics would spend no "
        "privacy budget. Set client.personal = 'none'.",
    )
    _check(
        client.personal == "none" or client.fine_tune_epochs == 0,
        f"client.personal = '{client.personal}' and client.fine_tune_epochs both make the "
        "sites' personal model; choose one (set the other to 'none' or 0).",
    )
    _check(
        math.isfinite(client.ditto_lambda) and 0 <= client.ditto_lambda <= MAX_DITTO_LAMBDA,
        f"client.ditto_lambda must be 0 .. {MAX_DITTO_LAMBDA:g}, got {client.ditto_lambda}.",
    )
    _check(
        0 <= client.fine_tune_epochs <= MAX_FINE_TUNE_EPOCHS,
        f"client.fine_tune_epochs must be 0 (off) .. {MAX_FINE_TUNE_EPOCHS}, got "
        f"{client.fine_tune_epochs}.",
    )
    _validate_checkpoint(cfg.checkpoint)
    _validate_controls(cfg)
    _validate_dp(cfg.dp)
    _validate_secagg(cfg)
    _validate_scaffold(cfg)
    _check(
        client.device in ("auto", "cpu", "cuda")
        or (client.device.startswith("cuda:") and client.device[5:].isdigit()),
        f"client.device '{client.device}' is unknown. Use auto, cpu, cuda or cuda:N.",
    )


def _validate_checkpoint(checkpoint: CheckpointConfig) -> None:
    _check(checkpoint.keep >= 1, f"checkpoint.keep must be at least 1, got {checkpoint.keep}.")
    _metric_name("checkpoint.monitor", checkpoint.monitor, allow_auto=True)
    source, _, name = checkpoint.monitor.partition(".")
    same_on_validation = f"evaluate.{name}"
    if same_on_validation not in RECORDED_METRICS:
        same_on_validation = "evaluate.accuracy"
    _check(
        source != TEST_SOURCE,
        f"checkpoint.monitor '{checkpoint.monitor}' would choose the best model "
        "(best.safetensors) on the test set, which makes that test result optimistic. "
        f"Monitor the sites' validation rows instead: auto, {same_on_validation} or "
        "train.loss.",
    )
    _check(
        checkpoint.mode in ("auto", "max", "min"),
        f"checkpoint.mode '{checkpoint.mode}' is unknown. Use auto, max or min.",
    )


def _metric_name(key: str, value: str, allow_auto: bool) -> None:
    """A control names a metric the run records: a misspelled one would never fire (or
    fire at once), silently."""
    if (allow_auto and value == "auto") or value in RECORDED_METRICS:
        return
    started = [name for name in RECORDED_METRICS if name.startswith(value)]
    close = started[:1] or difflib.get_close_matches(value, RECORDED_METRICS, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise FedmlError(
        f"{key} '{value}' is not a metric the run records.{hint} Use "
        + ("auto or " if allow_auto else "")
        + f"one of {', '.join(RECORDED_METRICS)}."
    )


def _validate_controls(cfg: RunConfig) -> None:
    s = cfg.strategy
    _check(
        not s.adaptive_mu or s.name.lower() == "fedprox",
        f"strategy.adaptive_mu adapts FedProx's mu; strategy.name is '{s.name}'. "
        "Use strategy.name = 'fedprox' or turn adaptive_mu off.",
    )
    _check(s.mu_step > 0.0, f"strategy.mu_step must be > 0, got {s.mu_step}.")
    _check(s.mu_patience >= 1, f"strategy.mu_patience must be >= 1, got {s.mu_patience}.")

    p = cfg.participation
    _check(p.min_replies >= 1, f"participation.min_replies must be >= 1, got {p.min_replies}.")
    _check(
        p.min_replies <= cfg.simulation.clients,
        f"participation.min_replies is {p.min_replies} but the federation has only "
        f"{cfg.simulation.clients} clients; lower it or raise simulation.clients.",
    )
    _check(p.timeout >= 0.0, f"participation.timeout must be >= 0 (0: off), got {p.timeout}.")
    _check(
        p.on_too_few in ("retry", "skip", "stop"),
        f"participation.on_too_few '{p.on_too_few}' is unknown. Use retry, skip or stop.",
    )
    _check(p.max_retries >= 0, f"participation.max_retries must be >= 0, got {p.max_retries}.")

    _check(
        0.0 < cfg.server.lr <= MAX_STEP,
        f"server.lr must be in (0, {MAX_STEP:g}], got {cfg.server.lr}.",
    )
    _check(
        0.0 <= cfg.server.momentum < 1.0,
        f"server.momentum must be in [0, 1), got {cfg.server.momentum}.",
    )

    g = cfg.guard
    _metric_name("guard.metric", g.metric, allow_auto=True)
    _check(
        g.factor == 0.0 or g.factor > 1.0,
        f"guard.factor must be 0 (NaN/inf only) or above 1, got {g.factor}.",
    )
    _check(0.0 < g.lr_factor <= 1.0, f"guard.lr_factor must be in (0, 1], got {g.lr_factor}.")
    _check(g.max_retries >= 0, f"guard.max_retries must be >= 0, got {g.max_retries}.")

    stop = cfg.stop
    if stop.metric:
        _metric_name("stop.metric", stop.metric, allow_auto=True)
    _check(
        stop.mode in ("auto", "max", "min"),
        f"stop.mode '{stop.mode}' is unknown. Use auto, max or min.",
    )
    _check(stop.patience >= 1, f"stop.patience must be >= 1, got {stop.patience}.")
    _check(stop.min_delta >= 0.0, f"stop.min_delta must be >= 0, got {stop.min_delta}.")
    _check(
        stop.max_seconds >= 0.0, f"stop.max_seconds must be >= 0 (0: off), got {stop.max_seconds}."
    )
    if stop.target:
        target = Target.parse(stop.target)
        _metric_name("stop.target", target.metric, allow_auto=False)


def _validate_dp(dp: DPConfig) -> None:
    _check(
        dp.mode in DP_MODES, f"dp.mode '{dp.mode}' is unknown. Use one of: {', '.join(DP_MODES)}."
    )
    if dp.mode == "off":
        return
    _check(
        dp.accountant in ACCOUNTANTS,
        f"dp.accountant '{dp.accountant}' is unknown. Use one of: {', '.join(ACCOUNTANTS)}.",
    )
    _check(
        dp.grad_sample_mode in GRAD_SAMPLE_MODES,
        f"dp.grad_sample_mode '{dp.grad_sample_mode}' is unknown. Use one of: "
        f"{', '.join(GRAD_SAMPLE_MODES)}.",
    )
    _check(
        dp.target_epsilon >= 0.0,
        f"dp.target_epsilon must be > 0 (0: use dp.noise_multiplier), got {dp.target_epsilon}.",
    )
    _check(
        dp.target_epsilon > 0.0 or dp.noise_multiplier > 0.0,
        f"dp.noise_multiplier must be > 0, got {dp.noise_multiplier}. Set it, or set "
        "dp.target_epsilon to derive it.",
    )
    _check(
        0.0 <= dp.delta < 1.0,
        f"dp.delta must be in (0, 1) (0: 1/(10 n) rounded down to a power of ten), got {dp.delta}.",
    )
    _check(dp.max_epsilon >= 0.0, f"dp.max_epsilon must be >= 0 (0: none), got {dp.max_epsilon}.")
    _check(
        dp.max_epsilon == 0.0 or dp.target_epsilon <= dp.max_epsilon,
        f"dp.target_epsilon {dp.target_epsilon} is above the budget dp.max_epsilon "
        f"{dp.max_epsilon}; lower the target or raise the budget.",
    )
    _check(dp.max_grad_norm > 0.0, f"dp.max_grad_norm must be > 0, got {dp.max_grad_norm}.")
    _check(dp.clip_norm > 0.0, f"dp.clip_norm must be > 0, got {dp.clip_norm}.")


SECAGG_STRATEGIES = ("fedavg", "fedprox")


def _validate_scaffold(cfg: RunConfig) -> None:
    """SCAFFOLD's control variates assume plain SGD steps at the sites, and the server
    reads each site's own update (strategies/scaffold.py)."""
    if cfg.strategy.name.lower() != "scaffold":
        return
    client = cfg.client
    _check(
        client.optimizer == "sgd" and client.momentum == 0.0,
        "strategy 'scaffold' corrects plain SGD steps at the sites, but client.optimizer is "
        f"'{client.optimizer}' with momentum {client.momentum:g}. Set client.optimizer = "
        "'sgd' and client.momentum = 0 (--client-momentum 0).",
    )
    _check(
        cfg.validation.clip_norm == 0,
        "strategy 'scaffold' reads each site's control-variate change from its update as "
        "the site trained it; validation.clip_norm would change the update on the server "
        "only. Set validation.clip_norm = 0 with scaffold.",
    )
    _check(
        client.personal != "fedper",
        "strategy 'scaffold' with client.personal = 'fedper': a site trains from its own "
        "head, which the server's control variate cannot see. Use fedper with another "
        "strategy, or scaffold with ditto or without personal models.",
    )
    _check(
        cfg.dp.mode == "off",
        f"strategy 'scaffold' is not available with dp.mode '{cfg.dp.mode}': its control "
        "variates would carry each site's raw training signal outside the DP guarantee. "
        "Use fedavg or fedprox with DP.",
    )


def _validate_secagg(cfg: RunConfig) -> None:
    sa = cfg.secagg
    _check(
        sa.threshold == 0 or sa.threshold >= 2,
        f"secagg.threshold must be 0 (a majority) or at least 2 (one answer would unmask "
        f"a single update), got {sa.threshold}.",
    )
    _check(
        sa.neighbours >= 0 and sa.neighbours % 2 == 0,
        f"secagg.neighbours must be 0 (every site) or an even degree, got {sa.neighbours}.",
    )
    _check(sa.clip > 0.0, f"secagg.clip must be > 0, got {sa.clip}.")
    _check(1 <= sa.bits <= 32, f"secagg.bits must be in 1..32, got {sa.bits}.")
    if not sa.enabled:
        return
    _check(
        cfg.strategy.name.lower() in SECAGG_STRATEGIES,
        f"secure aggregation hides single updates, and strategy '{cfg.strategy.name}' needs "
        f"them; use one of {', '.join(SECAGG_STRATEGIES)} (they need only the weighted sum).",
    )
    _check(
        cfg.dp.mode != "user-adaptive",
        "dp.mode 'user-adaptive' adapts its clip norm from each site's update norm, which "
        "secure aggregation hides. Use dp.mode = 'user-fixed' (each site clips its own "
        "update) or 'sample' (DP-SGD at every site) with secagg.",
    )


# ------------------------------------------------------------------------------ resume
# Keys a resumed run may change: they decide where, how long and what is kept, never
# what is learned. Every other key is the experiment itself.
RESUMABLE_KEYS = frozenset(
    {
        "rounds",
        "out",
        "client.device",
        "checkpoint.keep",
        "checkpoint.monitor",
        "checkpoint.mode",
        "stop.max_seconds",
        "simulation.engine",  # where a run computes is not what it computes
        "simulation.num_cpus",
        "simulation.num_gpus",
        "simulation.ray_address",
    }
)


def experiment_identity(cfg: RunConfig) -> dict[str, Any]:
    """The config keys that define what the run learns (everything not resumable)."""
    return {k: v for k, v in cfg.to_flat().items() if k not in RESUMABLE_KEYS}


def experiment_digest(cfg: RunConfig) -> str:
    """A short SHA-256 of the experiment's identity: what a site keeps per experiment
    (kept state, its privacy ledger) is filed under it, so a resumed run finds its own."""
    identity = json.dumps(experiment_identity(cfg), sort_keys=True).encode()
    return hashlib.sha256(identity).hexdigest()[:16]


def identity_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every experiment key that differs. A key that `before`
    lacks (a run made before that key existed) counts as its default value."""
    defaults = experiment_identity(RunConfig())
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, defaults.get(key)), after.get(key)
        if old != new:
            changes.append(f"{key}: {_shown(old)} -> {_shown(new)}")
    return changes


def _shown(value: Any) -> str:
    return "<unset>" if value is None else repr(value)


def resume_config(stored: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """The stored config of a run with the resumable `overrides` applied.

    An override of any other key is refused unless it repeats the stored value: a
    resumed run must be the same experiment.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    probe = with_overrides(stored, given)  # type-checks and validates the values
    changed = identity_changes(experiment_identity(stored), experiment_identity(probe))
    if changed:
        raise FedmlError(
            "A resumed run keeps the experiment stored in its directory; these options "
            f"would change it: {'; '.join(changed)}. Only --rounds and --max-seconds (to "
            "extend the run) and --device may change on resume. Start a new run (--out) "
            "to change the rest."
        )
    return probe
