"""False-alarm thresholds and non-maximum suppression against brute force."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import norm

from cryorefine.engine.peaks import (
    expected_maximum,
    false_alarm_threshold,
    find_peaks,
    valid_region,
)


def test_threshold_lets_through_the_expected_number_of_noise_trials() -> None:
    n_trials = 4_000_000
    threshold = false_alarm_threshold(n_trials, 2.0)
    assert n_trials * norm.sf(threshold) == pytest.approx(2.0, rel=1e-9)
    samples = torch.randn(n_trials, generator=torch.Generator().manual_seed(0))
    # Poisson(2): 0 to 8 exceedances is a 99.98 % interval.
    assert int((samples > threshold).sum()) <= 8


def test_expected_maximum_matches_monte_carlo() -> None:
    generator = torch.Generator().manual_seed(1)
    for n in (100, 10_000):
        maxima = torch.randn(2000, n, generator=generator, dtype=torch.float64).max(dim=1).values
        # Gumbel approximation error shrinks like 1/log n: 0.04 σ at n = 100, less beyond.
        assert expected_maximum(n) == pytest.approx(float(maxima.mean()), abs=0.04)


def _greedy_reference(
    scores: torch.Tensor, threshold: float, radius: float
) -> list[tuple[int, int]]:
    order = sorted(
        (
            (float(scores[y, x]), y, x)
            for y in range(scores.shape[0])
            for x in range(scores.shape[1])
        ),
        reverse=True,
    )
    kept: list[tuple[int, int]] = []
    for value, y, x in order:
        if value <= threshold:
            break
        if all((y - ky) ** 2 + (x - kx) ** 2 >= radius**2 for ky, kx in kept):
            kept.append((y, x))
    return kept


@pytest.mark.parametrize("radius", [0.0, 2.5, 6.0])
def test_peaks_equal_greedy_suppression(radius: float) -> None:
    scores = torch.randn(40, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    peaks = find_peaks(scores, 1.5, radius)
    assert [tuple(p) for p in peaks.tolist()] == _greedy_reference(scores, 1.5, radius)


def test_max_peaks_and_an_empty_map() -> None:
    scores = torch.zeros(10, 10)
    scores[2, 3], scores[7, 7] = 5.0, 4.0
    assert find_peaks(scores, 1.0, 3.0, max_peaks=1).tolist() == [[2, 3]]
    assert find_peaks(scores, 6.0, 3.0).shape == (0, 2)


def test_valid_region_counts_template_positions_inside() -> None:
    rows, columns = valid_region((100, 80), 17)
    assert (rows.stop - rows.start, columns.stop - columns.start) == (100 - 17 + 1, 80 - 17 + 1)
    assert rows.start == 8 and rows.stop - 1 + (17 - 8 - 1) == 99
