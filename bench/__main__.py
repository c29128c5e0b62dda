"""The benchmark suite: one command, every ratio against a baseline measured in the same run.

    python -m bench [--only overhead engines clients commit dp] [--device cuda]

| benchmark | measured                                    | baseline (same run)           |
|-----------|---------------------------------------------|-------------------------------|
| overhead  | `fedml simulate`, 50 clients x 5 rounds,    | a plain PyTorch loop, same    |
|           | in this process and as a whole process      | work (bench/plain.py)         |
| engines   | fedml's Ray and in-process engines, 10 x 5  | stock Flower's Ray simulation |
| clients   | 10,000 clients, 1% sampled, 3 rounds        | 1,000 clients, 10% sampled    |
| commit    | rounds that persist (1M-parameter model)    | the same rounds persisting none |
| dp        | one client's local training with DP-SGD     | the same training without DP  |

`--device cuda` runs the benchmarks that train on a device (overhead, dp) with both sides
on the GPU. Each benchmark also has its own module with more options and detail (`python -m
bench.overhead`, `bench.ray`, `bench.memory`, `bench.commit`, `bench.dp`). The whole
suite takes about two minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

GPU_BENCHMARKS = ("overhead", "dp")  # the benchmarks that take --device
SYNTHETIC_MLP = {"data.dataset": "synthetic", "model.name": "mlp", "model.hidden": 64}


@dataclass(frozen=True)
class Result:
    """One line of the suite's table: what was measured against what, and the ratio."""

    benchmark: str
    measured: str
    baseline: str
    ratio: float


def overhead(device: str, repeats: int = 3) -> list[Result]:
    """`fedml simulate` (in-process) vs a plain PyTorch loop doing the same training, in
    this process and as whole processes (start to exit: imports and the report too)."""
    from bench.overhead import bench_config, plain_pytorch, timed, whole_process
    from simulations.engine import simulate

    fedml_best = plain_best = fedml_whole = plain_whole = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats + 1):  # the first of each side warms up
            cfg = bench_config(50, 5, Path(tmp) / f"run{repeat}", device)
            fedml_wall, _, _ = timed(simulate, cfg)
            plain_wall, _, _ = timed(plain_pytorch, cfg)
            if repeat:
                fedml_best, plain_best = min(fedml_best, fedml_wall), min(plain_best, plain_wall)
            cfg = bench_config(50, 5, Path(tmp) / f"whole{repeat}", device)
            fedml_wall, plain_wall = whole_process(cfg, Path(tmp))
            fedml_whole, plain_whole = min(fedml_whole, fedml_wall), min(plain_whole, plain_wall)
    return [
        Result(
            "overhead",
            f"fedml in-process {fedml_best:.2f} s on {device}",
            f"plain loop {plain_best:.2f} s",
            fedml_best / plain_best,
        ),
        Result(
            "overhead",
            f"`fedml simulate` process {fedml_whole:.2f} s",
            f"plain script process {plain_whole:.2f} s",
            fedml_whole / plain_whole,
        ),
    ]


def engines() -> list[Result]:
    """fedml's engines vs stock Flower's Ray simulation of the same MLP (wall time)."""
    from bench.ray import measure

    timings = measure(clients=10, rounds=5)
    stock = timings["stock Flower, Ray"]
    baseline = f"stock Flower Ray {stock.wall:.1f} s ({stock.rounds:.1f} s rounds)"
    return [
        Result(
            "engines",
            f"{name} {timing.wall:.1f} s ({timing.rounds:.1f} s rounds)",
            baseline,
            timing.wall / stock.wall,
        )
        for name, timing in timings.items()
        if timing is not stock
    ]


