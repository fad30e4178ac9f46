"""FSC: identical maps, independent noise, known per-shell SNR, threshold crossing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryorefine.engine.fourier import radial_frequency
from cryorefine.engine.fsc import (
    fourier_shell_correlation,
    resolution_at_threshold,
    shell_frequencies,
)


def _noise(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device)


@pytest.mark.parametrize("shape", [(24, 24, 24), (31, 31), (20, 20)])
def test_fsc_of_a_map_with_itself_is_one(device: torch.device, shape: tuple[int, ...]) -> None:
    volume = _noise(shape, 0, device)
    fsc = fourier_shell_correlation(volume, 3.0 * volume + 0.0)
    assert fsc.shape == (shape[0] // 2 + 1,)
    torch.testing.assert_close(fsc, torch.ones_like(fsc))
    assert len(shell_frequencies(shape[0])) == fsc.shape[-1]
    assert shell_frequencies(shape[0])[-1].item() == pytest.approx((shape[0] // 2) / shape[0])


def test_fsc_matches_a_full_fft_brute_force(device: torch.device) -> None:
    a, b = _noise((2, 15, 16, 14), 1, device).unbind(0)
    ours = fourier_shell_correlation(a, b).cpu().numpy()
    fa, fb = np.fft.fftn(a.cpu().numpy()), np.fft.fftn(b.cpu().numpy())
    k = np.meshgrid(*(np.fft.fftfreq(n) for n in (15, 16, 14)), indexing="ij")
    shells = np.floor(np.sqrt(sum(x**2 for x in k)) * 16 + 0.5).astype(int).ravel()
    keep = shells <= 8
    cross = np.bincount(shells[keep], (fa * fb.conj()).real.ravel()[keep], 9)
    power_a = np.bincount(shells[keep], (np.abs(fa) ** 2).ravel()[keep], 9)
    power_b = np.bincount(shells[keep], (np.abs(fb) ** 2).ravel()[keep], 9)
    # engine.fourier's float32 frequencies can put a sample on a shell boundary on
    # the other side than numpy's float64: compare the shells within 1e-4.
    np.testing.assert_allclose(ours, cross / np.sqrt(power_a * power_b), atol=1e-4)


def test_fsc_of_independent_noise_is_near_zero(device: torch.device) -> None:
    a, b = _noise((2, 32, 32, 32), 2, device).unbind(0)
    fsc = fourier_shell_correlation(a, b)
    # Shell i holds ~4π i² samples, ~half independent: σ(FSC) ≈ 1/√(2π i²).
    shells = torch.arange(len(fsc), device=device, dtype=torch.float64)
    sigma = 1.0 / torch.sqrt(2 * math.pi * shells[2:] ** 2)
    assert (fsc[2:].abs() / sigma).max().item() < 4.5
    assert fsc[2:].mean().abs().item() < 3.0 / math.sqrt(len(fsc) - 2) * sigma.mean().item()


def test_fsc_of_signal_plus_noise_follows_snr(device: torch.device) -> None:
    """a = s + n1, b = s + n2 with per-shell SNR σ_s²/σ_n² known: FSC → SNR / (1 + SNR)."""
    size = 48
    shape = (size, size, size)
    radius = radial_frequency(shape, device=device, dtype=torch.float64)
    snr_of_k = 4.0 * torch.exp(-((radius / 0.15) ** 2))  # from 4 at DC to ~0 at Nyquist
    signal = torch.fft.irfftn(torch.fft.rfftn(_noise(shape, 3, device)) * snr_of_k.sqrt(), s=shape)
    a = signal + _noise(shape, 4, device)
    b = signal + _noise(shape, 5, device)
    fsc = fourier_shell_correlation(a, b)
    snr = 4.0 * torch.exp(-((shell_frequencies(size, device, torch.float64) / 0.15) ** 2))
    expected = snr / (1 + snr)
    # The estimate of a correlation ρ from n independent pairs has σ ≈ (1 − ρ²) / √n;
    # shell i holds ~4π i² samples, half of them independent (Friedel mates).
    shells = torch.arange(2, len(fsc), device=device, dtype=torch.float64)
    sigma = (1 - expected[2:] ** 2) / torch.sqrt(2 * math.pi * shells**2)
    z = (fsc[2:] - expected[2:]) / sigma
    assert z.abs().max().item() < 4.0
    assert z.mean().abs().item() < 3.0 / math.sqrt(len(z))
    assert fsc[5].item() == pytest.approx(expected[5].item(), abs=0.1)  # a mid shell, ρ ≈ 0.6


def test_batched_images_and_explicit_ndim(device: torch.device) -> None:
    a, b = _noise((2, 3, 16, 16), 6, device).unbind(0)
    batch = fourier_shell_correlation(a, b, ndim=2)
    assert batch.shape == (3, 9)
    for i in range(3):
        torch.testing.assert_close(batch[i], fourier_shell_correlation(a[i], b[i]))
    with pytest.raises(ValueError, match="ndim"):
        fourier_shell_correlation(a[None], b[None])  # 4 axes: batch of what?


def test_resolution_at_threshold_interpolates_the_first_crossing(device: torch.device) -> None:
    frequencies = shell_frequencies(64, device)
    pixel = 1.2
    fsc = torch.tensor(
        [1.0, 0.99, 0.9, 0.6, 0.3, 0.2, 0.1, 0.05, 0.3, 0.02], device=device
    )  # first crosses 0.143 between shells 5 (0.2) and 6 (0.1); later bump ignored
    fsc = torch.cat([fsc, torch.zeros(33 - len(fsc), device=device)])
    crossing = (5 + (0.2 - 0.143) / (0.2 - 0.1)) / 64
    resolution = resolution_at_threshold(fsc, frequencies, pixel)
    assert resolution.item() == pytest.approx(pixel / crossing, rel=1e-6)
    half_bit = resolution_at_threshold(fsc, frequencies, pixel, threshold=0.5)
    assert half_bit.item() == pytest.approx(pixel / ((3 + 0.1 / 0.3) / 64), rel=1e-6)
    # Never crossing: Nyquist (2 pixels); already below in shell 0: infinite.
    never = resolution_at_threshold(torch.ones(33, device=device), frequencies, pixel)
    assert never.item() == pytest.approx(2 * pixel)
    assert math.isinf(resolution_at_threshold(torch.zeros(33, device=device), frequencies, pixel))
    # Batched over leading dims.
    batch = resolution_at_threshold(
        torch.stack([fsc, torch.ones(33, device=device)]), frequencies, pixel
    )
    torch.testing.assert_close(batch, torch.stack([resolution, never]))
