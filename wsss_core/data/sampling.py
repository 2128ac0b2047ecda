"""Which images each training epoch visits: uniform, or balanced against
class imbalance, sharded across processes for distributed training."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def sample_weights(labels: np.ndarray, mode: str, repeat_threshold: float = 0.3) -> np.ndarray | None:
    """Per-image sampling weights for a multi-hot label matrix, or None (uniform).

    - `repeat_factor` (LVIS): r_c = max(1, sqrt(t / f_c)) with f_c the share of
      images labelled c; an image gets the largest r_c of its classes (1 if none).
    - `class_aware`: each class (and "no label" as its own group) gets equal
      total weight, shared equally among its images; an image with several
      classes sums its shares.
    """
    y = np.asarray(labels) > 0.5
    n = len(y)
    if mode == "none":
        return None
    if mode == "repeat_factor":
        freq = y.mean(0)
        r_c = np.where(freq > 0, np.maximum(1.0, np.sqrt(repeat_threshold / np.maximum(freq, 1e-12))), 1.0)
        w = np.where(y, r_c[None, :], 1.0).max(1) if y.shape[1] else np.ones(n)
        return w / w.sum()
    if mode == "class_aware":
        groups = np.concatenate([y, ~y.any(1, keepdims=True)], axis=1)
        sizes = groups.sum(0)
        share = np.where(sizes > 0, 1.0 / np.maximum(sizes, 1), 0.0)
        w = (groups * share[None, :]).sum(1)
        return w / w.sum()
    raise ValueError(f"unknown balance mode {mode!r} (none | repeat_factor | class_aware)")


class EpochSampler(torch.utils.data.Sampler[int]):
    """Deterministic per-epoch image order, the same on every process, then
    split into disjoint equal shards by rank (padded by wrap-around).

    Uniform mode is a permutation; weighted mode draws N images with
    replacement in proportion to `weights`.
    """

    def __init__(
        self,
        n: int,
        weights: np.ndarray | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if n <= 0:
            raise ValueError("cannot sample from an empty training set")
        self.n, self.weights, self.seed = n, weights, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch = 0
        self.per_rank = -(-n // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self) -> np.ndarray:
        """The global order of this epoch (before sharding)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is not None:
            order = rng.choice(self.n, size=self.n, replace=True, p=self.weights)
        elif self.shuffle:
            order = rng.permutation(self.n)
        else:
            order = np.arange(self.n)
        total = self.per_rank * self.world_size
        return np.resize(order, total)

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank
