"""Back-projection and map reconstruction: transpose identity, recovery of known volumes."""

from __future__ import annotations

import math

import torch

from cryorefine.engine.fourier import centred_rfftn, frequency_grid
from cryorefine.engine.projection import (
    PreparedVolume,
    extract_slices,
    padded_box_size,
    project_fourier,
    to_interpolation_layout,
)
from cryorefine.engine.reconstruct import (
    empty_accumulators,
    fold_interpolation_layout,
    insert_slices,
    reconstruct_map,
    symmetrise_friedel_plane,
    zero_pad_slices,
)
from cryorefine.engine.so3 import euler_to_matrix
from cryorefine.engine.symmetry import symmetry_operators
from relion_tools import band_limit, fsc, masked_noise_volume, random_rotations

BOX = 32


def shell_errors(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """‖Ê − T̂‖ / ‖T̂‖ in each Fourier shell round(|k| D): (D//2 + 1,)."""
    box = truth.shape[-1]
    k = torch.fft.fftfreq(box, dtype=torch.float64)
    shell = (k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2).sqrt() * box
    shell = shell.round().long().reshape(-1).clamp(max=box // 2 + 1)
    error = (torch.fft.fftn((estimate.double() - truth.double()).cpu()).abs() ** 2).reshape(-1)
    power = (torch.fft.fftn(truth.double().cpu()).abs() ** 2).reshape(-1)
    n = box // 2 + 2
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, shell, error)
    return (sums / torch.zeros(n, dtype=torch.float64).index_add_(0, shell, power)).sqrt()[:-1]


def quarter_turns_about_z(volume: torch.Tensor, turns: int) -> torch.Tensor:
    """The volume turned by turns · 90° about the z axis through the origin D//2 (exact).

    (x, y) -> (−y, x): swap the y and x axes, then mirror x about the origin (a flip
    mirrors about (D−1)/2, and a roll by one moves that onto D//2 for even D).
    """
    for _ in range(turns % 4):
        volume = torch.roll(torch.flip(volume.transpose(1, 2), dims=(2,)), 1, dims=2)
    return volume


def test_insert_is_the_transpose_of_extract(device: torch.device) -> None:
    """⟨extract(F), S⟩ = ⟨F, insert(S)⟩ (real inner product) for any grid F, slices S."""
    generator = torch.Generator().manual_seed(0)
    padded = padded_box_size(BOX, 2.0)
    shape = (padded, padded, padded // 2 + 1)
    grid = torch.randn(shape, generator=generator, dtype=torch.complex128).to(device)
    rotations = random_rotations(7, seed=1, dtype=torch.float64).to(device)
    slices = torch.randn((7, BOX, BOX // 2 + 1), generator=generator, dtype=torch.complex128)
    weights = torch.rand((7, BOX, BOX // 2 + 1), generator=generator, dtype=torch.float64)
    slices, weights = slices.to(device), weights.to(device)

    prepared = PreparedVolume.from_spectrum(to_interpolation_layout(grid), BOX, padded)
    data, weight = empty_accumulators(BOX, device=device, dtype=torch.float64)
    insert_slices(data, weight, slices, rotations, weights)
    forward = (extract_slices(prepared, rotations).conj() * slices).real.sum()
    backward = (grid.conj() * fold_interpolation_layout(data)).real.sum()
    torch.testing.assert_close(forward, backward, rtol=1e-10, atol=0.0)

    real_layout = to_interpolation_layout(grid.real.to(grid.dtype))
    real_grid = PreparedVolume.from_spectrum(real_layout, BOX, padded)
    forward = (extract_slices(real_grid, rotations).real * weights).sum()
    backward = (grid.real * fold_interpolation_layout(weight)).sum()
    torch.testing.assert_close(forward, backward, rtol=1e-10, atol=0.0)


def test_friedel_plane_symmetrisation_is_hermitian() -> None:
    generator = torch.Generator().manual_seed(2)
    spectrum = torch.randn((8, 8, 5), generator=generator, dtype=torch.complex128)
    plane = symmetrise_friedel_plane(spectrum)[:, :, 0]
    mirrored = plane[(-torch.arange(8)) % 8][:, (-torch.arange(8)) % 8]
    torch.testing.assert_close(plane, mirrored.conj())
    torch.testing.assert_close(symmetrise_friedel_plane(spectrum)[:, :, 1:], spectrum[:, :, 1:])
    # k = (0, 1, 2): F(0, 1, 2) + conj F(0, −1, −2).
    torch.testing.assert_close(plane[2, 1], spectrum[2, 1, 0] + spectrum[6, 7, 0].conj())


def test_dense_views_reconstruct_the_volume(device: torch.device) -> None:
    """1500 noise-free views of a band-limited zero-mean density: FSC > 0.99 up to shell
    15 of 16 (0.94 Nyquist) and per-shell error < 6 % from shell 1 up."""
    volume = band_limit(masked_noise_volume(BOX, radius=10.0, seed=3)).to(device)
    rotations = random_rotations(1500, seed=4).to(device)
    data, weight = empty_accumulators(BOX, device=device)
    insert_slices(data, weight, project_fourier(volume, rotations), rotations)
    estimate = reconstruct_map(data, weight, BOX)
    assert estimate.shape == (BOX, BOX, BOX) and estimate.device.type == device.type

    assert fsc(estimate, volume)[:16].min() > 0.99
    errors = shell_errors(estimate, volume)
    assert errors[1:16].max() < 0.06, errors


def test_low_resolution_bias_and_zero_padded_slices() -> None:
    """A positive density (large DC): D-size slices leave the documented low-resolution
    bias (DC < 30 %, shells 1-4 < 12 %); slices zero-padded to the padded box cut it to
    DC < 10 %, shells 1-4 < 8 %, at similar accuracy elsewhere."""
    volume = band_limit(masked_noise_volume(BOX, radius=10.0, seed=3, mean=1.0))
    rotations = random_rotations(1500, seed=4)
    slices = project_fourier(volume, rotations)
    data, weight = empty_accumulators(BOX)
    insert_slices(data, weight, slices, rotations)
    plain = shell_errors(reconstruct_map(data, weight, BOX), volume)

    padded_size = padded_box_size(BOX, 2.0)
    oversampled = zero_pad_slices(slices, padded_size)
    assert oversampled.shape == (1500, padded_size, padded_size // 2 + 1)
    # Exact except at the Nyquist row and column, where a real D × D image keeps only
    # the Hermitian part of the slice.
    rows = torch.arange(BOX) != BOX // 2
    torch.testing.assert_close(
        oversampled[..., ::2, : padded_size // 2 : 2][..., rows, :],
        slices[..., rows, :-1],
        atol=1e-3,
        rtol=1e-4,
    )
    data, weight = empty_accumulators(BOX)
    insert_slices(data, weight, oversampled, rotations)
    better = shell_errors(reconstruct_map(data, weight, BOX), volume)

    assert plain[0] < 0.3 and plain[1:5].max() < 0.12, plain
    assert better[0] < 0.1 and better[1:5].max() < 0.08, better
    assert better[5:16].max() < 0.08, better


def test_ctf_weighted_reconstruction_recovers_the_volume() -> None:
    """Images CTF · P̂ inserted as CTF · image with weights CTF², over several defoci,
    give back the volume: FSC > 0.99 up to shell 14 of 16."""
    volume = band_limit(masked_noise_volume(BOX, radius=10.0, seed=5))
    rotations = random_rotations(1200, seed=6)
    k2 = (frequency_grid((BOX, BOX)) ** 2).sum(-1)  # (cycles/px)², (D, D//2+1)
    # A simple CTF: sin(π λ Δf k² + amplitude-contrast phase), Δf per image in (px²·λ⁻¹).
    defocus = torch.linspace(60.0, 180.0, 1200)[:, None, None]
    ctf = torch.sin(math.pi * defocus * k2 + 0.1)
    images = ctf * project_fourier(volume, rotations)  # what the microscope records
    data, weight = empty_accumulators(BOX)
    insert_slices(data, weight, ctf * images, rotations, ctf**2)
    estimate = reconstruct_map(data, weight, BOX)
    assert fsc(estimate, volume)[:15].min() > 0.99
    # Without CTF weighting the CTF stays in the map: far worse.
    data, weight = empty_accumulators(BOX)
    insert_slices(data, weight, images, rotations)
    assert shell_errors(reconstruct_map(data, weight, BOX), volume)[2:15].min() > 0.3


def test_wiener_regularisation_on_noisy_data() -> None:
    """White noise (σ = 3 per pixel) on 400 views of a smooth density. With λ = σ²/τ²(shell)
    per unpadded voxel (σ², τ² in unnormalised-DFT units) the error is 5× below the plain
    average, and λ is close to optimal: 0.1 λ and 10 λ are both worse."""
    box, views, sigma = 32, 400, 3.0
    frequency = (frequency_grid((box,) * 3, rfft=False) ** 2).sum(-1).sqrt()
    smooth = torch.fft.ifftn(
        torch.fft.fftn(masked_noise_volume(box, 10.0, seed=7)) * torch.exp(-40.0 * frequency**2)
    )
    volume = smooth.real.float()
    shells = (frequency * box).round().long().reshape(-1)
    power = torch.fft.fftn(volume.double()).abs().reshape(-1) ** 2
    count = torch.zeros(box, dtype=torch.float64).index_add_(0, shells, torch.ones_like(power))
    tau2 = torch.zeros(box, dtype=torch.float64).index_add_(0, shells, power) / count.clamp(min=1)
    noise_power = box * box * sigma**2  # per Fourier sample of a D × D image

    rotations = random_rotations(views, seed=8)
    noise = sigma * torch.randn((views, box, box), generator=torch.Generator().manual_seed(9))
    slices = project_fourier(volume, rotations) + centred_rfftn(noise, ndim=2)
    data, weight = empty_accumulators(box)
    insert_slices(data, weight, slices, rotations)

    def error(regularisation: float | torch.Tensor) -> float:
        estimate = reconstruct_map(data, weight, box, regularisation=regularisation)
        return ((estimate - volume).norm() / volume.norm()).item()

    wiener = (noise_power / tau2).float()
    assert error(wiener) < error(0.0) / 5.0
    assert error(wiener) < min(error(0.1 * wiener), error(10.0 * wiener))
    # A constant per-shell tensor is the same as the scalar; huge λ gives an empty map.
    assert math.isclose(error(torch.full((4,), 50.0)), error(50.0), rel_tol=1e-6)
    assert reconstruct_map(data, weight, box, regularisation=1e30).abs().max() < 1e-6


def test_symmetry_operators_equal_inserting_every_equivalent_view() -> None:
    """Inserting view A under C4 operators R is inserting views A · R; for a C4-symmetric
    volume that fills Fourier space 4× faster than the views alone."""
    box = 24
    # Compact support (zero at the box edges), so the volume stays symmetric when padded.
    base = masked_noise_volume(box, radius=8.0, seed=10)
    volume = sum(quarter_turns_about_z(base, k) for k in range(4)) / 4.0
    operators = symmetry_operators("C4", dtype=torch.float32)
    quarter_turns = euler_to_matrix(torch.tensor([0.0, 90.0, 180.0, 270.0]), 0.0, 0.0).float()
    distinct = (operators[:, None] - quarter_turns[None]).abs().amax((-1, -2)) < 1e-6
    assert distinct.sum(1).eq(1).all()  # the module's C4 is the four turns about z
    rotations = random_rotations(60, seed=11)
    slices = project_fourier(volume, rotations)

    symmetric, symmetric_weight = empty_accumulators(box)
    insert_slices(symmetric, symmetric_weight, slices, rotations, symmetry_operators=operators)
    expanded_views = (rotations[:, None] @ operators).reshape(-1, 3, 3)
    expanded, expanded_weight = empty_accumulators(box)
    insert_slices(expanded, expanded_weight, slices.repeat_interleave(4, 0), expanded_views)
    torch.testing.assert_close(symmetric, expanded, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(symmetric_weight, expanded_weight, atol=1e-4, rtol=1e-5)
    # The projections of A · R really are those of A (the convention of the operators).
    torch.testing.assert_close(
        project_fourier(volume, expanded_views[1::4]),
        slices,
        atol=2e-2 * slices.abs().max(),
        rtol=0,
    )

    with_symmetry = fsc(reconstruct_map(symmetric, symmetric_weight, box), volume)
    plain, plain_weight = empty_accumulators(box)
    insert_slices(plain, plain_weight, slices, rotations)
    without = fsc(reconstruct_map(plain, plain_weight, box), volume)
    assert with_symmetry[:12].min() > 0.99
    assert with_symmetry[8:12].mean() > without[8:12].mean() + 0.02


def test_batch_shape_chunks_and_broadcast_weights_do_not_change_accumulators() -> None:
    volume = band_limit(masked_noise_volume(BOX, radius=10.0, seed=12))
    rotations = random_rotations(10, seed=13)
    slices = project_fourier(volume, rotations)
    weights = torch.rand(BOX, BOX // 2 + 1, generator=torch.Generator().manual_seed(14))

    reference = empty_accumulators(BOX)
    insert_slices(*reference, slices, rotations, weights)
    chunked = empty_accumulators(BOX)
    insert_slices(*chunked, slices, rotations, weights.expand(10, -1, -1), points_per_chunk=600)
    batched = empty_accumulators(BOX)
    insert_slices(*batched, slices.reshape(2, 5, BOX, -1), rotations.reshape(2, 5, 3, 3), weights)
    for other in (chunked, batched):
        for a, b in zip(reference, other, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    # Accumulators from separate batches add up.
    first, second = empty_accumulators(BOX), empty_accumulators(BOX)
    insert_slices(*first, slices[:4], rotations[:4], weights)
    insert_slices(*second, slices[4:], rotations[4:], weights)
    torch.testing.assert_close(first[0] + second[0], reference[0], atol=1e-4, rtol=1e-5)
