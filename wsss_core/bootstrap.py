"""Bootstrap intervals of a dataset's mIoU, over images and over training seeds.

A figure of one run moves when the photos change (another val set) and when
the training is redone with another seed. `compare` states both:

- **images**: each resample draws the images with replacement
  (`bootstrap_weights`) and recomputes the pooled IoU from the per-image
  counts every evaluating stage keeps (`metrics.ImageScores`), so the
  interval is that of the metric itself, not of a mean of per-image scores;
- **seeds** (a row of replicates: runs that differ only in seed keys): each
  resample first draws the row's seeds with replacement (`seed_draws`), then
  the images (the same draw for every seed, and for every row: differences
  between rows are paired over images, their seeds drawn independently), and
  averages the drawn seeds' mIoU (`replicate_samples`).

With one seed the seed draw is the identity: the interval is over images only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

RESAMPLES = 1000
MAX_RESAMPLES = 100_000
SEED = 0
LEVEL = 95.0  # the intervals' coverage, in %


@dataclass
class Interval:
    """A figure with its 95 % interval; `seeds`: each replicate's own figure (a row of several seeds)."""

    value: float
    low: float
    high: float
    seeds: tuple[float, ...] = ()

    @property
    def holds_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    @property
    def sd(self) -> float | None:
        """Standard deviation over the seeds (n - 1 in the denominator); None with fewer than 2."""
        return float(np.std(self.seeds, ddof=1)) if len(self.seeds) > 1 else None

    @property
    def images_only(self) -> bool:
        """One seed: the interval says how the figure moves on other images, not on another training run."""
        return len(self.seeds) <= 1


def bootstrap_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) counts: how often each image is drawn in each resample (n draws with replacement)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    w = np.zeros((resamples, n), np.int64)
    np.add.at(w, (np.arange(resamples)[:, None], idx), 1)
    return w


def seed_draws(n_seeds: int, resamples: int, seed: Sequence[int] | int) -> np.ndarray:
    """(resamples, n_seeds) indices of the replicates drawn (with replacement) in each resample."""
    if n_seeds == 1:
        return np.zeros((resamples, 1), np.int64)  # nothing to draw: the same stream whatever the seed
    return np.random.default_rng(seed).integers(0, n_seeds, size=(resamples, n_seeds))


def resampled_miou(scores: Any, weights: np.ndarray, order: np.ndarray) -> np.ndarray:
    """mIoU of each resample: the kept counts of the images in `order`, weighted
    by how often each is drawn (classes absent from a resample, in ground truth
    and prediction alike, are left out, as in `ConfusionMatrix.miou`)."""
    tp, gt, pred = (a[order] for a in scores.counts())
    t, g, p = (weights @ a for a in (tp, gt, pred))
    den = g + p - t
    return nanmean_rows(np.where(den > 0, t / np.maximum(den, 1), np.nan))


def nanmean_rows(a: np.ndarray) -> np.ndarray:
    """The mean of each row over its non-NaN entries (NaN where a row has none)."""
    ok = ~np.isnan(a)
    n = ok.sum(1)
    return np.where(n > 0, np.where(ok, a, 0.0).sum(1) / np.maximum(n, 1), np.nan)


def replicate_samples(per_seed: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """(resamples,) the mean over each resample's drawn seeds of their mIoU on that resample's images.

    `per_seed`: (seeds, resamples), each seed's `resampled_miou` under the same image weights;
    `draws`: (resamples, seeds) from `seed_draws`."""
    return per_seed[draws, np.arange(per_seed.shape[1])[:, None]].mean(1)


def interval(value: float, samples: np.ndarray, seeds: Sequence[float] = ()) -> Interval:
    """`value` with the central 95 % of `samples` (its 2.5th and 97.5th percentiles)."""
    tail = (100.0 - LEVEL) / 2
    low, high = np.nanpercentile(samples, [tail, 100.0 - tail])
    return Interval(float(value), float(low), float(high), tuple(float(s) for s in seeds))


@dataclass
class Row:
    """A row of replicates on one evaluation: each seed's mIoU on the common images and its resamples."""

    values: np.ndarray  # (seeds,)
    samples: np.ndarray  # (resamples,): the two-level bootstrap of the mean over seeds

    @property
    def estimate(self) -> Interval:
        return interval(float(self.values.mean()), self.samples, self.values)


def replicate_row(scores: Sequence[Any], orders: Sequence[np.ndarray], weights: np.ndarray,
                  draw_seed: Sequence[int] | int) -> Row:
    """The two-level bootstrap of one row: `scores[s]` (an `ImageScores`) of seed s, its images at
    `orders[s]` (the common images, in one order for every run), `weights` the images' draws."""
    per_seed = np.stack([resampled_miou(s, weights, o) for s, o in zip(scores, orders)])
    values = np.array([s.miou(o) for s, o in zip(scores, orders)])
    return Row(values, replicate_samples(per_seed, seed_draws(len(scores), weights.shape[0], draw_seed)))


def paired_difference(row: Row, base: Row) -> Interval:
    """`row` minus `base`: the difference of their means over seeds, with the interval of the
    resampled differences (the same images drawn for both, their seeds drawn independently)."""
    return interval(float(row.values.mean() - base.values.mean()), row.samples - base.samples)
