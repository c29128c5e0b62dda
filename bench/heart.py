"""Raw hospital tables: fed-heart-disease, federated, against the same model trained on the
pooled rows, in the same run.

FLamby's Fed-Heart-Disease (four hospitals' raw UCI tables, FLamby's split; see
`fedml.data.heart`) trained with a logistic regression four ways, each over seeds 0-4:

- `defaults`: `fedml simulate --dataset fed-heart-disease --model logreg` (20 rounds; the
  features standardised with statistics gathered across the hospitals, the default);
- `no standardisation`: the same with `--preprocess none` (what fedml did before);
- `preset`: `fedml simulate fed-heart-disease` (fedml's recommended setting);
- `preset, fine-tuned`: the same with `--fine-tune-epochs 5`: each hospital fine-tunes
  the global model on its own training rows for five epochs and reports that personal
  model on its test rows (personalization; the personal models never leave the sites);
- `preset, Ditto`: the preset with `--personal ditto` (lambda 1): each hospital keeps a
  personal model trained every round towards the global one;
- `preset, FedPer (mlp)`: the preset with `--model mlp --personal fedper`: each hospital
  keeps its own output layer under the shared hidden layer;
- `pooled (central)`: the baseline, scikit-learn's `LogisticRegression` on the four
  hospitals' training rows pooled, standardised with their statistics (what no
  federation may do), C = 1 and C = 0.01.

Each row gives the mean (± standard deviation over seeds) of the four hospitals' test
accuracies (FLamby's headline figure) and the accuracy on the pooled test set (254
rows). The last line is the preset's hospital mean over the central baseline's (C = 1).
FLamby's published figures (its repository's results files, seeds 42-46) are printed
beside them for reference: pooled training 0.735 / 0.795, FedAvg 0.685 / 0.748, their
best federated strategy 0.731 / 0.779.

    python -m bench.heart [--seeds 5]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np

from fedml.config import load_config
from fedml.data.heart import read_hospitals
from simulations.engine import simulate
from simulations.presets import resolve_config

# FLamby's results files (flamby/results/results_benchmark_fed_heart_disease/*.csv,
# seeds 42-46): mean of the four hospitals' test accuracies, and the pooled test's.
FLAMBY = {
    "FLamby pooled training": (0.735, 0.795),
    "FLamby FedAvg": (0.685, 0.748),
    "FLamby best federated (FedYogi)": (0.731, 0.779),
}


def federated(seed: int, out: Path, config: Path | None, **overrides) -> tuple[float, float]:
    """(mean hospital test accuracy, pooled test accuracy) of one run; with personal
    models, the hospitals' personal models' mean and the global model's pooled
    accuracy."""
    cfg = load_config(config, {"seed": seed, "out": str(out), **overrides})
    row = simulate(cfg).final
    entries = row["sites"].values()
    personal = cfg.client.fine_tune_epochs > 0 or cfg.client.personal != "none"
    results = [(e.get("personal", {}) if personal else e).get("test", {}) for e in entries]
    hospitals = [r["accuracy"] for r in results if "accuracy" in r]  # screening may drop one
    return float(np.mean(hospitals)), float(row["server"]["accuracy"])


def central(c: float) -> tuple[float, float]:
    """The pooled baseline: one logistic regression on all hospitals' training rows."""
    from sklearn.linear_model import LogisticRegression

    hospitals = read_hospitals()
    x = np.concatenate([h.train.x for h in hospitals]).astype(np.float64)
    y = np.concatenate([h.train.y for h in hospitals])
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    model = LogisticRegression(C=c, max_iter=10_000).fit((x - mean) / std, y)
    accuracies = [model.score((h.test.x - mean) / std, h.test.y) for h in hospitals]
    test_x = np.concatenate([h.test.x for h in hospitals])
    test_y = np.concatenate([h.test.y for h in hospitals])
    return float(np.mean(accuracies)), float(model.score((test_x - mean) / std, test_y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the no-standardisation runs warn, as they should
    seeds = range(args.seeds)
    runs = {
        "defaults": (None, {"data.dataset": "fed-heart-disease", "model.name": "logreg"}),
        "no standardisation": (
            None,
            {
                "data.dataset": "fed-heart-disease",
                "model.name": "logreg",
                "data.preprocess": "none",
            },
        ),
        "preset fed-heart-disease": (resolve_config(Path("fed-heart-disease")), {}),
        "preset, fine-tuned (personal)": (
            resolve_config(Path("fed-heart-disease")),
            {"client.fine_tune_epochs": 5},
        ),
        "preset, Ditto (personal)": (
            resolve_config(Path("fed-heart-disease")),
            {"client.personal": "ditto", "client.ditto_lambda": 1.0},
        ),
        "preset, FedPer mlp (personal)": (
            resolve_config(Path("fed-heart-disease")),
            {"client.personal": "fedper", "model.name": "mlp"},
        ),
    }
    print(f"{'run':34s} {'hospitals (mean)':>18s} {'pooled test':>16s}")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (config, overrides) in runs.items():
            scores = [
                federated(s, Path(scratch) / f"{name}-{s}".replace(" ", "-"), config, **overrides)
                for s in seeds
            ]
            hospitals, pooled = np.array(scores).T
            results[name] = hospitals.mean()
            print(
                f"{name:34s} {hospitals.mean():10.3f} ± {hospitals.std():.3f} "
                f"{pooled.mean():9.3f} ± {pooled.std():.3f}"
            )
    for c in (1.0, 0.01):
        hospitals, pooled = central(c)
        results[f"central {c}"] = hospitals
        print(f"{f'pooled (central), C = {c}':34s} {hospitals:10.3f}         {pooled:9.3f}")
    for name, (hospitals, pooled) in FLAMBY.items():
        print(f"{name:34s} {hospitals:10.3f}         {pooled:9.3f}")
    ratio = results["preset fed-heart-disease"] / results["central 1.0"]
    print(f"hospitals' mean accuracy, preset / pooled (central): {ratio:.3f}")


if __name__ == "__main__":
    main()
