"""Radial power spectra, whitening and soft band-pass filters against truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryorefine.engine.filters import (
    apply_filter,
    bandpass_filter,
    highpass_filter,
    lowpass_filter,
    lowpass_volume,
    radial_power_spectrum,
    radial_profile_on_grid,
    radial_shell_frequencies,
    radial_shell_mean,
    whiten,
    whitening_filter,
)
from cryorefine.engine.fourier import radial_frequency


def _noise(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device)


def _pink_noise(shape: tuple[int, int], seed: int, device: torch.device) -> torch.Tensor:
    """Noise with power ∝ 1 / |k| (amplitude |k|^(−1/2)), spanning a factor ~180 in power."""
    white = torch.fft.rfftn(_noise(shape, seed, device), dim=(-2, -1))
    radius = radial_frequency(shape, device=device, dtype=torch.float64)
    amplitude = radius.clamp(min=1.0 / max(shape)) ** -0.5
    return torch.fft.irfftn(white * amplitude, s=shape, dim=(-2, -1))


@pytest.mark.parametrize("shape", [(24, 24), (21, 30), (32, 17)])
def test_power_spectrum_matches_full_plane_brute_force(
    device: torch.device, shape: tuple[int, int]
) -> None:
    images = _noise((2, *shape), 0, device)
    ours = radial_power_spectrum(images).cpu().numpy()
    # The same linear binning over the full FFT plane, in numpy.
    size = max(shape)
    power = np.abs(np.fft.fft2(images.cpu().numpy())) ** 2 / (shape[0] * shape[1])
    ky, kx = np.meshgrid(np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1]), indexing="ij")
    position = np.hypot(kx, ky).ravel() * size
    lower = np.floor(position).astype(int)
    fraction = position - lower
    n = ours.shape[-1]
    assert n == len(radial_shell_frequencies(shape)) and lower.max() + 1 <= n
    counts = np.bincount(lower, 1 - fraction, n) + np.bincount(
        np.minimum(lower + 1, n - 1), fraction, n
    )
    for image, expected in zip(power, ours, strict=True):
        flat = image.ravel()
        sums = np.bincount(lower, flat * (1 - fraction), n) + np.bincount(
            np.minimum(lower + 1, n - 1), flat * fraction, n
        )
        # engine.fourier builds its frequencies in float32 (~1e-7 relative), which
        # moves the linear-binning weights slightly: hence 1e-4, not 1e-10.
        np.testing.assert_allclose(expected, sums / counts, rtol=1e-4)


def test_single_fourier_mode_lands_in_its_shell(device: torch.device) -> None:
    size = 64
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    # (ky, kx) = (4, 3) / N and (0, 5) / N: both at |k| = 5 / N.
    for ky, kx in [(4, 3), (0, 5)]:
        image = torch.cos(2 * math.pi * (ky * y + kx * x) / size).to(device)
        spectrum = radial_power_spectrum(image)
        assert spectrum.argmax().item() == 5
        others = torch.cat([spectrum[:5], spectrum[6:]])
        assert others.abs().max().item() < 1e-9 * spectrum[5].item()
    assert radial_shell_frequencies((size, size))[5].item() == pytest.approx(5 / size)


def test_white_noise_spectrum_is_its_variance(device: torch.device) -> None:
    images = 2.0 * _noise((8, 64, 64), 1, device)
    spectrum = radial_power_spectrum(images).mean(dim=0)
    # Shells 8 .. 32 average ≥ 8 × 25 independent |F|² (exponential, σ = mean):
    # σ ≤ 7% per shell, ~1% over all (50 seeds: ≤ 16% and ≤ 3.2%).
    assert (spectrum[8:33] / 4.0 - 1).abs().max().item() < 0.25
    assert spectrum[8:33].mean().item() / 4.0 == pytest.approx(1.0, abs=0.05)


def test_whitening_white_noise_changes_little(device: torch.device) -> None:
    image = _noise((256, 256), 2, device)
    radius = radial_frequency((256, 256), device=device)
    band = (radius > 0.05) & (radius < 0.5)
    filt = whitening_filter(image)
    # 1 / √P̂ with P̂ averaging ≥ 2 × 40 samples: within 25% of 1, ~1 on average
    # (a little above: E[1 / √P̂] > 1 / √E[P̂]); 30 seeds: ≤ 17% and ≤ 1.1%.
    assert (filt[band] - 1).abs().max().item() < 0.25
    assert filt[band].mean().item() == pytest.approx(1.0, abs=0.03)
    # The whitened image differs from the original by ~3% RMS (30 seeds: ≤ 3.1%).
    whitened = whiten(image)
    assert ((whitened - image).norm() / image.norm()).item() < 0.06
    # In bands of 4 shells the whitened spectrum is flat to 3% (30 seeds: ≤ 1.8%).
    after = radial_power_spectrum(whitened)[13:129]
    assert (after.reshape(-1, 4).mean(dim=-1) - 1).abs().max().item() < 0.03


def test_whitening_flattens_coloured_noise(device: torch.device) -> None:
    images = torch.stack([_pink_noise((256, 256), seed, device) for seed in (3, 4)])
    before = radial_power_spectrum(images)
    assert (before[:, 2] / before[:, 128]).min().item() > 20  # strongly coloured
    after = radial_power_spectrum(whiten(images))[:, 2:129]
    # Each image is whitened by its own spectrum: per shell within 25%, bands of
    # 8 shells within 4% (the residual is estimation noise, not colour; 30 seeds:
    # ≤ 21% and ≤ 1.1%).
    assert (after - 1).abs().max().item() < 0.25
    bands = after[:, 7:].reshape(2, -1, 8).mean(dim=-1)
    assert (bands - 1).abs().max().item() < 0.04
    # No trend left: low and high frequency halves agree.
    assert after[:, :60].mean().item() == pytest.approx(after[:, 60:].mean().item(), abs=0.02)


def test_whitening_filter_batches_and_moves_to_other_grids(device: torch.device) -> None:
    images = torch.stack([_pink_noise((64, 64), 5, device), _noise((64, 64), 6, device)])
    batch = whitening_filter(images)
    for i in range(2):
        torch.testing.assert_close(batch[i], whitening_filter(images[i]))
    # On a 32-pixel grid the samples are at multiples of 1/32 = every second shell of
    # the 64-pixel profile: the filter there is exactly those shells' values.
    small = whitening_filter(images, shape=(32, 32))
    assert small.shape == (2, 32, 17)
    torch.testing.assert_close(small[:, 0, :17], batch[:, 0, 0:33:2])
    torch.testing.assert_close(small[:, 5, 0], batch[:, 10, 0])


def test_shell_mean_of_a_constant_is_that_constant_where_samples_reach() -> None:
    shape = (6, 6)  # |k| takes few values: fine shells between them stay empty
    values = torch.full((2, 6, 4), 3.0, dtype=torch.float64)
    means = radial_shell_mean(values, shape, shell_width=0.01, n_shells=100)
    reached = means[0] != 0
    assert 0 < int(reached.sum()) < 100
    torch.testing.assert_close(means[:, reached], torch.full_like(means[:, reached], 3.0))
    # Samples beyond the last shell (|k| up to 0.71) count in it.
    coarse = radial_shell_mean(values, shape, shell_width=0.1, n_shells=3)
    torch.testing.assert_close(coarse, torch.full_like(coarse, 3.0))


def test_profile_interpolation_is_exact_for_a_linear_profile(device: torch.device) -> None:
    width = 1.0 / 50
    profile = 3.0 + 7.0 * torch.arange(30, device=device, dtype=torch.float64) * width
    on_grid = radial_profile_on_grid(profile, width, (40, 33), rfft=False)
    radius = radial_frequency((40, 33), rfft=False, device=device, dtype=torch.float64)
    expected = 3.0 + 7.0 * radius.clamp(max=29 * width)  # constant beyond the last shell
    torch.testing.assert_close(on_grid, expected)


@pytest.mark.parametrize("shape", [(64, 64), (45, 60)])
def test_lowpass_keeps_below_cutoff_and_removes_above_edge(
    device: torch.device, shape: tuple[int, int]
) -> None:
    cutoff, edge = 0.2, 0.05
    image = _noise(shape, 7, device)
    filtered = apply_filter(image, lowpass_filter(shape, cutoff, edge, device=device))
    radius = radial_frequency(shape, device=device, dtype=torch.float64)
    before = torch.fft.rfftn(image)
    after = torch.fft.rfftn(filtered)
    # Samples within 1e-6 of an edge could fall either side in float32: leave them out.
    kept, removed = radius <= cutoff - 1e-6, radius >= cutoff + edge + 1e-6
    torch.testing.assert_close(after[kept], before[kept])
    assert after[removed].abs().max().item() < 1e-10 * before.abs().max().item()
    middle = (radius > cutoff + 1e-6) & (radius < cutoff + edge - 1e-6)
    ratio = (after[middle] / before[middle]).real
    assert ratio.min().item() > 0 and ratio.max().item() < 1


def test_volume_lowpass_edge_is_centred_on_the_resolution(device: torch.device) -> None:
    box, pixel, resolution = 32, 2.0, 8.0  # cutoff 0.25 cycles/px, edge ±1 shell
    volume = torch.randn(box, box, box, device=device, dtype=torch.float64)
    transfer = torch.fft.fftn(lowpass_volume(volume, resolution, pixel)) / torch.fft.fftn(volume)
    radius = radial_frequency((box, box, box), rfft=False, device=device, dtype=torch.float64)
    cutoff, shell = pixel / resolution, 1 / box
    kept = transfer[radius <= cutoff - shell]
    torch.testing.assert_close(kept, torch.ones_like(kept))
    assert transfer[radius >= cutoff + shell].abs().max().item() < 1e-9
    at_cutoff = transfer[(radius - cutoff).abs() < 1e-9]
    assert at_cutoff.numel() == 6  # (±8, 0, 0) and its permutations
    torch.testing.assert_close(at_cutoff, torch.full_like(at_cutoff, 0.5))


def test_filter_shapes_and_edge_values(device: torch.device) -> None:
    shape = (64, 64)
    radius = radial_frequency(shape, device=device)
    low = lowpass_filter(shape, 0.25, 0.0625, device=device)
    high = highpass_filter(shape, 0.25, 0.0625, device=device)
    # |k| = 18/64 is the middle of the low-pass edge [16/64, 20/64]: ½.
    assert low[0, 18].item() == pytest.approx(0.5, abs=1e-6)
    assert high[0, 14].item() == pytest.approx(0.5, abs=1e-6)  # middle of [12/64, 16/64]
    assert torch.all(high[radius >= 0.25] == 1) and torch.all(high[radius <= 0.1875] == 0)
    band = bandpass_filter(shape, 0.1, 0.3, 0.05, device=device)
    expected = highpass_filter(shape, 0.1, 0.05, device=device) * lowpass_filter(
        shape, 0.3, 0.05, device=device
    )
    torch.testing.assert_close(band, expected)
    assert torch.equal(
        bandpass_filter(shape, None, None, 0.05, device=device), torch.ones_like(low)
    )
    hard = lowpass_filter(shape, 0.25, 0.0, rfft=False, device=device)
    assert hard.shape == shape
    assert torch.equal(hard, (radial_frequency(shape, rfft=False, device=device) <= 0.25).float())


def test_apply_filter_identity_and_batch(device: torch.device) -> None:
    images = _noise((3, 20, 22), 8, device)
    torch.testing.assert_close(apply_filter(images, torch.ones(20, 12, device=device)), images)
    filt = lowpass_filter((20, 22), 0.2, 0.1, device=device).double()
    batch = apply_filter(images, filt)
    for i in range(3):
        torch.testing.assert_close(batch[i], apply_filter(images[i], filt))
