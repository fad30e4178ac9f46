"""engine.postprocess against truths: phase randomisation, Chen's corrected FSC, the
Guinier B-factor of maps with a known blur, FSC weighting and sharpening."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryorefine.engine.fourier import centred_irfftn, centred_rfftn, radial_frequency
from cryorefine.engine.fsc import (
    fourier_shell_correlation,
    resolution_at_threshold,
    shell_frequencies,
)
from cryorefine.engine.masks import soft_sphere_mask
from cryorefine.engine.postprocess import (
    bfactor_filter,
    corrected_fsc,
    fsc_weighting,
    guinier_fit,
    lowpass_edge,
    profile_on_grid,
    randomisation_shell,
    randomise_phases,
    sharpen,
    shell_at_resolution,
    shell_indices,
    shell_mean_amplitude,
)
from cryorefine.simulate.atoms import AtomicModel, potential_from_atoms

BOX = 48
PIXEL = 1.0
BLUR = 100.0  # Å², exp(−B s² / 4)


def random_positions(n: int, radius_angstrom: float, seed: int) -> torch.Tensor:
    """(n, 3) float64 positions (x, y, z) uniform in a ball, Å from the box origin."""
    generator = torch.Generator().manual_seed(seed)
    points = (torch.rand(4 * n, 3, generator=generator, dtype=torch.float64) * 2 - 1) * (
        radius_angstrom
    )
    return points[points.norm(dim=1) < radius_angstrom][:n]


def gaussian_atoms(box: int, pixel: float, positions: torch.Tensor, bfactor: float) -> torch.Tensor:
    """Σ exp(−|r − c|² / 2σ²) with 8π²σ² = B: point atoms blurred by exp(−B s² / 4).

    Random positions give Wilson statistics: the expected |F|² in a shell is n times
    that of one atom, so ln(mean |F|) = const − B s² / 4 exactly in expectation.
    """
    sigma = math.sqrt(bfactor / (8 * math.pi**2))
    axis = (torch.arange(box, dtype=torch.float64) - box // 2) * pixel
    factors = [
        torch.exp(-((axis[None, :] - positions[:, i, None]) ** 2) / (2 * sigma**2))
        for i in range(3)
    ]
    return torch.einsum("nz,ny,nx->zyx", factors[2], factors[1], factors[0])


def analytic_blur(volume: torch.Tensor, pixel: float, bfactor: float) -> torch.Tensor:
    """The volume times exp(−B s² / 4) on the full FFT grid, written out independently."""
    n = volume.shape[-1]
    k = np.fft.fftfreq(n) / pixel
    s2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    spectrum = np.fft.fftn(volume.numpy()) * np.exp(-bfactor * s2 / 4)
    return torch.from_numpy(np.fft.ifftn(spectrum).real)


def frequencies_per_angstrom(box: int = BOX, pixel: float = PIXEL) -> torch.Tensor:
    return shell_frequencies(box, dtype=torch.float64) / pixel


# --- phase randomisation -------------------------------------------------------------


def test_phase_randomisation_keeps_amplitudes_and_low_phases(device: torch.device) -> None:
    generator = torch.Generator(device=device).manual_seed(3)
    volume = torch.randn((BOX,) * 3, dtype=torch.float64, device=device, generator=generator)
    from_shell = 8
    randomised = randomise_phases(volume, from_shell, torch.Generator(device).manual_seed(1))
    assert randomised.dtype == volume.dtype and randomised.shape == volume.shape
    original, changed = centred_rfftn(volume, 3), centred_rfftn(randomised, 3)
    scale = float(original.abs().max())
    # Exact amplitudes everywhere (the random phases are Hermitian: the result is real).
    assert torch.allclose(changed.abs(), original.abs(), atol=1e-10 * scale)
    low = shell_indices((BOX,) * 3, device) < from_shell
    assert torch.allclose(changed[low], original[low], atol=1e-10 * scale)
    fsc = fourier_shell_correlation(volume, randomised).cpu()
    assert torch.allclose(fsc[:from_shell], torch.ones(from_shell, dtype=torch.float64))
    # Beyond: decorrelated. A shell of n samples has FSC of std ≈ 1 / √n (n ≥ 800 here).
    beyond = fsc[from_shell:]
    assert beyond.abs().max() < 0.12, beyond
    assert abs(float(beyond.mean())) < 0.02
    # Seeded: the same seed gives the same map, another seed another one; a CPU
    # generator gives the same phases on any device.
    again = randomise_phases(volume, from_shell, torch.Generator(device).manual_seed(1))
    other = randomise_phases(volume, from_shell, torch.Generator(device).manual_seed(2))
    assert torch.equal(again, randomised)
    assert not torch.allclose(other, randomised)
    on_cpu = randomise_phases(volume.cpu(), from_shell, torch.Generator().manual_seed(5))
    anywhere = randomise_phases(volume, from_shell, torch.Generator().manual_seed(5))
    assert torch.allclose(anywhere.cpu(), on_cpu, atol=1e-12)


def test_randomisation_and_resolution_shells() -> None:
    fsc = torch.tensor([1.0, 0.99, 0.95, 0.85, 0.79, 0.9, 0.3, 0.1], dtype=torch.float64)
    assert randomisation_shell(fsc, 0.8) == 4  # first shell below, not counting shell 0
    assert randomisation_shell(torch.ones(8), 0.8) == 8  # never: nothing to randomise
    # 64 px at 1.5 Å: shell i is 96 / i Å; 9.6 Å is shell 10, 10 Å lies between 9 and 10.
    assert shell_at_resolution(9.6, 64, 1.5) == 10
    assert shell_at_resolution(10.0, 64, 1.5) == 10
    assert shell_at_resolution(2.0, 64, 1.5) == 33  # beyond Nyquist: nothing randomised
    corrected = corrected_fsc(
        torch.tensor([1.0, 0.9, 0.8, 0.6, 0.5]), torch.tensor([1.0, 0.9, 0.5, 0.2, 1.0]), 2
    )
    # (0.8 − 0.5) / 0.5, (0.6 − 0.2) / 0.8; FSC_n = 1 gives 0; shells before 2 kept.
    assert torch.allclose(corrected, torch.tensor([1.0, 0.9, 0.6, 0.5, 0.0]))


def stationary_half_maps(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Half maps = a stationary random field + independent unit white noise.

    The field's power S(k) = 10⁴ exp(−(k / 0.05)²) (k cycles/px) is the same
    everywhere in the box, so the SNR and thus the FSC of any region, masked or not,
    is S / (S + 1): the unmasked FSC is the truth a mask-corrected FSC must match.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (64, 64, 64)
    k = radial_frequency(shape, dtype=torch.float64)
    amplitude = 100.0 * torch.exp(-0.5 * (k / 0.05) ** 2)
    white = torch.randn(shape, generator=generator, dtype=torch.float64)
    field = centred_irfftn(centred_rfftn(white, 3) * amplitude, shape)
    half1 = field + torch.randn(shape, generator=generator, dtype=torch.float64)
    half2 = field + torch.randn(shape, generator=generator, dtype=torch.float64)
    return half1, half2


def test_corrected_fsc_of_masked_half_maps_matches_the_unmasked_fsc() -> None:
    half1, half2 = stationary_half_maps()
    mask = soft_sphere_mask(64, 20.0, 1.0, dtype=torch.float64)  # a sharp mask: worst case
    fsc_unmasked = fourier_shell_correlation(half1, half2)
    fsc_masked = fourier_shell_correlation(half1 * mask, half2 * mask)
    from_shell = randomisation_shell(fsc_unmasked)
    generator = torch.Generator().manual_seed(0)
    random1 = randomise_phases(half1, from_shell, generator)
    random2 = randomise_phases(half2, from_shell, generator)
    fsc_random = fourier_shell_correlation(random1 * mask, random2 * mask)
    fsc_true = corrected_fsc(fsc_masked, fsc_random, from_shell + 2)

    frequencies = shell_frequencies(64, dtype=torch.float64)
    shell_of = {
        name: 64.0 / float(resolution_at_threshold(fsc, frequencies, 1.0))
        for name, fsc in [("unmasked", fsc_unmasked), ("masked", fsc_masked), ("true", fsc_true)]
    }
    # Measured: unmasked crosses 0.143 at shell 10.8, masked at 23.7, corrected at 10.8.
    assert shell_of["masked"] > shell_of["unmasked"] + 8, shell_of  # the mask's inflation
    assert shell_of["true"] == pytest.approx(shell_of["unmasked"], abs=0.5), shell_of
    beyond = slice(from_shell + 2, None)
    error = (fsc_true - fsc_unmasked)[beyond]
    # Measured: max 0.15, mean |error| 0.032 (the masked FSCs see ~14 % of the box).
    assert error.abs().max() < 0.2 and error.abs().mean() < 0.06, error
    assert (fsc_masked - fsc_unmasked)[beyond].max() > 0.5  # a test that could fail


# --- Guinier fit ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_guinier_fit_recovers_the_blur_of_random_gaussian_atoms(seed: int) -> None:
    volume = gaussian_atoms(BOX, PIXEL, random_positions(400, 16.0, seed), BLUR)
    fit = guinier_fit(shell_mean_amplitude(volume), frequencies_per_angstrom(), 10.0, 3.0)
    # RELION's sign: a map blurred by B = 100 Å² fits B = −100. Measured: −99.6, −100.4.
    assert fit.bfactor_angstrom2 == pytest.approx(-BLUR, rel=0.05)
    assert fit.correlation < -0.99
    assert fit.slope == pytest.approx(fit.bfactor_angstrom2 / 4)
    s = frequencies_per_angstrom()
    used = fit.used
    assert float(s[used].min()) >= 0.1 - 1e-12 and float(s[used].max()) <= 1 / 3.0 + 1e-12


def test_guinier_fit_measures_the_b_factor_added_to_an_atomic_potential() -> None:
    """Carbon atoms' potentials (Peng form factors, voxel-integrated, simulate.atoms):
    adding 100 Å² to every atom's B-factor changes the fitted B by −100 Å²."""
    positions = random_positions(400, 16.0, seed=2)
    n = len(positions)
    model = AtomicModel(
        positions,
        ("C",) * n,
        torch.zeros(n, dtype=torch.float64),
        torch.ones(n, dtype=torch.float64),
    )
    centre = torch.zeros(3, dtype=torch.float64)
    fits = [
        guinier_fit(
            shell_mean_amplitude(
                potential_from_atoms(
                    model, BOX, PIXEL, centre, b_factor_offset_angstrom2=extra, dtype=torch.float64
                )
            ),
            frequencies_per_angstrom(),
            10.0,
            3.0,
        ).bfactor_angstrom2
        for extra in (0.0, BLUR)
    ]
    # Measured: −21.9 and −122.1 Å² (carbon's own form factor falls like B ≈ 22 Å²).
    assert fits[1] - fits[0] == pytest.approx(-BLUR, rel=0.05)
    assert -35.0 < fits[0] < -10.0


