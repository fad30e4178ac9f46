"""Peaks of a score map above a false-alarm threshold, with non-maximum suppression.

Under the null hypothesis (no particle) a 2DTM z-score is a standard normal variable
at each of n_trials = (valid pixels) × (search positions) independent trials; the
threshold z* with n_trials · Q(z*) = expected false alarms (Q the normal upper tail)
lets through that many noise peaks per micrograph on average. Correlated trials
(neighbouring orientations, pixels) make the real count lower, so the threshold is
conservative.
"""

from __future__ import annotations

import math

import torch
from scipy.special import ndtri


def false_alarm_threshold(n_trials: float, false_alarms: float = 1.0) -> float:
    """z* such that n_trials · Q(z*) = false_alarms (Q: standard normal upper tail).

    Args:
        n_trials: number of independent Gaussian trials (> false_alarms).
        false_alarms: expected number of trials above z* under pure noise (> 0).
    """
    if not (n_trials > 0 and false_alarms > 0):
        raise ValueError("n_trials and false_alarms must be positive")
    probability = min(false_alarms / n_trials, 0.5)
    return float(-ndtri(probability))


def expected_maximum(n_trials: float) -> float:
    """Expected maximum of n independent standard normal variables (n ≥ 2).

    Gumbel limit: b_n + γ / a_n with a_n = √(2 ln n) and b_n the point where
    n · Q(b_n) = 1 (Leadbetter et al. 1983, the extreme-value law of Gaussian maxima).
    """
    if n_trials < 2:
        raise ValueError("the expected maximum needs at least two trials")
    euler_gamma = 0.5772156649015329
    b_n = false_alarm_threshold(n_trials, 1.0)
    # The density at b_n gives the Gumbel scale exactly: 1 / a_n = Q(b_n) / φ(b_n).
    density = math.exp(-0.5 * b_n * b_n) / math.sqrt(2.0 * math.pi)
    return b_n + euler_gamma * (1.0 / n_trials) / density


def valid_region(image_shape: tuple[int, int], template_size: int) -> tuple[slice, slice]:
    """Pixels (centres) where a D-wide template lies wholly inside an (H, W) image.

    Returns:
        (rows, columns) slices: centres y ∈ [D//2, H − D + D//2], likewise x;
        (H − D + 1) × (W − D + 1) positions.
    """
    height, width = image_shape
    start = template_size // 2
    return (
        slice(start, height - template_size + start + 1),
        slice(start, width - template_size + start + 1),
    )


def find_peaks(
    scores: torch.Tensor,
    threshold: float,
    exclusion_radius_px: float,
    max_peaks: int | None = None,
) -> torch.Tensor:
    """Pixels above a threshold, strongest first, none within a radius of a stronger one.

    Greedy non-maximum suppression: take the highest remaining pixel, discard all
    within `exclusion_radius_px` of it, repeat (one pass per peak found).

    Args:
        scores: real (H, W); −inf (or anything ≤ threshold) where no peak may be.
        threshold: keep pixels with scores > threshold.
        exclusion_radius_px: minimum distance between two peaks, pixels (≥ 0).
        max_peaks: stop after this many.

    Returns:
        int64 (n, 2) peak pixels (y, x), in decreasing score.
    """
    candidates = torch.nonzero(scores > threshold)
    values = scores[candidates[:, 0], candidates[:, 1]]
    candidates = candidates[torch.argsort(values, descending=True, stable=True)]
    positions = candidates.double()
    remaining = torch.ones(candidates.shape[0], dtype=torch.bool, device=scores.device)
    kept: list[int] = []
    while bool(remaining.any()) and (max_peaks is None or len(kept) < max_peaks):
        best = int(torch.nonzero(remaining)[0])
        kept.append(best)
        distance = torch.linalg.vector_norm(positions - positions[best], dim=-1)
        remaining &= distance >= exclusion_radius_px
        remaining[best] = False
    return candidates[torch.tensor(kept, dtype=torch.int64, device=scores.device)]
