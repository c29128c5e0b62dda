"""The `fedml` command line. Thin: parse, load the config, call one function, print.

Each command imports what it runs inside its own body: `fedml --help` and `fedml runs`
must not pay for torch, Flower's runtime, matplotlib or the trackers.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from fedml.errors import FedmlError

# Nothing we start phones home or installs code at run time.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

app = typer.Typer(
    help="fedml: federated learning across data sites, built on Flower.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
# Lines are never wrapped by us (soft wrap): a path or a command broken in two cannot be
# copied; the terminal wraps what does not fit. Tables still fit the width.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _fail(exc: FedmlError) -> None:
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    raise typer.Exit(code=2)


def _quiet_flower(verbose: bool) -> None:
    """Flower's INFO chatter only with --verbose. Flower sets its logger's level when
    first imported, so import it before changing that level."""
    import flwr.supercore.logger  # noqa: F401

    level = logging.INFO if verbose else logging.WARNING
    flower = logging.getLogger("flwr")
    flower.setLevel(level)
    flower.propagate = False
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


Opt = typer.Option

ConfigArg = Annotated[
    Path | None,
    typer.Argument(help="A TOML run config or a bundled preset's name.", show_default=False),
]


@functools.cache
def _embedded_defaults() -> dict[str, Any]:
    from fedml.config import RunConfig

    return RunConfig().to_flat()


def default_of(key: str) -> str:
    """An option's default as `--help` shows it: the embedded config's value of its key
    (a CONFIG file or preset given with the flag may set another)."""
    value = _embedded_defaults()[key]
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value) if value != "" else "none"


# Options `fedml simulate` and `fedml server` share: one declaration, one help text.
StrategyOpt = Annotated[
    str | None,
    Opt(
        show_default=default_of("strategy.name"),
        help="Aggregation strategy: a name from `fedml strategies`, or module:Class.",
    ),
]
RoundsOpt = Annotated[
    int | None, Opt(show_default=default_of("rounds"), help="Number of federated rounds.")
]
MinRepliesOpt = Annotated[
    int | None,
    Opt(
        show_default=default_of("participation.min_replies"),
        help="Updates a round needs to count (else participation policy).",
    ),
]
RoundTimeoutOpt = Annotated[
    float | None,
    Opt(
        show_default=default_of("participation.timeout"),
        help="Seconds to wait for replies per phase (0: all).",
    ),
]
MaxSecondsOpt = Annotated[
    float | None,
    Opt(
        show_default=default_of("stop.max_seconds"),
        help="Wall-clock budget for the rounds, in seconds (0: none).",
    ),
]
OutOpt = Annotated[Path | None, Opt(help="Run directory (default runs/DATE-TIME).")]
ResumeOpt = Annotated[
    Path | None, Opt(help="Continue the run in this directory from its last intact commit.")
]
FractionTrainOpt = Annotated[
    float | None,
    Opt(
        show_default=default_of("strategy.fraction_train"),
        help="Fraction of clients sampled per round.",
    ),
]

FractionEvaluateOpt = Annotated[
    float | None,
    Opt(
        show_default=default_of("strategy.fraction_evaluate"),
        help="Fraction of clients sampled for federated evaluation (0: none).",
    ),
]

DatasetOpt = Annotated[
    str | None,
    Opt(
        show_default=default_of("data.dataset"),
        help="digits | mnist-5k | breast-cancer | fed-heart-disease | synthetic[:a,b] | "
        "npz:DIR | csv:DIR (one CSV per site).",
    ),
]
PreprocessOpt = Annotated[
    str | None,
    Opt(
        show_default=default_of("data.preprocess"),
        help="auto | standardize | none: standardise tabular features and impute missing "
        "values with statistics gathered across the sites (auto: tabular data).",
    ),
]
FineTuneOpt = Annotated[
    int | None,
    Opt(
        show_default=default_of("client.fine_tune_epochs"),
        help="Epochs each site fine-tunes the global model on its own rows at every "
        "evaluation, reporting that personal model beside it (0: off).",
    ),
]
PersonalOpt = Annotated[
    str | None,
    Opt(
        show_default=default_of("client.personal"),
        help="none | ditto | fedper: each site also keeps a personal model that never "
        "leaves it (Ditto: a model pulled towards the global one; FedPer: its own last "
        "layer) and reports it beside the global model.",
    ),
]
DittoLambdaOpt = Annotated[
    float | None,
    Opt(
        show_default=default_of("client.ditto_lambda"),
        help="Ditto: how strongly a personal model is pulled towards the global one.",
    ),
]
LabelColumnOpt = Annotated[
    str | None,
    Opt(
        show_default=default_of("data.label_column"),
        help="The label column of csv:DIR files.",
    ),
]

ModelOpt = Annotated[
    str | None,
    Opt(
        show_default=default_of("model.name"),
        help="logreg | mlp | cnn | lenet | resnet18-gn | module:factory.",
    ),
]

LocalEpochsOpt = Annotated[
    int | None,
    Opt(show_default=default_of("client.local_epochs"), help="Local epochs per round."),
]

LocalStepsOpt = Annotated[
    int | None,
    Opt(
        show_default=default_of("client.local_steps"),
        help="Local optimiser steps per round instead of epochs (0: use --local-epochs).",
    ),
]

BatchSizeOpt = Annotated[
    int | None, Opt(show_default=default_of("client.batch_size"), help="Local minibatch size.")
]

LrOpt = Annotated[
    float | None, Opt(show_default=default_of("client.lr"), help="Client learning rate.")
]

ProximalMuOpt = Annotated[
    float | None,
    Opt(show_default=default_of("strategy.proximal_mu"), help="FedProx proximal weight mu."),
]

LrDecayOpt = Annotated[
    float | None,
    Opt(show_default=default_of("client.lr_decay"), help="Client lr factor per round (0-1]."),
]

ClientMomentumOpt = Annotated[
    float | None,
    Opt(
        show_default=default_of("client.momentum"),
        help="Momentum of the sites' SGD (0 for --strategy scaffold).",
    ),
]

ServerLrOpt = Annotated[
    float | None,
    Opt(show_default=default_of("server.lr"), help="Server learning rate on the update."),
]

ServerMomentumOpt = Annotated[
    float | None,
    Opt(
        show_default=default_of("server.momentum"),
        help="Server momentum on the update (FedAvgM).",
    ),
]

EarlyStopOpt = Annotated[
    str | None,
    Opt(
        show_default=default_of("stop.metric"),
        help="Early-stopping metric, e.g. server.loss (with --patience).",
    ),
]

PatienceOpt = Annotated[
    int | None,
    Opt(
        show_default=default_of("stop.patience"),
        help="Rounds without improvement before stopping.",
    ),
]

TargetOpt = Annotated[
    str | None,
    Opt(
        show_default=default_of("stop.target"),
        help='Stop when reached, e.g. "server.accuracy >= 0.95".',
    ),
]

DpOpt = Annotated[
    str | None,
    Opt(
        show_default=default_of("dp.mode"),
        help="Differential privacy: off | sample | user-fixed | user-adaptive.",
    ),
]

NoiseMultiplierOpt = Annotated[
    float | None,
    Opt(show_default=default_of("dp.noise_multiplier"), help="DP noise multiplier."),
]

TargetEpsilonOpt = Annotated[
    float | None,
    Opt(
        show_default=default_of("dp.target_epsilon"),
        help="Derive the DP noise to spend this epsilon over --rounds.",
    ),
]

MaxEpsilonOpt = Annotated[
    float | None,
    Opt(
        show_default=default_of("dp.max_epsilon"),
        help="DP budget a client (sample) or the run (user) may not pass.",
    ),
]

MaxGradNormOpt = Annotated[
    float | None,
    Opt(
        show_default=default_of("dp.max_grad_norm"),
        help="Per-example gradient clip norm (DP-SGD).",
    ),
]

SeedOpt = Annotated[
    int | None,
    Opt(show_default=default_of("seed"), help="Seed for every random choice of the run."),
]

DeviceOpt = Annotated[
    str | None,
    Opt(show_default=default_of("client.device"), help="auto | cpu | cuda | cuda:N."),
]
SecAggOpt = Annotated[
    bool | None,
    Opt(
        "--secagg/--no-secagg",
        show_default=default_of("secagg.enabled"),
        help="Secure aggregation: the server sees only the sum.",
    ),
]
ReportOpt = Annotated[
    bool, Opt(help="Write plots and CSV files to RUN_DIR/report when the run ends.")
]


# The config key each option of `fedml simulate` and `fedml server` sets: the one place
# that ties a flag to the run config (tests/test_cli.py checks it against RunConfig and
# the commands' parameters). Options not named here (config, resume, report, ...) do
# not change the run config.
CONFIG_FLAGS: dict[str, str] = {
    "strategy": "strategy.name",
    "rounds": "rounds",
    "clients": "simulation.clients",
    "fraction_train": "strategy.fraction_train",
    "fraction_evaluate": "strategy.fraction_evaluate",
    "dataset": "data.dataset",
    "partition": "data.partition",
    "preprocess": "data.preprocess",
    "label_column": "data.label_column",
    "fine_tune_epochs": "client.fine_tune_epochs",
    "personal": "client.personal",
    "ditto_lambda": "client.ditto_lambda",
    "model": "model.name",
    "local_epochs": "client.local_epochs",
    "local_steps": "client.local_steps",
    "batch_size": "client.batch_size",
    "lr": "client.lr",
    "proximal_mu": "strategy.proximal_mu",
    "stragglers": "simulation.stragglers",
    "dropout": "simulation.dropout",
    "lr_decay": "client.lr_decay",
    "server_lr": "server.lr",
    "server_momentum": "server.momentum",
    "client_momentum": "client.momentum",
    "min_replies": "participation.min_replies",
    "round_timeout": "participation.timeout",
    "early_stop": "stop.metric",
    "patience": "stop.patience",
    "target": "stop.target",
    "max_seconds": "stop.max_seconds",
    "dp": "dp.mode",
    "noise_multiplier": "dp.noise_multiplier",
    "target_epsilon": "dp.target_epsilon",
    "max_epsilon": "dp.max_epsilon",
    "max_grad_norm": "dp.max_grad_norm",
    "seed": "seed",
    "device": "client.device",
    "engine": "simulation.engine",
    "num_cpus": "simulation.num_cpus",
    "num_gpus": "simulation.num_gpus",
    "ray_address": "simulation.ray_address",
    "secagg": "secagg.enabled",
    "out": "out",
}


def config_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """The dotted config keys that the given command-line options set (paths as text;
    an option left out is None and is skipped by `load_config`)."""
    return {
        CONFIG_FLAGS[name]: str(value) if isinstance(value, Path) else value
        for name, value in params.items()
        if name in CONFIG_FLAGS
    }


def _print_version(value: bool) -> None:
    if value:
        from fedml import __version__

        console.print(f"fedml {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool | None,
        Opt("--version", callback=_print_version, is_eager=True, help="Print the version."),
    ] = None,
) -> None:
    """fedml: federated learning across data sites, built on Flower."""


@app.command()
def simulate(
    ctx: typer.Context,
    config: ConfigArg = None,
    strategy: StrategyOpt = None,
    rounds: RoundsOpt = None,
    clients: Annotated[
        int | None,
        Opt(show_default=default_of("simulation.clients"), help="Number of simulated clients."),
    ] = None,
    fraction_train: FractionTrainOpt = None,
    fraction_evaluate: FractionEvaluateOpt = None,
    dataset: DatasetOpt = None,
    preprocess: PreprocessOpt = None,
    label_column: LabelColumnOpt = None,
    fine_tune_epochs: FineTuneOpt = None,
    personal: PersonalOpt = None,
    ditto_lambda: DittoLambdaOpt = None,
    partition: Annotated[
        str | None,
        Opt(
            show_default=default_of("data.partition"),
            help="iid | dirichlet:ALPHA | shards:K | auto.",
        ),
    ] = None,
    model: ModelOpt = None,
    local_epochs: LocalEpochsOpt = None,
    local_steps: LocalStepsOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    proximal_mu: ProximalMuOpt = None,
    stragglers: Annotated[
        float | None,
        Opt(
            show_default=default_of("simulation.stragglers"),
            help="Fraction of clients doing partial work.",
        ),
    ] = None,
    dropout: Annotated[
        float | None,
        Opt(
            show_default=default_of("simulation.dropout"),
            help="Fraction of sampled clients failing each round.",
        ),
    ] = None,
    lr_decay: LrDecayOpt = None,
    server_lr: ServerLrOpt = None,
    server_momentum: ServerMomentumOpt = None,
    client_momentum: ClientMomentumOpt = None,
    min_replies: MinRepliesOpt = None,
    round_timeout: RoundTimeoutOpt = None,
    early_stop: EarlyStopOpt = None,
    patience: PatienceOpt = None,
    target: TargetOpt = None,
    max_seconds: MaxSecondsOpt = None,
    dp: DpOpt = None,
    noise_multiplier: NoiseMultiplierOpt = None,
    target_epsilon: TargetEpsilonOpt = None,
    max_epsilon: MaxEpsilonOpt = None,
    max_grad_norm: MaxGradNormOpt = None,
    secagg: SecAggOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    engine: Annotated[
        str | None,
        Opt(
            show_default=default_of("simulation.engine"),
            help="inprocess (one process) | ray (Flower's Simulation Runtime).",
        ),
    ] = None,
    num_cpus: Annotated[
        int | None,
        Opt(show_default=default_of("simulation.num_cpus"), help="Ray: CPUs each client reserves."),
    ] = None,
    num_gpus: Annotated[
        float | None,
        Opt(
            show_default=default_of("simulation.num_gpus"),
            help="Ray: GPUs each client reserves (0.25: four share one).",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        Opt(
            show_default=default_of("simulation.ray_address"),
            help="Ray: join this Ray cluster (e.g. ray://head:10001).",
        ),
    ] = None,
    out: OutOpt = None,
    resume: ResumeOpt = None,
    report: ReportOpt = True,
    tensorboard: Annotated[
        Path | None, Opt(help="Also log every round as TensorBoard scalars under DIR.")
    ] = None,
    mlflow: Annotated[
        str | None,
        Opt(help="Also log every round to MLflow: a SQLite file (mlflow.db) or tracking URI."),
    ] = None,
    verbose: Annotated[bool, Opt("--verbose", "-v", help="Show Flower's own log lines.")] = False,
) -> None:
    """Run a federated experiment with simulated clients: in this process (default), or
    on Flower's Simulation Runtime (Ray) with --engine ray.

    CONFIG: a TOML run config or a bundled preset (digits-dp, digits-fedavg,
    fedavg-mnist, fed-heart-disease, fedprox-synthetic); omitted, the defaults. Flags
    override it.

    Example: fedml simulate --strategy fedprox --dataset synthetic --rounds 30

    Scale out: fedml simulate --engine ray --clients 100 --num-gpus 0.25 (four clients
    share a GPU; --ray-address joins a running Ray cluster)

    Controls: fedml simulate --rounds 100 --early-stop server.loss --patience 5
    --target "server.accuracy >= 0.95" --server-momentum 0.9 --dropout 0.3

    Privacy: fedml simulate --dp sample --target-epsilon 8 (DP-SGD at every client);
    fedml simulate --dp user-fixed --noise-multiplier 0.8 (client-level DP)

    Resume: fedml simulate --resume runs/exp1 [--rounds 40] [--max-seconds 3600] (the
    run keeps its stored config; only --rounds and --max-seconds, to extend it, and
    --device and the engine options may change)

    Tracking: fedml simulate --tensorboard tb --mlflow mlflow.db (plots and CSV files
    go to RUN_DIR/report unless --no-report)
    """
    from fedml.config import check_dp_flags, load_config
    from simulations.presets import resolve_config

    overrides = config_overrides(ctx.params)
    _quiet_flower(verbose)
    cfg: Any = None
    try:
        store = None
        if resume is None:
            cfg = _with_run_dir(load_config(resolve_config(config), overrides))
            check_dp_flags(cfg, overrides)
        else:
            from fedml.runstore import open_resume

            _check_resume_arguments(resume, config, out)
            store, cfg = open_resume(resume, overrides)
        from fedml.progress import run_with_progress

        trackers = _open_trackers(Path(cfg.out), cfg, tensorboard, mlflow)
        try:
            summary = run_with_progress(cfg, console, resume=store, on_round=trackers)
        finally:
            trackers.close()
    except FedmlError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print(_stopped_message(cfg), highlight=False)
        raise typer.Exit(code=130) from None
    from fedml.progress import print_summary

    report_dir = _report_run(summary.run_dir) if report else None
    print_summary(summary, console, trackers=trackers.active, report_dir=report_dir)


def _stopped_message(cfg: Any) -> str:
    """What Ctrl-C left: the committed rounds and how to go on, or that nothing was."""
    from fedml.runstore import run_status

    if cfg is None or not cfg.out or not (Path(cfg.out) / "config.toml").is_file():
        return "stopped before the run started: nothing was written."
    done = run_status(Path(cfg.out)).rounds_done
    if done == 0:
        return (
            f"stopped before any round was committed. Start again: remove {cfg.out} or pass --out."
        )
    return (
        f"stopped: {done} committed round(s) are kept. Continue with "
        f"`fedml simulate --resume {cfg.out}`"
    )


def _with_run_dir(cfg: Any) -> Any:
    """`cfg` with its run directory chosen (runs/<timestamp> unless --out), so that
    trackers know the run's name before it starts."""
    from fedml.config import with_overrides
    from fedml.runstore import default_run_path

    return cfg if cfg.out else with_overrides(cfg, {"out": str(default_run_path())})


