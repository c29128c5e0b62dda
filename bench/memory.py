"""Server memory vs number of clients: aggregation streams, so it should not grow.

One round of a whole in-process run (`fedml simulate`: every client trains and replies,
the server screens and folds each reply, evaluates and commits) with a ~1M-parameter
MLP on the digits data, once with 10 clients and once with 500. The data is the same
1,797 images either way (split 10 or 500 ways), so what grows with the client count is
the engine's own memory. Each run is a fresh child process, and its peak resident
memory (ru_maxrss) is what is compared.

    python -m bench.memory [--clients 10 500] [--hidden 13333]

Prints both peaks, the ratio (target <= 1.5) and, for scale, what holding every
client's update at once would have added.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from fedml.config import load_config


def bench_overrides(clients: int, hidden: int) -> dict:
    return {
        "data.dataset": "digits",
        "model.name": "mlp",
        "model.hidden": hidden,
        "rounds": 1,
        "simulation.clients": clients,
        "client.local_epochs": 1,
        "client.lr": 0.01,
    }


def child(overrides: dict) -> None:
    """Run the config and print, as JSON, this process's peak RSS and the rounds."""
    from fedml.data import federation_for
    from simulations.engine import simulate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, {**overrides, "out": str(Path(tmp) / "run")})
        summary = simulate(cfg)
        model_bytes = (Path(tmp) / "run" / "model.safetensors").stat().st_size
    federation = federation_for(cfg)  # cached: the federation the run used
    held = [s for s in (federation.pool, federation.test) if s is not None]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    rows = summary.history
    print(
        json.dumps(
            {
                "clients": cfg.simulation.clients,
                "aggregated": rows[0]["clients"]["aggregated"],
                "peak_mib": peak_kib / 1024,
                "model_mib": model_bytes / 2**20,
                "data_mib": sum(s.x.nbytes + s.y.nbytes for s in held) / 2**20,
                "seconds": rows[0]["seconds"],
                "seconds_per_round": sum(r["seconds"] for r in rows) / len(rows),
                "examples_per_round": sum(r["train"]["num-examples"] for r in rows) / len(rows),
                "rounds": len(rows),
            }
        )
    )


def measure(overrides: dict) -> dict:
    """`child(overrides)` in a fresh process: its peak is the run's alone."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--child", json.dumps(overrides)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs=2, default=[10, 500])
    parser.add_argument("--hidden", type=int, default=13333, help="MLP width (75 x hidden params)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    small, large = (measure(bench_overrides(n, args.hidden)) for n in args.clients)
    params = 75 * args.hidden + 10  # 64 inputs -> hidden -> 10 classes
    print(f"one round, MLP with {params / 1e6:.2f}M parameters ({small['model_mib']:.1f} MiB)")
    for result in (small, large):
        print(
            f"  {result['clients']:>4} clients: peak RSS {result['peak_mib']:7.1f} MiB, "
            f"round {result['seconds']:.1f} s, {result['aggregated']} updates aggregated"
        )
    ratio = large["peak_mib"] / small["peak_mib"]
    held = large["clients"] * large["model_mib"]
    print(f"  ratio {ratio:.2f} (target <= 1.5)")
    print(f"  holding all {large['clients']} updates at once would add ~{held:.0f} MiB")


if __name__ == "__main__":
    main()
