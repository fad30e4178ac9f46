"""Gaussian noise, white or with a given radial power spectrum, reproducible for a seed.

Random numbers are always drawn on the CPU from a seeded `torch.Generator` and then
moved to the requested device, so a seed gives the same noise on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cryorefine.engine.fourier import radial_frequency

PowerSpectrum = Callable[[torch.Tensor], torch.Tensor]


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`: the one source of randomness of a simulation."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    return generator


def white_noise(
    shape: tuple[int, ...],
    std: float,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Independent Gaussian samples of mean 0 and standard deviation `std`: `shape`."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return (std * noise).to(device=device, dtype=dtype)


def power_law_spectrum(exponent: float = 1.0, corner_frequency: float = 0.01) -> PowerSpectrum:
    """Relative power 1 / (k + k₀)^exponent of frequency k in cycles/pixel.

    exponent 1 is "1/f" noise; the corner k₀ (cycles/pixel) keeps the power finite
    near k = 0.
    """

    def power(frequency: torch.Tensor) -> torch.Tensor:
        return (frequency + corner_frequency) ** (-exponent)

    return power


def coloured_noise(
    shape: tuple[int, int],
    std: float,
    power_spectrum: PowerSpectrum,
    generator: torch.Generator,
    n: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Stationary Gaussian noise whose power at |k| is proportional to `power_spectrum`.

    White noise is filtered by sqrt(P(|k|)) in Fourier space (zero at k = 0, so the
    noise has mean 0) and scaled so that its expected variance is std²: by Parseval
    the variance of the filtered noise is the mean of P over the full Fourier grid.

    Args:
        shape: (h, w) image shape in pixels.
        std: expected standard deviation of a pixel.
        power_spectrum: relative power of a radial frequency in cycles/pixel (>= 0).
        n: number of images; None returns one (h, w) image, else (n, h, w).

    Returns:
        (h, w) or (n, h, w) noise.
    """
    full_shape = (1 if n is None else n, *shape)
    white = torch.randn(full_shape, generator=generator, dtype=torch.float32).to(device)
    k_half = radial_frequency(shape, rfft=True, device=white.device)
    k_full = radial_frequency(shape, rfft=False, device=white.device)
    power_half = power_spectrum(k_half).clamp_min(0.0)
    power_half[0, 0] = 0.0
    power_full = power_spectrum(k_full).clamp_min(0.0)
    power_full[0, 0] = 0.0
    scale = std / torch.sqrt(power_full.mean())
    filtered = torch.fft.irfft2(torch.fft.rfft2(white) * torch.sqrt(power_half), s=shape)
    noise = (scale * filtered).to(dtype)
    return noise[0] if n is None else noise