def _open_trackers(run_dir: Path, cfg: Any, tensorboard: Path | None, mlflow: str | None) -> Any:
    """The trackers asked for; their packages are imported only then."""
    from fedml.trackers import MLflowTracker, TensorBoardTracker, Trackers

    chosen: list[Any] = []
    if tensorboard is not None:
        chosen.append(TensorBoardTracker(tensorboard, run_dir))
    if mlflow is not None:
        chosen.append(MLflowTracker(mlflow, run_dir, cfg))
    return Trackers(run_dir, chosen)


def _report_run(run_dir: Path) -> Path | None:
    """The end-of-run report's folder. A failure here is a warning, not an error: the
    run itself is saved, and `fedml report` can draw it later."""
    from fedml.report import write_report

    try:
        return write_report([run_dir], run_dir / "report").out
    except FedmlError as exc:
        err_console.print(f"[yellow]warning:[/] no report: {escape(str(exc))}", highlight=False)
        return None


def _check_resume_arguments(resume: Path, config: Path | None, out: Path | None) -> None:
    if config is not None:
        raise FedmlError(
            f"--resume takes the run's config from {resume}/config.toml; drop the CONFIG "
            "argument (start a new run to use another config)."
        )
    if out is not None and out.resolve() != resume.resolve():
        raise FedmlError(f"--resume {resume} already names the run directory; drop --out.")