def clients() -> list[Result]:
    """Peak memory and seconds per round of 10,000 clients vs 1,000, 100 sampled in each
    (training and federated evaluation alike), in-process."""
    from bench.memory import measure

    def run(count: int) -> dict:
        fraction = 100 / count
        overrides = {**SYNTHETIC_MLP, "rounds": 3, "simulation.clients": count}
        return measure(
            {
                **overrides,
                "strategy.fraction_train": fraction,
                "strategy.fraction_evaluate": fraction,
            }
        )

    few, many = run(1_000), run(10_000)

    def shown(result: dict, what: str) -> str:
        return (
            f"{what}: peak RSS {result['peak_mib']:.0f} MiB (data {result['data_mib']:.0f} "
            f"MiB), {result['seconds_per_round']:.2f} s/round"
        )

    def per_example(result: dict) -> float:
        """Seconds per 1,000 examples trained: client sizes follow a power law, so the
        100 sampled clients hold different amounts of data in the two runs."""
        return 1000 * result["seconds_per_round"] / result["examples_per_round"]

    measured, baseline = shown(many, "10,000 clients x 1%"), shown(few, "1,000 x 10%")
    return [
        Result("clients", measured, baseline, many["peak_mib"] / few["peak_mib"]),
        Result(
            "clients",
            f"10,000 clients: {per_example(many):.3f} s per 1,000 examples trained",
            f"1,000 clients: {per_example(few):.3f} s",
            per_example(many) / per_example(few),
        ),
    ]


def commit() -> list[Result]:
    """Round time with persistence vs without, 1M-parameter model."""
    from bench.commit import bench_config, measure

    with tempfile.TemporaryDirectory(dir=".", prefix=".bench-commit-") as tmp:
        base = measure(bench_config(1_000_000, 4, Path(tmp) / "a"), persist=False)
        real = measure(bench_config(1_000_000, 4, Path(tmp) / "b"))
    return [
        Result(
            "commit",
            f"round + commit {real['with commit']:.3f} s (commit {real['commit'] * 1000:.1f} ms)",
            f"round persisting nothing {base['round']:.3f} s",
            real["with commit"] / base["round"],
        )
    ]


def dp(device: str, repeats: int = 7) -> list[Result]:
    """One client's local training: Opacus DP-SGD (the engine fedml picks) vs plain,
    for the MLP on digits and the FedAvg CNN on MNIST images."""
    from bench.dp import case_config, slowdown

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("mlp", "cnn"):
            cfg = case_config(model, Path(tmp))
            plain, private = slowdown(cfg, repeats, device=device)
            results.append(
                Result(
                    "dp",
                    f"{model} ({cfg.data.dataset}) DP-SGD {private['auto'] * 1000:.1f} ms",
                    f"plain {plain * 1000:.1f} ms",
                    private["auto"] / plain,
                )
            )
    return results


BENCHMARKS: dict[str, Callable[..., list[Result]]] = {  # GPU_BENCHMARKS take the device
    "overhead": overhead,
    "engines": engines,
    "clients": clients,
    "commit": commit,
    "dp": dp,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS))
    parser.add_argument(
        "--device", default="cpu", help=f"cpu, cuda, cuda:N (for {', '.join(GPU_BENCHMARKS)})"
    )
    args = parser.parse_args()
    on_cpu = args.device == "cpu"
    chosen = args.only or (list(BENCHMARKS) if on_cpu else list(GPU_BENCHMARKS))
    if not on_cpu and set(chosen) - set(GPU_BENCHMARKS):
        parser.error(f"--device {args.device} applies to {', '.join(GPU_BENCHMARKS)} only")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine's PyTorch sees no CUDA GPU")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # in-process sides alike; avoids thread-pool noise on 2 cores
    started = time.perf_counter()
    results: list[Result] = []
    for name in chosen:
        print(f"running {name} ...", flush=True)
        benchmark = BENCHMARKS[name]
        results += benchmark(args.device) if name in GPU_BENCHMARKS else benchmark()
    print()
    print(f"{'benchmark':10} {'ratio':>6}  measured  /  baseline (same run)")
    for result in results:
        print(f"{result.benchmark:10} {result.ratio:6.2f}  {result.measured}  /  {result.baseline}")
    print(f"(suite wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
