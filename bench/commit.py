"""Commit cost: persisting a round, as a share of the round it persists.

Runs `fedml simulate` (in-process engine) on digits with 10 clients x 1 local epoch and
an MLP widened to about 1M and about 25M parameters, and compares, in the same
process, rounds with persistence (history row, model and state files with fsync,
manifest, atomic rename, model link, pruning) against the same rounds with a store that
writes nothing. It prints the time inside `RunStore.commit` as a share of the round
and the A/B difference in round wall time (which also catches the model file that is
written in the background during evaluation). The first round of each run (data
loading, warm-up) is left out; medians over the rest; each side runs --repeats times,
alternating, and its best run counts (the least disturbed by the rest of the machine).

    python -m bench.commit [--rounds 6] [--repeats 2] [--dir .]

The run directories go to a temporary folder under --dir (default: the current
directory, so the figures are for that disk; /tmp may be a RAM disk). Target: the 1M
model's commit costs under 5% of its round, by both measures.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from fedml.config import RunConfig, load_config
from fedml.runstore import RunStore
from simulations.engine import simulate

DIGITS_IN, DIGITS_OUT = 64, 10
TARGET_SHARE = 0.05


def hidden_for(parameters: int) -> int:
    """Width of the MLP's hidden layer (64 -> h -> 10) giving about `parameters`."""
    return round((parameters - DIGITS_OUT) / (DIGITS_IN + 1 + DIGITS_OUT + 1))


def bench_config(parameters: int, rounds: int, out: Path) -> RunConfig:
    return load_config(
        None,
        {
            "data.dataset": "digits",
            "model.name": "mlp",
            "model.hidden": hidden_for(parameters),
            "rounds": rounds,
            "simulation.clients": 10,
            "client.local_epochs": 1,
            "client.device": "cpu",
            "out": str(out),
        },
    )


def measure(cfg: RunConfig, persist: bool = True) -> dict[str, float]:
    """Median seconds (rounds 2..R) of a round and of its `commit` call, and the size of
    one commit. With `persist=False` the store writes nothing: the baseline."""
    commit_seconds: list[float] = []
    background_seconds: list[float] = []
    original = RunStore.commit, RunStore.stage, RunStore._write_arrays

    def timed_commit(store, *args, **kwargs):
        start = time.perf_counter()
        result = original[0](store, *args, **kwargs)
        commit_seconds.append(time.perf_counter() - start)
        return result

    def timed_write(store, *args, **kwargs):
        start = time.perf_counter()
        result = original[2](store, *args, **kwargs)
        background_seconds.append(time.perf_counter() - start)
        return result

    if persist:
        RunStore.commit, RunStore._write_arrays = timed_commit, timed_write
    else:
        RunStore.commit = lambda *args, **kwargs: commit_seconds.append(0.0)
        RunStore.stage = lambda *args, **kwargs: None
    try:
        summary = simulate(cfg)
    finally:
        RunStore.commit, RunStore.stage, RunStore._write_arrays = original
    rounds = [row["seconds"] for row in summary.history[1:]]
    with_commit = [r + c for r, c in zip(rounds, commit_seconds[1:], strict=True)]
    commits = sorted((summary.run_dir / "commits").iterdir()) if persist else []
    return {
        "round": statistics.median(rounds),
        "commit": statistics.median(commit_seconds[1:]),
        "background": statistics.median(background_seconds[1:]) if persist else 0.0,
        "with commit": statistics.median(with_commit),
        "bytes": sum(f.stat().st_size for f in commits[-1].iterdir()) if commits else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("."))
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)

    print(
        "workload: digits, 10 clients x 1 local epoch, mlp; medians of rounds 2..R, "
        f"best of {args.repeats}"
    )
    print(
        f"{'model':>11}{'MB':>6}{'round s':>9}{'commit s':>10}{'model file s':>13}"
        f"{'on clock':>10}{'bound':>8}{'A/B':>8}"
    )
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".bench-commit-") as tmp:
        for label, parameters in (("1M", 1_000_000), ("25M", 25_000_000)):
            bases, reals = [], []
            for repeat in range(args.repeats):  # alternate the sides; keep each side's best
                out = Path(tmp) / f"{label}-{repeat}"
                bases.append(measure(bench_config(parameters, args.rounds, out / "a"), False))
                reals.append(measure(bench_config(parameters, args.rounds, out / "b")))
            base = min(bases, key=lambda m: m["round"])
            real = min(reals, key=lambda m: m["with commit"])
            on_clock = real["commit"] / base["round"]
            bound = (real["commit"] + real["background"]) / base["round"]
            ab = real["with commit"] / base["round"] - 1.0
            print(
                f"{label + ' params':>11}{real['bytes'] / 1e6:6.1f}{base['round']:9.3f}"
                f"{real['commit']:10.4f}{real['background']:13.4f}"
                f"{on_clock:10.2%}{bound:8.2%}{ab:8.1%}"
            )
            if parameters == 1_000_000:
                verdict = "met" if bound < TARGET_SHARE else "MISSED"
                target = f"commit < {TARGET_SHARE:.0%} of the round (bound)"
                print(f"{'':>11}target: {target}: {verdict}")
    print(
        "round s: a round without persistence; commit s: time inside RunStore.commit;\n"
        "model file s: the background write of the model file (during evaluation);\n"
        "on clock: commit s / round s; bound: (commit s + model file s) / round s, the cost\n"
        "if the background write overlapped nothing; A/B: measured round wall time with\n"
        "persistence / without - 1 (subject to this machine's run-to-run noise)."
    )


if __name__ == "__main__":
    main()
