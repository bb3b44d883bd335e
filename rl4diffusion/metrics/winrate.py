"""Paired win rate of model A over model B with a 95 % confidence interval.

Each pair (a_i, b_i) scores two images made from the same prompt and the same noise, by the two
models: A wins (1), loses (0) or ties (½). The win rate is the mean of these outcomes, so 0.5
means "no better than B".

Interval: the **Wilson score interval** (Wilson 1927; recommended over the normal "Wald"
interval by Brown, Cai & DasGupta 2001) for a proportion from n independent pairs,

    centre = (p̂ + z²/2n) / (1 + z²/n),  half-width = z / (1 + z²/n) · √(p̂(1 − p̂)/n + z²/4n²).

It is closed-form and deterministic (no bootstrap seed), stays inside [0, 1], and is sensible
at p̂ = 0 or 1. Ties counted as ½ have less variance than a win/loss coin with the same mean,
so with ties the interval is conservative (wider than needed), never too narrow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch


@dataclass(frozen=True)
class WinRate:
    """A paired win rate and its confidence interval."""

    rate: float
    """Mean of 1 (A better), ½ (tie), 0 (B better) over the pairs."""
    low: float
    """Lower end of the confidence interval."""
    high: float
    """Upper end of the confidence interval."""
    n: int
    """Number of pairs."""
    wins: int
    ties: int

    def excludes(self, value: float = 0.5) -> bool:
        """True when ``value`` lies outside the interval (e.g. A is significantly better or worse than B)."""
        return not self.low <= value <= self.high


def win_rate(rewards_a: torch.Tensor, rewards_b: torch.Tensor, *, confidence: float = 0.95) -> WinRate:
    """Paired win rate of ``rewards_a`` [n] over ``rewards_b`` [n] (ties = ½) with a Wilson interval.

    Example::

        >>> w = win_rate(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.0, 1.0, 5.0]))
        >>> w.rate, w.wins, w.ties   # wins on pairs 1 and 3, a tie on pair 2
        (0.625, 2, 1)
    """
    a = torch.as_tensor(rewards_a).detach().double().flatten().cpu()
    b = torch.as_tensor(rewards_b).detach().double().flatten().cpu()
    if a.shape != b.shape:
        raise ValueError(f"paired win rate needs rewards of the same length (one pair per prompt and seed), "
                         f"got {a.numel()} and {b.numel()}")
    n = a.numel()
    if n == 0:
        raise ValueError("win rate of zero pairs is undefined")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    wins, ties = int((a > b).sum()), int((a == b).sum())
    p = (wins + 0.5 * ties) / n
    low, high = wilson_interval(p, n, confidence=confidence)
    return WinRate(rate=p, low=low, high=high, n=n, wins=wins, ties=ties)


def wilson_interval(p: float, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` observed over ``n`` trials (formula above)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)  # 1.96 for 95 %
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
