"""Datasets, site shards and partitioners."""

from fedml.data.datasets import (
    Federation,
    Shard,
    effective_partition,
    federation_for,
    load_federation,
    read_shard,
    split_validation,
)

__all__ = [
    "Federation",
    "Shard",
    "effective_partition",
    "federation_for",
    "load_federation",
    "read_shard",
    "split_validation",
]
