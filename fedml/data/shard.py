"""One client's examples: the unit every dataset, site file and trainer deals in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_CLASSES = 100_000  # labels are class indices below this (a model's output size)


@dataclass(frozen=True)
class Shard:
    """Features `x` (float32, one row per example) and labels `y` (int64)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray) -> Shard:
        return Shard(self.x[index], self.y[index])

    @classmethod
    def concat(cls, shards: list[Shard]) -> Shard:
        """The shards' examples, one after another (a pool, a site's files)."""
        return cls(np.concatenate([s.x for s in shards]), np.concatenate([s.y for s in shards]))
