"""How well an epoch order shuffles: figures to compare the partitioned order with the full permutation.

A full permutation is the reference for "perfectly shuffled". Orders that read few shards at a time (shard windows,
partitions) trade some of that for I/O locality; these numbers say how much, for a given dataset layout:

* distinct shards per global batch: a batch of a full permutation draws from nearly every shard, a windowed or
  partitioned one from a few windows;
* same-shard pair rate: the chance that two samples of one global batch come from the same shard (samples of a
  shard are often correlated: one crawl, one source, one time), against 1 / shards for independent draws;
* order / storage correlation: Spearman correlation of a sample's position in the epoch with its position in the
  storage order (shard, then offset): near 0 unless the order follows the files;
* epoch-to-epoch correlation: Spearman correlation of each sample's position in two consecutive epochs: near 0
  unless a sample comes back at the same time every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OrderQuality:
    distinct_shards_per_batch: float  # mean over the epoch's global batches
    same_shard_pair_rate: float  # P(two samples of one global batch share a shard)
    storage_correlation: float  # Spearman(position in the epoch, storage index)
    epoch_correlation: float  # Spearman(position in epoch e, position in epoch e + 1), common samples


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two equally long arrays without ties (positions, indices)."""
    if len(a) < 2:
        return 0.0
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def order_quality(
    counts: np.ndarray, order: np.ndarray, next_order: np.ndarray, global_batch: int
) -> OrderQuality:
    """Shuffle figures of the epoch ``order`` (global sample indices), ``next_order`` being the next epoch's."""
    ends = np.cumsum(counts)
    batches = len(order) // global_batch
    shard = np.searchsorted(ends, order[: batches * global_batch], side="right").reshape(
        batches, global_batch
    )
    distinct, same_pairs = [], []
    for row in shard:
        per_shard = np.bincount(row)
        distinct.append(int(np.count_nonzero(per_shard)))
        same_pairs.append(float((per_shard * (per_shard - 1)).sum()) / (global_batch * (global_batch - 1)))
    pos_next = np.full(int(ends[-1]), -1, dtype=np.int64)
    pos_next[next_order] = np.arange(len(next_order))
    common = pos_next[order] >= 0
    return OrderQuality(
        distinct_shards_per_batch=float(np.mean(distinct)) if distinct else 0.0,
        same_shard_pair_rate=float(np.mean(same_pairs)) if same_pairs else 0.0,
        storage_correlation=_spearman(np.arange(len(order)), order),
        epoch_correlation=_spearman(np.arange(len(order))[common], pos_next[order][common]),
    )
