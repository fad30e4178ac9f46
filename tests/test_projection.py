"""Fourier-slice projection against analytic projections and exact grid identities."""

from __future__ import annotations

import pytest
import torch

from cryorefine.engine.fourier import centred_rfftn, coordinate_grid
from cryorefine.engine.projection import (
    extract_slices,
    gridding_kernel_transform,
    padded_box_size,
    prepare_for_projection,
    project,
    project_fourier,
    shift_for_origin,
)
from cryorefine.engine.so3 import euler_to_matrix
from relion_tools import (
    anisotropic_blobs,
    band_limit,
    gaussian_projection,
    gaussian_volume,
    masked_noise_volume,
    random_rotations,
)

BOX = 64
COVARIANCE = torch.tensor([[9.0, 2.0, 0.0], [2.0, 6.0, 1.0], [0.0, 1.0, 4.0]])
CENTRE = (5.0, -3.0, 2.0)  # px from the box centre
GENERIC_VIEWS = [(30.0, 40.0, 50.0), (123.0, 77.0, -20.0), (10.0, 5.0, 3.0), (-70.0, 150.0, 100.0)]


def views(angles: list[tuple[float, float, float]], dtype: torch.dtype) -> torch.Tensor:
    return euler_to_matrix(*torch.tensor(angles, dtype=torch.float64).T).to(dtype)


def max_relative_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return ((estimate.double().cpu() - truth).abs().max() / truth.abs().max()).item()


def test_gaussian_matches_analytic_projection(device: torch.device) -> None:
    """Off-centre anisotropic Gaussian, generic views, pad 2: max error < 0.5 % of the peak."""
    volume = gaussian_volume(BOX, CENTRE, COVARIANCE).float().to(device)
    rotations = views(GENERIC_VIEWS, torch.float32).to(device)
    images = project(volume, rotations)
    assert images.device.type == device.type
    for image, rotation in zip(images, rotations, strict=True):
        truth = gaussian_projection(BOX, CENTRE, COVARIANCE, rotation.cpu())
        assert max_relative_error(image, truth) < 5e-3


def test_gaussian_error_falls_quadratically_with_padding() -> None:
    """Interpolation error ∝ (r / Np)²: pad 4 is ≥ 3× more accurate than pad 2."""
    centre = (10.0, -6.0, 4.0)
    volume = gaussian_volume(BOX, centre, COVARIANCE).float()
    rotations = views(GENERIC_VIEWS, torch.float32)
    errors = {}
    for pad in (2.0, 4.0):
        images = project(volume, rotations, pad_factor=pad)
        errors[pad] = max(
            max_relative_error(image, gaussian_projection(BOX, centre, COVARIANCE, rotation))
            for image, rotation in zip(images, rotations, strict=True)
        )
    assert errors[2.0] < 1.5e-2
    assert errors[4.0] < errors[2.0] / 3.0