@app.command()
def runs(
    path: Annotated[Path, typer.Argument(help="A run directory, or a folder of runs.")] = Path(
        "runs"
    ),
) -> None:
    """Show a run's status (rounds done, last commit, best round, stop reason, damage),
    or one line per run in a folder. Every commit's checksums are verified.

    Example: fedml runs runs/exp1
    """
    from fedml.runs_view import show_runs

    try:
        show_runs(path, console)
    except FedmlError as exc:
        _fail(exc)


@app.command()
def report(
    paths: Annotated[
        list[Path], typer.Argument(help="Run directories, or folders of runs, to overlay.")
    ],
    out: Annotated[Path, Opt(help="Folder for the PNG plots and CSV files.")] = Path("report"),
) -> None:
    """Plot runs and tabulate them: accuracy, loss, clients, epsilon (with DP) and
    seconds per round as PNG files, several runs overlaid on the same axes, plus
    summary.csv (one row per run) and rounds.csv (one row per run and round).

    Example: fedml report runs/fedavg runs/fedprox --out report/
    """
    from fedml.report import write_report

    try:
        written = write_report(paths, out)
    except FedmlError as exc:
        _fail(exc)
    for reason in written.skipped:
        err_console.print(f"[yellow]skipped:[/] {escape(reason)}", highlight=False)
    for path in written.files:
        console.print(str(path), highlight=False)
    if any(row["target"] for row in written.summary):
        _print_rounds_to_target(written.summary)


