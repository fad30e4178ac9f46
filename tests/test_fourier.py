"""The Fourier conventions of engine/fourier.py, checked on objects whose transforms are known."""

from __future__ import annotations

import pytest
import torch

from cryorefine.engine.fourier import (
    centred_irfftn,
    centred_rfftn,
    coordinate_grid,
    frequency_grid,
    phase_shift,
    radial_frequency,
    rfft_column_weights,
)


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (6, 8, 10)])
def test_a_delta_at_the_origin_has_a_real_constant_transform(
    shape: tuple[int, ...], device: torch.device
) -> None:
    delta = torch.zeros(shape, device=device)
    delta[tuple(n // 2 for n in shape)] = 1.0
    transform = centred_rfftn(delta, ndim=len(shape))
    torch.testing.assert_close(transform, torch.ones_like(transform))
    torch.testing.assert_close(centred_irfftn(transform, shape), delta)


def test_grids_are_ordered_x_y_z_and_centred(device: torch.device) -> None:
    coordinates = coordinate_grid((4, 5, 6), device=device)
    assert coordinates.shape == (4, 5, 6, 3)
    # Index (z, y, x) = (2, 2, 3) is the origin N // 2; x varies along the last axis.
    assert coordinates[2, 2, 3].tolist() == [0.0, 0.0, 0.0]
    assert coordinates[2, 2, 5].tolist() == [2.0, 0.0, 0.0]
    assert coordinates[0, 2, 3].tolist() == [0.0, 0.0, -2.0]
    k = frequency_grid((4, 6), device=device)
    assert k.shape == (4, 4, 2)
    assert k[0, 3].tolist() == [0.5, 0.0]  # x Nyquist on the half axis
    assert k[2, 0].tolist() == [0.0, -0.5]  # y Nyquist in FFT order
    torch.testing.assert_close(radial_frequency((4, 6), device=device), k.norm(dim=-1))


def test_phase_shift_moves_content_by_sub_pixel_amounts(device: torch.device) -> None:
    shape = (32, 32)
    coordinates = coordinate_grid(shape, device=device, dtype=torch.float64)

    def gaussian(centre_xy: list[float]) -> torch.Tensor:
        offset = coordinates - torch.tensor(centre_xy, device=device, dtype=torch.float64)
        return torch.exp(-(offset**2).sum(-1) / (2 * 2.0**2))

    shift = torch.tensor([2.5, -1.25], device=device, dtype=torch.float64)
    moved = centred_irfftn(phase_shift(centred_rfftn(gaussian([0, 0]), 2), shift, shape), shape)
    torch.testing.assert_close(moved, gaussian([2.5, -1.25]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("width", [12, 13])
def test_weighted_half_grid_sums_equal_full_grid_sums(width: int) -> None:
    """Σ over the rfft half grid with column weights = Σ |F|² over the full transform."""
    image = torch.randn(10, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    half = torch.fft.rfft2(image).abs().square()
    full = torch.fft.fft2(image).abs().square()
    weighted = (half * rfft_column_weights(width)).sum()
    assert weighted.item() == pytest.approx(full.sum().item(), rel=1e-12)
