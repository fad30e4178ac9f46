"""Soft masks: values at the centre, in the edge and outside, symmetry, analytic volume."""

from __future__ import annotations

import math

import pytest
import torch

from cryorefine.engine.masks import soft_circle_mask, soft_sphere_mask


def sphere_volume(radius: float, edge: float) -> float:
    """∫ mask dV: 4π ∫ r² m(r) dr with the raised-cosine edge done analytically."""
    shell = ((radius + edge) ** 3 - radius**3) / 6 - (2 * radius + edge) * edge**2 / math.pi**2
    return 4 / 3 * math.pi * radius**3 + 4 * math.pi * shell


def circle_area(radius: float, edge: float) -> float:
    """∫ mask dA: 2π ∫ r m(r) dr."""
    ring = ((radius + edge) ** 2 - radius**2) / 4 - edge**2 / math.pi**2
    return math.pi * radius**2 + 2 * math.pi * ring


def test_sphere_values_centre_edge_outside(device: torch.device) -> None:
    mask = soft_sphere_mask(32, radius=8.0, soft_edge=4.0, device=device)
    assert mask.shape == (32, 32, 32) and mask.device.type == device.type
    c = 16
    assert mask[c, c, c].item() == 1.0
    assert mask[c, c, c + 8].item() == 1.0  # on the radius
    assert mask[c, c, c + 10].item() == pytest.approx(0.5, abs=1e-6)  # middle of the edge
    assert mask[c, c + 9, c].item() == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), abs=1e-6)
    assert mask[c, c, c + 12].item() == 0.0  # radius + edge
    assert mask[0, 0, 0].item() == 0.0
    assert mask.min().item() >= 0 and mask.max().item() <= 1


def test_masks_are_radially_symmetric_about_n_half(device: torch.device) -> None:
    mask = soft_sphere_mask(21, 6.0, 3.0, device=device)
    c = 10
    # The 48 signed permutations of (x, y, z) about the centre give the same value.
    for axes in [(0, 1, 2), (1, 0, 2), (2, 1, 0), (0, 2, 1)]:
        torch.testing.assert_close(mask.permute(*axes), mask)
    torch.testing.assert_close(mask.flip(0), mask)  # odd box: symmetric about N // 2
    even = soft_circle_mask(20, 5.5, 2.5, device=device)
    # Even box: mirror about N // 2 = 10 is index 20 − i, so compare rows 1 .. 19.
    torch.testing.assert_close(even[1:, 1:].flip(0), even[1:, 1:])
    torch.testing.assert_close(even.T, even)
    assert mask[c, c, c + 4].item() == mask[c + 4, c, c].item() == mask[c, c - 4, c].item()


@pytest.mark.parametrize(("radius", "edge"), [(20.0, 6.0), (12.5, 0.0), (15.0, 10.0)])
def test_volume_and_area_match_the_integral(
    device: torch.device, radius: float, edge: float
) -> None:
    sphere = soft_sphere_mask(64, radius, edge, device=device, dtype=torch.float64)
    circle = soft_circle_mask(64, radius, edge, device=device, dtype=torch.float64)
    # Lattice sums of a soft radial function converge fast; a hard edge is rougher.
    tolerance = 0.002 if edge > 0 else 0.02
    assert sphere.sum().item() == pytest.approx(sphere_volume(radius, edge), rel=tolerance)
    assert circle.sum().item() == pytest.approx(circle_area(radius, edge), rel=tolerance)


def test_batched_radii_and_hard_edge(device: torch.device) -> None:
    radii = torch.tensor([3.0, 5.0], device=device)
    batch = soft_circle_mask((16, 24), radii, 2.0)
    assert batch.shape == (2, 16, 24) and batch.device.type == device.type
    for i in range(2):
        torch.testing.assert_close(
            batch[i], soft_circle_mask((16, 24), radii[i].item(), 2.0, device)
        )
    hard = soft_circle_mask(16, 4.0, device=device)
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    assert hard[8, 12].item() == 1.0 and hard[8, 13].item() == 0.0