def _print_rounds_to_target(summary: list[dict[str, Any]]) -> None:
    """Rounds each run took to reach its target (the FedAvg paper's Table 2 shape)."""
    from rich.table import Table

    targets = {row["target"] for row in summary}
    one = targets.pop() if len(targets) == 1 else None
    table = Table(title=f"rounds to {one or 'target'}", title_justify="left")
    columns = ["run", "split", "C", "E", "B", *([] if one else ["target"]), "round", "of"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in summary:
        reached = str(row["target_round"]) if row["target_round"] != "" else "not reached"
        cells = [escape(row["run"]), row["partition"], str(row["fraction_train"])]
        cells += [str(row["local_epochs"]), str(row["batch_size"])]
        cells += [] if one else [escape(row["target"] or "-")]
        cells += [reached if row["target"] else "-", str(row["rounds"])]
        table.add_row(*cells)
    console.print(table)


@app.command()
def server(
    ctx: typer.Context,
    config: ConfigArg = None,
    pki: Annotated[
        Path | None, Opt(help="PKI folder from `fedml certs init` (TLS, site keys).")
    ] = None,
    insecure: Annotated[
        bool, Opt(help="No TLS, no site authentication: local experiments only.")
    ] = False,
    host: Annotated[
        str, Opt(help="Address the SuperLink binds (0.0.0.0: reachable by other machines).")
    ] = "127.0.0.1",
    port: Annotated[int, Opt(help="The SuperLink's port (sites connect here).")] = 8000,
    wait_for_sites: Annotated[
        float, Opt(help="Seconds to wait for every registered site before round 1.")
    ] = 300.0,
    sites: Annotated[
        int, Opt(help="With --insecure: sites to wait for before round 1 (0: none).")
    ] = 0,
    dataset: DatasetOpt = None,
    preprocess: PreprocessOpt = None,
    label_column: LabelColumnOpt = None,
    fine_tune_epochs: FineTuneOpt = None,
    personal: PersonalOpt = None,
    ditto_lambda: DittoLambdaOpt = None,
    model: ModelOpt = None,
    strategy: StrategyOpt = None,
    rounds: RoundsOpt = None,
    fraction_train: FractionTrainOpt = None,
    fraction_evaluate: FractionEvaluateOpt = None,
    local_epochs: LocalEpochsOpt = None,
    local_steps: LocalStepsOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    proximal_mu: ProximalMuOpt = None,
    lr_decay: LrDecayOpt = None,
    server_lr: ServerLrOpt = None,
    server_momentum: ServerMomentumOpt = None,
    client_momentum: ClientMomentumOpt = None,
    min_replies: MinRepliesOpt = None,
    round_timeout: RoundTimeoutOpt = None,
    early_stop: EarlyStopOpt = None,
    patience: PatienceOpt = None,
    target: TargetOpt = None,
    max_seconds: MaxSecondsOpt = None,
    dp: DpOpt = None,
    noise_multiplier: NoiseMultiplierOpt = None,
    target_epsilon: TargetEpsilonOpt = None,
    max_epsilon: MaxEpsilonOpt = None,
    max_grad_norm: MaxGradNormOpt = None,
    secagg: SecAggOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = None,
    report: ReportOpt = True,
) -> None:
    """Run a federation for real: a Flower SuperLink (TLS and site authentication on)
    running the fedml ServerApp; sites join with `fedml client`. Writes the same run
    directory as `fedml simulate`.

    Example: fedml server --pki pki --host 0.0.0.0 --dataset npz:shards --rounds 20

    The run's settings come from CONFIG (a TOML file or preset) and the flags, as in
    `fedml simulate`; --dataset is the server's own test set (npz:DIR holding test.npz),
    which also fixes the model's input shape and classes. Each site picks its device
    with its own `fedml client --device`.

    Resume after a crash: fedml server --resume runs/exp1 --pki pki [--rounds 40]
    """
    from fedml.config import check_dp_flags, load_config
    from fedml.deploy.server import ServerOptions, serve
    from fedml.progress import RepeatedFailures, describe_row
    from fedml.runstore import run_status
    from simulations.presets import resolve_config

    failures = RepeatedFailures()

    def show(row: Any) -> None:
        console.print(describe_row(row), highlight=False)
        for warning in failures.warnings(row):
            err_console.print(f"[bold red]{escape(warning)}[/]", highlight=False)

    overrides = config_overrides(ctx.params)
    options = ServerOptions(pki, insecure, host, port, wait_for_sites, sites)
    if insecure:
        err_console.print(
            "[yellow]warning:[/] --insecure: no TLS and no site authentication; anyone who "
            "reaches the port can join or listen. For local experiments only."
        )
    cfg: Any = None
    try:
        if resume is None:
            cfg = _with_run_dir(load_config(resolve_config(config), overrides))
            check_dp_flags(cfg, overrides)
        else:
            from fedml.runstore import open_resume

            _check_resume_arguments(resume, config, out)
            store, cfg = open_resume(resume, overrides, deployed=True)
            store.close()
        started = time.perf_counter()
        resumed_from = run_status(resume).rounds_done if resume is not None else None
        status = serve(
            cfg,
            options,
            resume=resume is not None,
            on_round=show,
            on_status=lambda text: console.print(text, highlight=False),
        )
    except FedmlError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print(
            "stopped: the SuperLink is down. Continue with `fedml server --resume "
            f"{cfg.out if cfg is not None else 'RUN_DIR'} --pki ...`",
            highlight=False,
        )
        raise typer.Exit(code=130) from None
    from fedml.progress import print_summary
    from fedml.server import RunSummary

    report_dir = _report_run(status.path) if report else None
    summary = RunSummary.from_status(status, time.perf_counter() - started, resumed_from)
    print_summary(summary, console, report_dir=report_dir)


@app.command()
def client(
    superlink: Annotated[str, Opt(help="The SuperLink's HOST:PORT.")],
    data: Annotated[Path, Opt(help="The site's data: .npz (x, y), a folder of .npz, or .csv.")],
    pki: Annotated[
        Path | None, Opt(help="The site's folder from `fedml certs add-node` (ca.crt, node.key).")
    ] = None,
    insecure: Annotated[
        bool, Opt(help="No TLS, no authentication: local experiments only.")
    ] = False,
    device: Annotated[
        str,
        Opt(
            help="auto | cpu | cuda | cuda:N (default: the run's).",
        ),
    ] = "",
    label_column: Annotated[str, Opt(help="The label column of a CSV file.")] = "label",
    state_dir: Annotated[
        Path | None,
        Opt(
            help="The site's own folder: prepared data, privacy ledger, logs; locked while "
            "this client runs.",
            show_default="fedml-site-NAME for --pki .../NAME (--insecure: the data file's name)",
        ),
    ] = None,
    port: Annotated[
        int, Opt(help="The SuperNode's local port (distinct per node on one machine).")
    ] = 9094,
    join_timeout: Annotated[
        float, Opt(help="Seconds to wait for the SuperLink, or while it refuses the key.")
    ] = 60.0,
    allow_model: Annotated[
        list[str] | None,
        Opt(
            help="A module:factory model this site agrees to build (repeatable); "
            "built-in models are always allowed, nothing else is."
        ),
    ] = None,
    test_data: Annotated[
        Path | None,
        Opt(
            help="The site's own test rows (.npz or .csv, the --data columns): never "
            "trained on; each evaluation reports the global model's metrics on them."
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        Opt(
            help="The site's policy (TOML): the DP, budgets, models, strategies, epochs, "
            "rounds, secure aggregation and server certificate it accepts; every task "
            "is judged by it before any data is read (see README, Site policy)."
        ),
    ] = None,
) -> None:
    """Join a federation from a data site: a Flower SuperNode whose ClientApp trains on
    the site's private data. Only model updates and metrics leave the site.

    Example: fedml client --superlink server.example.org:8000 --data /site/shard.npz
    --pki hospital-a
    """
    from fedml.deploy.client import ClientOptions, run_site

    if insecure:
        err_console.print("[yellow]warning:[/] --insecure: no TLS and no authentication.")
    options = ClientOptions(
        superlink,
        data,
        pki,
        insecure,
        device,
        state_dir,
        label_column,
        port,
        join_timeout,
        tuple(allow_model or ()),
        test_data,
        policy,
    )
    try:
        run_site(options, lambda text: console.print(text, highlight=False))
    except FedmlError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        console.print("stopped")


certs = typer.Typer(
    help="Keys and certificates for a deployment: a private CA, the SuperLink's TLS "
    "certificate, one authentication key per site.",
    no_args_is_help=True,
)
app.add_typer(certs, name="certs")


@certs.command("init")
def certs_init(
    directory: Annotated[Path, typer.Argument(help="PKI folder to create (stays on the server).")],
    host: Annotated[
        list[str] | None,
        Opt(help="A name or IP the sites use to reach the SuperLink (repeat the option)."),
    ] = None,
    days: Annotated[int, Opt(help="Days the SuperLink certificate stays valid.")] = 365,
    force: Annotated[bool, Opt(help="Replace existing files.")] = False,
) -> None:
    """Create a private CA and the SuperLink's TLS certificate (default hosts: localhost,
    127.0.0.1, ::1). Private keys are written 0600; nothing is overwritten without --force.

    Example: fedml certs init pki --host superlink.example.org --host 10.0.0.5
    """
    from fedml.pki import init_pki

    try:
        written = init_pki(directory, host, days=days, force=force)
    except FedmlError as exc:
        _fail(exc)
    for path in written:
        console.print(str(path), highlight=False)


@certs.command("add-node")
def certs_add_node(
    name: Annotated[str, typer.Argument(help="The site's name, e.g. hospital-a.")],
    pki: Annotated[Path, Opt(help="PKI folder made by `fedml certs init`.")] = Path("pki"),
    force: Annotated[bool, Opt(help="Replace the site's existing key.")] = False,
) -> None:
    """Create a site's authentication key pair: PKI/nodes/NAME.pub (the SuperLink lets it
    in) and PKI/sites/NAME/ (ca.crt and node.key: copy this folder to the site).

    Example: fedml certs add-node hospital-a --pki pki
    """
    from fedml.pki import add_node

    try:
        written = add_node(pki, name, force=force)
    except FedmlError as exc:
        _fail(exc)
    for path in written:
        console.print(str(path), highlight=False)
    console.print(f"copy {pki / 'sites' / name} to the site; keep the rest here", highlight=False)


audit_app = typer.Typer(
    help="Tamper-evident audit trails: a data site's (its state folder's audit.jsonl) "
    "and a run's (its run directory's: joins, failures and refusals, commits).",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")
TrailArg = Annotated[
    Path,
    typer.Argument(
        help="A site's state folder (e.g. fedml-site-hospital-a), a run directory, or an "
        "audit.jsonl."
    ),
]


@audit_app.command("verify")
def audit_verify(path: TrailArg) -> None:
    """Check every entry of the trail: its hash, its number, its link to the entry before,
    and that the trail reaches the last entry the site recorded. Exit 0 when intact;
    1 naming the first bad entry (edited, deleted, reordered, or a tail cut off).

    Example: fedml audit verify fedml-site-hospital-a
    """
    from fedml.audit import verify

    try:
        verdict = verify(path)
    except FedmlError as exc:
        _fail(exc)
    count, last = verdict.head
    if verdict.ok:
        console.print(
            f"intact: {len(verdict.entries)} entries; last {last} (keep this line elsewhere "
            "to detect a rewrite of the whole trail)",
            highlight=False,
        )
        return
    console.print(
        f"TAMPERED: {verdict.problem} ({len(verdict.entries)} entries intact before it; "
        f"the site recorded {count})",
        highlight=False,
    )
    raise typer.Exit(1)


@audit_app.command("show")
def audit_show(
    path: TrailArg,
    last: Annotated[int, Opt(help="Show the last N entries (0: all).")] = 20,
) -> None:
    """Print the trail as a table, after checking it. A site's: time, run, message,
    round, outcome and reason, the settings' DP mode, the update's norm, the epsilon
    sent and the site's total epsilon by its own ledger. A run's: time, event, round
    and what happened (who joined, failures by reason, the model committed).

    Example: fedml audit show fedml-site-hospital-a --last 50
    """
    from rich.table import Table

    from fedml.audit import verify
    from fedml.privacy import EPSILON_KEY
    from fedml.run_audit import describe

    try:
        verdict = verify(path)
    except FedmlError as exc:
        _fail(exc)
    entries = verdict.entries[-last:] if last > 0 else verdict.entries
    if any(entry.get("event") != "task" for entry in entries):  # a run's trail
        table = Table("n", "time", "event", "round", "what happened")
        for entry in entries:
            table.add_row(
                str(entry["n"]),
                str(entry["time"]),
                str(entry.get("event", "")),
                str(entry.get("round", "")),
                escape(describe(entry)),
            )
    else:
        table = Table(
            "n", "time", "run", "message", "round", "outcome", "dp", "norm", "epsilon",
            "site total",
        )  # fmt: skip
        for entry in entries:
            outcome = entry.get("outcome", "")
            if entry.get("reason"):
                outcome += f": {entry['reason']}"
            epsilon = (entry.get("metrics") or {}).get(EPSILON_KEY)
            total = (entry.get("privacy") or {}).get("epsilon_total")
            norm = entry.get("update_norm")
            table.add_row(
                str(entry["n"]),
                str(entry["time"]),
                str(entry.get("run", "")),
                str(entry.get("message", "")),
                str(entry.get("round", "")),
                escape(outcome),
                str((entry.get("settings") or {}).get("dp.mode", "")),
                "" if norm is None else f"{norm:.4g}",
                "" if epsilon is None else f"{epsilon:.4g}",
                "" if total is None else f"{total:.4g}",
            )
    console.print(table)
    console.print("intact" if verdict.ok else f"TAMPERED: {verdict.problem}", highlight=False)
    if not verdict.ok:
        raise typer.Exit(1)


data = typer.Typer(help="Datasets as site files.", no_args_is_help=True)
app.add_typer(data, name="data")


@data.command("split")
def data_split(
    dataset: Annotated[
        str,
        typer.Argument(
            help="A built-in dataset: digits | mnist-5k | breast-cancer | fed-heart-disease | "
            "synthetic[:a,b]."
        ),
    ],
    out: Annotated[Path, Opt(help="Folder to write the files into.")],
    clients: Annotated[
        int,
        Opt(
            help="Number of sites, one file each (0: the data's own sites, e.g. the 4 "
            "hospitals, else 3)."
        ),
    ] = 0,
    partition: Annotated[
        str,
        Opt(
            help="iid | dirichlet:ALPHA | shards:K | auto.",
        ),
    ] = "auto",
    test_fraction: Annotated[float, Opt(help="Fraction held out as the server's test set.")] = 0.2,
    seed: Annotated[int, Opt(help="Seed of the split.")] = 0,
    force: Annotated[bool, Opt(help="Replace the split files already in OUT.")] = False,
    file_format: Annotated[
        str,
        Opt(
            "--format",
            help="npz | csv (tables only: raw rows, one CSV per site named after it, and "
            "test.csv).",
        ),
    ] = "npz",
) -> None:
    """Write a built-in dataset's split as site files: OUT/client-0.npz ..
    client-(N-1).npz, one per site, and OUT/test.npz for the server, each holding x
    (float32, preprocessed exactly as `fedml simulate` does it) and y (int64 labels).
    It is the federation that `fedml simulate --dataset DATASET --clients N --partition P
    --seed S` trains.

    Example: fedml data split digits --clients 3 --out shards

    Hospital tables: fedml data split fed-heart-disease --format csv --out tables
    """
    from fedml.config import load_config
    from fedml.data import load_federation
    from fedml.data.datasets import natural_clients
    from fedml.data.export import write_split

    if dataset.startswith(("npz:", "csv:")):
        _fail(FedmlError(f"{dataset} is already split into files; pass a built-in dataset."))
    if file_format not in ("npz", "csv"):
        _fail(FedmlError(f"--format {file_format!r} is unknown: npz or csv."))
    try:
        cfg = load_config(
            None,
            {
                "data.dataset": dataset,
                "data.partition": partition,
                "data.test_fraction": test_fraction,
                "simulation.clients": clients or natural_clients(dataset) or 3,
            },
        )
        federation = load_federation(
            dataset, partition, cfg.simulation.clients, test_fraction, seed
        )
        written = write_split(federation, out, force=force, file_format=file_format)
    except FedmlError as exc:
        _fail(exc)
    for path, examples in written:
        console.print(f"{path}  {examples} examples", highlight=False)
    test_file, site_file = (
        ("test.csv", f"{written[0][0].name} (each site its own)")
        if file_format == "csv"
        else ("test.npz", "client-<i>.npz")
    )
    console.print(f"simulate it: fedml simulate --dataset {file_format}:{out}", highlight=False)
    console.print(
        f"deploy it: the server runs fedml server --dataset {file_format}:{out} ... (it "
        f"reads only {test_file}); a site runs fedml client --data {site_file} ... with "
        "its own file",
        highlight=False,
    )


@app.command()
def strategies() -> None:
    """List every strategy `--strategy` accepts: built-ins and installed plugins (the
    entry-point group `fedml.strategies`), with their origin and summary. Any other
    strategy class can be named directly as module:Class.

    Example: fedml strategies
    """
    from rich.table import Table

    from strategies.registry import available, summary

    table = Table(title="strategies", title_justify="left")
    for column in ("name", "origin", "class", "summary"):
        table.add_column(column)
    for entry in available().values():
        try:
            text = escape(summary(entry.load()))
        except FedmlError as exc:
            text = f"[red]cannot be loaded[/]: {escape(str(exc))}"
        table.add_row(entry.name, entry.origin, entry.reference, text)
    console.print(table)


def main() -> None:
    """Console-script entry point. A file system that refuses a write (full, read-only)
    anywhere in a command is one clear error, not a traceback."""
    import errno

    try:
        app(prog_name="fedml")
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        from fedml.runstore import storage_error

        message = escape(str(storage_error(exc, "writing")))
        err_console.print(f"[bold red]error:[/] {message}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