def test_guinier_fit_needs_three_shells() -> None:
    with pytest.raises(ValueError, match="3 needed"):
        guinier_fit(torch.ones(25), frequencies_per_angstrom(), 10.0, 9.0)


def test_shell_mean_amplitude_matches_a_brute_force_full_transform() -> None:
    volume = torch.randn((20, 20, 20), generator=torch.Generator().manual_seed(0))
    amplitude = np.abs(np.fft.fftn(volume.double().numpy()))
    k = np.fft.fftfreq(20)
    shell = np.floor(
        np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2) * 20 + 0.5
    ).astype(int)
    expected = [amplitude[shell == i].mean() for i in range(11)]
    assert np.allclose(shell_mean_amplitude(volume).numpy(), expected, rtol=1e-10)


# --- weighting and sharpening --------------------------------------------------------


def test_fsc_weighting_values() -> None:
    fsc = torch.tensor([1.0, 1.0 / 7.0, 0.0, -0.2, 1.0 / 3.0], dtype=torch.float64)
    # √(2 FSC / (1 + FSC)): 1 at 1; 0.5 at 1/7 ≈ 0.143 (C_ref = 0.5, the origin of the 0.143
    # threshold); 0 at or below 0; √(1/2) at 1/3.
    expected = torch.tensor([1.0, 0.5, 0.0, 0.0, math.sqrt(0.5)], dtype=torch.float64)
    assert torch.allclose(fsc_weighting(fsc), expected, atol=1e-12)


