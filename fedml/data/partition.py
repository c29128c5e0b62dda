"""Partitioners: split a labelled pool across clients.

Each partitioner is a pure function of (labels, num_clients, seed) returning one index
array per client. Every example lands in exactly one client (property-tested).
"""

from __future__ import annotations

import numpy as np

from fedml.errors import FedmlError

PARTITIONS = ("iid", "dirichlet:<alpha>", "shards:<k>")
MIN_DIRICHLET_EXAMPLES = 2
DIRICHLET_DRAWS = 20


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal out near-equal parts."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, seed: int, alpha: float) -> list[np.ndarray]:
    """Label skew: for each class, client shares are drawn from Dirichlet(alpha).

    Smaller alpha means more skew. Draws are repeated (deterministically) until every
    client holds at least MIN_DIRICHLET_EXAMPLES examples, as in common FL benchmarks;
    if a few draws do not manage that (tiny or single-class data), the largest clients
    hand examples to the smallest until they do.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    minimum = min(MIN_DIRICHLET_EXAMPLES, len(labels) // num_clients)
    for _ in range(DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        result = [np.concatenate(p) for p in parts]
        if min(len(p) for p in result) >= minimum:
            break
    sizes = [len(p) for p in result]
    while min(sizes) < minimum:
        poor, rich = int(np.argmin(sizes)), int(np.argmax(sizes))
        result[poor] = np.append(result[poor], result[rich][-1])
        result[rich] = result[rich][:-1]
        sizes[poor] += 1
        sizes[rich] -= 1
    return [np.sort(p) for p in result]


def shards(labels: np.ndarray, num_clients: int, seed: int, k: int) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, cut into num_clients*k shards,
    give each client k random shards (so each client sees about k classes)."""
    rng = np.random.default_rng(seed)
    by_label = np.argsort(labels, kind="stable")
    pieces = np.array_split(by_label, num_clients * k)
    order = rng.permutation(len(pieces))
    return [
        np.sort(np.concatenate([pieces[j] for j in order[c * k : (c + 1) * k]]))
        for c in range(num_clients)
    ]


def parse_partition(spec: str) -> tuple[str, float]:
    """Parse 'iid' | 'dirichlet:<alpha>' | 'shards:<k>' | 'auto' | 'natural' into
    (name, parameter); the parameter is 0 for the names that take none."""
    name, _, arg = spec.partition(":")
    try:
        if name in ("iid", "auto", "natural") and not arg:
            return name, 0.0
        if name == "dirichlet" and float(arg) > 0:
            return name, float(arg)
        if name == "shards" and int(arg) >= 1:
            return name, float(int(arg))
    except ValueError:
        pass
    raise FedmlError(
        f"data.partition '{spec}' is not valid. Use one of: {', '.join(PARTITIONS)} "
        "(alpha > 0, k >= 1), or 'auto'."
    )


def partition(labels: np.ndarray, num_clients: int, seed: int, spec: str) -> list[np.ndarray]:
    """Split `labels`' indices across `num_clients` by the partition spec."""
    name, parameter = parse_partition(spec)
    if num_clients > len(labels):
        raise FedmlError(
            f"{num_clients} clients cannot share {len(labels)} examples. Use fewer clients."
        )
    if name == "dirichlet":
        return dirichlet(labels, num_clients, seed, alpha=parameter)
    if name == "shards":
        k = int(parameter)
        if num_clients * k > len(labels):
            raise FedmlError(
                f"shards:{k} needs {num_clients * k} shards but there are only "
                f"{len(labels)} examples. Use a smaller k or fewer clients."
            )
        return shards(labels, num_clients, seed, k)
    return iid(labels, num_clients, seed)