def test_centred_blob_stays_centred_in_every_view(device: torch.device) -> None:
    """An isotropic centred Gaussian projects to the same centred 2D Gaussian in any view."""
    covariance = 2.25 * torch.eye(3)
    volume = gaussian_volume(BOX, (0.0, 0.0, 0.0), covariance).float().to(device)
    rotations = random_rotations(16, seed=4).to(device)
    images = project(volume, rotations).cpu()
    truth = gaussian_projection(BOX, (0.0, 0.0, 0.0), covariance, torch.eye(3))
    xy = coordinate_grid((BOX, BOX), dtype=torch.float64)
    central = slice(BOX // 4, 3 * BOX // 4)  # the pixel row −D/2 has no mirror partner
    for image in images:
        assert max_relative_error(image, truth) < 2e-3
        window = image.double()[central, central, None]
        centroid = (window * xy[central, central]).sum((0, 1)) / window.sum()
        assert centroid.abs().max() < 1e-3  # px; float32 rounding is ~1e-4
        assert divmod(int(image.argmax()), BOX) == (BOX // 2, BOX // 2)


def test_identity_view_is_sum_over_z(device: torch.device) -> None:
    """On grid nodes nothing is interpolated: without gridding correction the identity
    view is exactly Σ_z V; with it, exactly Σ_z V / S (the documented overshoot)."""
    volume = band_limit(masked_noise_volume(BOX, radius=20.0, seed=1)).to(device)
    identity = torch.eye(3, device=device)
    plain = prepare_for_projection(volume, gridding_correction=False)
    image = torch.fft.fftshift(
        torch.fft.irfftn(extract_slices(plain, identity), s=(BOX, BOX)), dim=(-2, -1)
    )
    torch.testing.assert_close(image, volume.sum(0), atol=2e-4, rtol=0.0)

    corrected = volume / gridding_kernel_transform(BOX, 2 * BOX, device)
    torch.testing.assert_close(
        project(volume, identity), band_limit(corrected).sum(0), atol=2e-4, rtol=0.0
    )


def test_quarter_turn_about_y_sums_along_x(device: torch.device) -> None:
    """A = euler(0, 90, 0) maps grid to grid: Aᵀ (x, y, z) = (z, y, −x), so the view is
    P(x, y) = Σ_X V(X, y, Z = −x), exactly (no interpolation, no gridding correction)."""
    volume = band_limit(masked_noise_volume(BOX, radius=20.0, seed=2)).to(device)
    rotation = euler_to_matrix(0.0, 90.0, 0.0).float().to(device)
    plain = prepare_for_projection(volume, gridding_correction=False)
    image = torch.fft.fftshift(
        torch.fft.irfftn(extract_slices(plain, rotation), s=(BOX, BOX)), dim=(-2, -1)
    )
    summed = volume.sum(-1)  # (Z, Y)
    z_index = (BOX - torch.arange(BOX, device=device)) % BOX  # Z = −x about the origin BOX//2
    expected = summed[z_index].T  # (y, x)
    torch.testing.assert_close(image, expected, atol=2e-4, rtol=0.0)


def test_project_fourier_is_transform_of_project(device: torch.device) -> None:
    """The slice is a consistent half transform (Friedel-symmetric kx = 0 column)."""
    volume = anisotropic_blobs(BOX).to(device)
    rotations = random_rotations(5, seed=7).to(device)
    slices = project_fourier(volume, rotations)
    assert slices.shape == (5, BOX, BOX // 2 + 1)
    torch.testing.assert_close(
        centred_rfftn(project(volume, rotations), ndim=2), slices, atol=2e-3, rtol=1e-4
    )


def test_rotating_the_volume_by_b_then_viewing_by_a_is_view_a_b() -> None:
    """W(s) = V(Bᵀ s) (V rotated by B) has projection(W, A) = projection(V, A · B).

    W is sampled analytically (a Gaussian with centre B c, covariance B Σ Bᵀ)."""
    a = views([(20.0, 50.0, -30.0), (100.0, 130.0, 10.0)], torch.float64)
    b = views([(-40.0, 70.0, 25.0)], torch.float64)[0]
    rotated = gaussian_volume(BOX, tuple((b @ torch.tensor(CENTRE).double()).tolist()),
                              b @ COVARIANCE.double() @ b.T)  # fmt: skip
    volume = gaussian_volume(BOX, CENTRE, COVARIANCE)
    lhs = project(rotated, a)
    rhs = project(volume, a @ b)
    assert (lhs - rhs).abs().max() / rhs.abs().max() < 5e-3
    # ...and A · B is not B · A: the test can tell the order.
    wrong = project(volume, b @ a)
    assert (lhs - wrong).abs().max() / rhs.abs().max() > 0.2


def test_batches_and_chunks_do_not_change_results(device: torch.device) -> None:
    volume = anisotropic_blobs(32).to(device)
    rotations = random_rotations(12, seed=3).to(device).reshape(3, 4, 3, 3)
    prepared = prepare_for_projection(volume)
    whole = extract_slices(prepared, rotations)
    assert whole.shape == (3, 4, 32, 17)
    chunked = extract_slices(prepared, rotations, points_per_chunk=1000)  # 1 view per chunk
    torch.testing.assert_close(chunked, whole, atol=0.0, rtol=0.0)
    one_by_one = torch.stack([extract_slices(prepared, r) for r in rotations.reshape(-1, 3, 3)])
    torch.testing.assert_close(one_by_one.reshape(whole.shape), whole, atol=1e-5, rtol=1e-5)


def test_double_precision_volume_gives_complex128() -> None:
    volume = gaussian_volume(32, (1.0, 2.0, 3.0), 4.0 * torch.eye(3))
    rotation = views([(30.0, 40.0, 50.0)], torch.float64)
    slices = project_fourier(volume, rotation)
    assert slices.dtype == torch.complex128
    image = project(volume, rotation)[0]
    truth = gaussian_projection(32, (1.0, 2.0, 3.0), 4.0 * torch.eye(3), rotation[0])
    assert max_relative_error(image, truth) < 1e-2
    single = project(volume.float(), rotation.float())[0]
    assert max_relative_error(single, image) < 1e-5


def test_padding_and_gridding_kernel() -> None:
    assert padded_box_size(64, 2.0) == 128
    assert padded_box_size(33, 2.0) == 66
    assert padded_box_size(50, 1.5) == 76
    assert padded_box_size(51, 1.0) == 52
    with pytest.raises(ValueError, match="pad_factor"):
        padded_box_size(64, 0.5)
    kernel = gridding_kernel_transform(8, 16, dtype=torch.float64)
    assert kernel[4, 4, 4] == 1.0
    # x = -4 px on a 16-px padded grid: sinc²(1/4) = (sin(π/4) / (π/4))².
    torch.testing.assert_close(
        kernel[4, 4, 0], torch.tensor((2**-0.5 / (torch.pi / 4)) ** 2, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="cube"):
        prepare_for_projection(torch.zeros(8, 8, 6))


def test_shift_for_origin_is_minus_origin_in_pixels() -> None:
    """The sign is pinned against relion_project in test_relion_conventions.py."""
    origins = torch.tensor([[3.0, -1.5], [0.0, 0.75]])
    torch.testing.assert_close(
        shift_for_origin(origins, 1.5), torch.tensor([[-2.0, 1.0], [0.0, -0.5]])
    )