def test_lowpass_edge_and_profile_on_grid() -> None:
    shape = (32, 32, 32)
    edge = lowpass_edge(shape, 10.0, 2.0)
    radius = radial_frequency(shape, dtype=torch.float64) * 32
    assert torch.all(edge[radius <= 9.0] == 1.0) and torch.all(edge[radius >= 11.0] == 0.0)
    assert torch.allclose(edge[radius == 10.0], torch.tensor(0.5, dtype=torch.float64))
    profile = torch.arange(17, dtype=torch.float64)
    grid = profile_on_grid(profile, shape)
    shells = torch.floor(radius + 0.5)
    assert torch.equal(grid, torch.where(shells <= 16, shells, 0.0))


def test_sharpening_undoes_a_known_blur(device: torch.device) -> None:
    truth = gaussian_atoms(BOX, PIXEL, random_positions(300, 16.0, 5), 10.0)
    blurred = analytic_blur(truth, PIXEL, BLUR)
    restored = sharpen(blurred.to(device), PIXEL, -BLUR).cpu()
    assert torch.allclose(restored, truth, atol=1e-9 * float(truth.abs().max()))
    # bfactor_filter is the same factor on the half grid: exp(−B s² / 4).
    s = radial_frequency((BOX,) * 3, dtype=torch.float64) / PIXEL
    assert torch.allclose(bfactor_filter((BOX,) * 3, PIXEL, BLUR), torch.exp(-BLUR * s**2 / 4))


def test_auto_sharpening_flattens_the_guinier_plot() -> None:
    blurred = gaussian_atoms(BOX, PIXEL, random_positions(400, 16.0, 7), BLUR)
    s = frequencies_per_angstrom()
    fit = guinier_fit(shell_mean_amplitude(blurred), s, 10.0, 3.0)
    fsc = torch.ones(BOX // 2 + 1, dtype=torch.float64)
    sharpened = sharpen(blurred, PIXEL, fit.bfactor_angstrom2, fsc, 3.0, 2.0)
    after = guinier_fit(shell_mean_amplitude(sharpened), s, 10.0, 3.3)
    # Measured: B of the sharpened map −2.5 Å² (fit −104 before) below the low-pass edge (it
    # starts at 3.2 Å); what is left is the scatter of the Wilson statistics about the line.
    assert abs(after.bfactor_angstrom2) < 6.0
    # The low-pass edge runs from radius 15 to 17 (3 Å is shell 16): shells from 18 on hold
    # only samples beyond it (shell 17 holds radii 16.5 .. 17.5).
    amplitude = shell_mean_amplitude(sharpened)
    assert float(amplitude[18:].max()) < 1e-12 * float(amplitude[1])
    assert float(amplitude[17]) > 1e-3 * float(amplitude[1])
