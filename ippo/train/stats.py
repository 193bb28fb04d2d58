"""Statistics of the reports and probes: rank correlation, rank AUC, Student-t intervals and t test (one copy each).

Ranks tie by their average; intervals and tests are two-sided Student t with n - 1 degrees of freedom.
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple

import torch
from torch import Tensor

CONFIDENCE = 0.95


def low_auc(values: Tensor, positive: Tensor) -> float | None:
    """How well LOW ``values`` find the ``positive`` episodes: P(v_pos < v_neg) + P(v_pos == v_neg) / 2 over
    all (positive, negative) pairs (Mann-Whitney, ties by average rank), over the episodes whose value is finite.
    None when a class is empty."""
    if values.dim() != 1 or positive.shape != values.shape:
        raise ValueError(f"values and positive must both be (E,), got {tuple(values.shape)} and "
                         f"{tuple(positive.shape)}")
    finite = values.isfinite().cpu()
    values, positive = values.cpu()[finite], positive.bool().cpu()[finite]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    ranks = average_ranks(-values.double().cpu())  # rank 1 = highest value
    return (float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def stratified_low_auc(values: Tensor, positive: Tensor, strata: Tensor) -> float | None:
    """:func:`low_auc` over the (positive, negative) pairs of the same stratum only: each stratum's AUC weighted by
    its pair count (finite values). ``strata``: (E,) integer labels. None when no stratum holds both classes."""
    if strata.shape != values.shape:
        raise ValueError(f"strata must be (E,) like values, got {tuple(strata.shape)} and {tuple(values.shape)}")
    values, positive, strata = values.cpu(), positive.bool().cpu(), strata.cpu()
    finite = values.isfinite()
    concordant, pairs = 0.0, 0
    for label in strata.unique():
        at = strata == label
        auc = low_auc(values[at], positive[at])
        if auc is not None:
            n = int((positive & finite)[at].sum()) * int((~positive & finite)[at].sum())
            concordant, pairs = concordant + auc * n, pairs + n
    return concordant / pairs if pairs else None


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..n of ``x`` (1 = smallest), ties sharing their average rank (float64)."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    new = torch.ones_like(sorted_x, dtype=torch.bool)
    new[1:] = sorted_x[1:] != sorted_x[:-1]
    tie_group = torch.cumsum(new.long(), 0) - 1
    position = torch.arange(1, len(x) + 1, dtype=torch.float64)
    n_groups = int(tie_group[-1]) + 1 if len(x) else 0
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, tie_group, position)
    mean_rank = total / torch.zeros(n_groups, dtype=torch.float64).index_add_(0, tie_group, torch.ones_like(position))
    ranks = torch.empty_like(mean_rank[tie_group])
    ranks[order] = mean_rank[tie_group]
    return ranks


def spearman(x: Tensor, y: Tensor) -> float | None:
    """Spearman rank correlation of (E,) ``x`` and ``y`` (ties by average rank) over the pairs where both are finite;
    None when either is constant there."""
    finite = (x.isfinite() & y.isfinite()).cpu()
    rx, ry = average_ranks(x.cpu()[finite]), average_ranks(y.cpu()[finite])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float((rx.square().sum() * ry.square().sum()).sqrt())
    return float((rx * ry).sum()) / den if den > 0 else None


class Interval(NamedTuple):
    """Mean of ``n`` values and the half-width of its two-sided t interval (None when n = 1)."""

    mean: float
    half_width: float | None
    n: int

    def format(self, digits: int = 3) -> str:
        if self.half_width is None:
            return f"{self.mean:.{digits}f} (n=1, no interval)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f} (n={self.n})"


def t_coverage(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` degrees of freedom (closed form for integer df, Abramowitz and
    Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) [theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)]
        term, series = 1.0, 1.0 if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= 2 * j / (2 * j + 1) * c2
            series += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    term = series = 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for j in range(1, df // 2):
        term *= (2 * j - 1) / (2 * j) * c2
        series += term
    return math.sin(theta) * series


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| <= t) = ``confidence`` (two-sided), by bisection on :func:`t_coverage`."""
    if not 0 < confidence < 1 or df < 1:
        raise ValueError(f"need 0 < confidence < 1 and df >= 1, got {confidence}, {df}")
    lo, hi = 0.0, 1.0
    while t_coverage(hi, df) < confidence:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_coverage(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and two-sided Student-t interval (n - 1 degrees of freedom) of ``values``."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, None, 1)
    return Interval(mean, t_quantile(confidence, n - 1) * statistics.stdev(values) / math.sqrt(n), n)


def t_test(values: list[float]) -> tuple[float, float]:
    """One-sample t test of mean 0 (for paired differences): t = mean / (sd / sqrt(n)) and its two-sided p
    (n - 1 degrees of freedom). Needs n >= 2 values that are not all equal."""
    n = len(values)
    if n < 2:
        raise ValueError(f"t_test needs at least 2 values, got {n}")
    sd = statistics.stdev(values)
    if sd == 0:
        raise ValueError("t_test needs values that are not all equal (sd 0: t undefined)")
    t = statistics.fmean(values) / (sd / math.sqrt(n))
    return t, 1 - t_coverage(abs(t), n - 1)
