"""Post-processing of two half maps: corrected FSC, Guinier B-factor, sharpening.

What RELION's relion_postprocess computes, as pure tensor functions:

* Phase randomisation (Chen et al. 2013): the Fourier phases of a map beyond a shell
  are replaced by random ones, the amplitudes kept. Masking two phase-randomised
  half maps measures how much correlation the mask alone creates (FSC_n), and
  FSC_true = (FSC_t − FSC_n) / (1 − FSC_n) beyond the randomisation shell removes it.
* Guinier fit (Rosenthal & Henderson 2003): ln of the mean Fourier amplitude in
  each shell against s² (s = |k| in 1/Å) is a straight line over the medium to high
  resolution range; its slope times 4 is the B-factor.
* Sharpening: the map times exp(−B s² / 4), the FSC weighting √(2 FSC / (1 + FSC))
  per shell, and a raised-cosine low-pass at the final resolution.

B-factor sign (RELION's): a map blurred by exp(−B₀ s² / 4), B₀ > 0, has a Guinier
slope −B₀ / 4; `guinier_fit` gives B = 4 × slope = −B₀, and `bfactor_filter(B)`
= exp(−B s² / 4) with that negative B undoes the blur. Negative B sharpens.

Shells are those of engine.fsc: shell i holds the samples with round(|k| N) = i and
stands for |k| = i / N cycles per pixel (i / (N p) per Å); samples beyond Nyquist
(shell > N // 2, the corners) belong to no FSC shell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryorefine.engine.fourier import (
    centred_irfftn,
    centred_rfftn,
    radial_frequency,
    rfft_column_weights,
)


def shell_indices(
    shape: tuple[int, int, int], device: torch.device | str | None = None
) -> torch.Tensor:
    """round(|k| N) of every sample of the half transform of a (d, h, w) volume.

    Returns:
        (d, h, w // 2 + 1) int64 shell index, N = max(shape).
    """
    radius = radial_frequency(shape, rfft=True, device=device, dtype=torch.float64)
    return torch.floor(radius * max(shape) + 0.5).long()


def shell_mean_amplitude(volume: torch.Tensor) -> torch.Tensor:
    """Mean Fourier amplitude |F| over each FSC shell of a volume (the full sphere).

    Args:
        volume: real (d, h, w).

    Returns:
        (N // 2 + 1,) float64 mean |F| per shell (`fsc.shell_frequencies(N)`), with
        torch's unscaled forward transform; 0 in an empty shell.
    """
    shape = (volume.shape[-3], volume.shape[-2], volume.shape[-1])
    amplitude = torch.fft.rfftn(volume.double(), dim=(-3, -2, -1)).abs()
    shells = shell_indices(shape, volume.device)
    weight = rfft_column_weights(shape[-1], device=volume.device).expand(shells.shape)
    n_shells = max(shape) // 2 + 1
    inside = shells < n_shells
    sums = torch.zeros(n_shells, dtype=torch.float64, device=volume.device)
    counts = torch.zeros_like(sums)
    sums = sums.index_add(0, shells[inside], (amplitude * weight)[inside])
    counts = counts.index_add(0, shells[inside], weight[inside])
    return torch.where(counts > 0, sums / counts.clamp(min=1.0), 0.0)


def profile_on_grid(profile: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """A per-shell profile laid on the half-transform grid by shell index.

    Args:
        profile: (n,) values for shells 0 .. n − 1.
        shape: (d, h, w) real-space shape.

    Returns:
        (d, h, w // 2 + 1) profile[round(|k| N)], 0 beyond the last shell.
    """
    shells = shell_indices(shape, profile.device)
    inside = shells < profile.shape[-1]
    values = profile[shells.clamp(max=profile.shape[-1] - 1)]
    return torch.where(inside, values, torch.zeros_like(values))


def randomise_phases(
    volume: torch.Tensor, from_shell: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The volume with random Fourier phases in every shell ≥ `from_shell`.

    The random phases are those of the transform of real white noise, so they keep
    the Hermitian symmetry of a real map: the result is real, its transform has
    exactly the volume's amplitudes everywhere and its phases in shells < `from_shell`
    (the corners beyond Nyquist count as beyond every shell).

    Args:
        volume: real (d, h, w).
        from_shell: first shell whose phases are randomised (round(|k| N) ≥ this).
        generator: seeded torch.Generator for the noise, drawn on the generator's
            device: a CPU generator gives the same phases whatever the volume's device.

    Returns:
        real (d, h, w), the volume's dtype.
    """
    shape = (volume.shape[-3], volume.shape[-2], volume.shape[-1])
    transform = centred_rfftn(volume.double(), 3)
    where = volume.device if generator is None else generator.device
    noise = torch.randn(shape, generator=generator, dtype=torch.float64, device=where)
    noise = noise.to(volume.device)
    noise_transform = centred_rfftn(noise, 3)
    noise_amplitude = noise_transform.abs()
    # A zero-amplitude noise sample (probability zero) has no phase: give it phase 0.
    unit = torch.where(
        noise_amplitude > 0,
        noise_transform / noise_amplitude.clamp(min=torch.finfo(torch.float64).tiny),
        torch.ones_like(noise_transform),
    )
    randomised = transform.abs() * unit
    beyond = shell_indices(shape, volume.device) >= from_shell
    mixed = torch.where(beyond, randomised, transform)
    return centred_irfftn(mixed, shape).to(volume.dtype)


def randomisation_shell(fsc_unmasked: torch.Tensor, threshold: float = 0.8) -> int:
    """First shell (≥ 1) where the unmasked FSC is below `threshold` (RELION: 0.8).

    Phases are randomised from this shell on (RELION's --randomize_at_fsc).

    Returns:
        shell index in 1 .. N // 2, or N // 2 + 1 (nothing to randomise) if the FSC
        never falls below.
    """
    below = fsc_unmasked[1:] < threshold
    if not bool(below.any()):
        return fsc_unmasked.shape[-1]
    return int(torch.argmax(below.to(torch.uint8))) + 1


def shell_at_resolution(
    resolution_angstrom: float, box_size: int, pixel_size_angstrom: float
) -> int:
    """First shell at or beyond 1 / resolution: ⌈N p / resolution⌉, in 1 .. N // 2 + 1."""
    shell = math.ceil(box_size * pixel_size_angstrom / resolution_angstrom - 1e-9)
    return max(1, min(shell, box_size // 2 + 1))


def corrected_fsc(
    fsc_masked: torch.Tensor, fsc_randomised: torch.Tensor, from_shell: int
) -> torch.Tensor:
    """Chen et al. (2013): FSC_true = (FSC_t − FSC_n) / (1 − FSC_n) in shells ≥ from_shell.

    Args:
        fsc_masked: (n,) FSC of the masked half maps (FSC_t).
        fsc_randomised: (n,) FSC of the masked phase-randomised half maps (FSC_n).
        from_shell: first corrected shell; the shells before keep FSC_t.

    Returns:
        (n,) corrected FSC; 0 where FSC_n is 1 (the mask alone explains everything).
    """
    index = torch.arange(fsc_masked.shape[-1], device=fsc_masked.device)
    denominator = 1.0 - fsc_randomised
    safe = denominator > 1e-9
    corrected = torch.where(
        safe, (fsc_masked - fsc_randomised) / torch.where(safe, denominator, 1.0), 0.0
    )
    return torch.where(index >= from_shell, corrected, fsc_masked)


@dataclass(frozen=True)
class GuinierFit:
    """A straight line ln A = intercept + slope · s² through some shells.

    bfactor_angstrom2 = 4 · slope (RELION's sign: negative for falling amplitudes,
    and exp(−B s² / 4) with it sharpens); correlation: Pearson's r of the fitted
    points; used: (n,) bool, the shells in the fit.
    """

    bfactor_angstrom2: float
    intercept: float
    correlation: float
    used: torch.Tensor

    @property
    def slope(self) -> float:
        """d ln A / d s², Å²."""
        return self.bfactor_angstrom2 / 4.0


def guinier_fit(
    amplitude: torch.Tensor,
    frequency_per_angstrom: torch.Tensor,
    low_resolution_angstrom: float,
    high_resolution_angstrom: float,
) -> GuinierFit:
    """Least-squares line through ln A against s² for low ≥ 1/s ≥ high (Rosenthal & Henderson).

    Args:
        amplitude: (n,) mean amplitude per shell (`shell_mean_amplitude`).
        frequency_per_angstrom: (n,) s of each shell, 1/Å.
        low_resolution_angstrom, high_resolution_angstrom: the fitted range, Å.

    Raises:
        ValueError: fewer than 3 shells with a positive amplitude in the range.
    """
    s = frequency_per_angstrom.double()
    used = (
        (s >= 1.0 / low_resolution_angstrom - 1e-12)
        & (s <= 1.0 / high_resolution_angstrom + 1e-12)
        & (amplitude > 0)
    )
    count = int(used.sum())
    if count < 3:
        raise ValueError(
            f"only {count} shell(s) between {low_resolution_angstrom:.3g} Å and "
            f"{high_resolution_angstrom:.3g} Å for the Guinier fit (3 needed)"
        )
    x = s[used].square()
    y = torch.log(amplitude[used].double())
    dx, dy = x - x.mean(), y - y.mean()
    slope = (dx * dy).sum() / dx.square().sum()
    intercept = y.mean() - slope * x.mean()
    correlation = (dx * dy).sum() / torch.sqrt(dx.square().sum() * dy.square().sum())
    return GuinierFit(4.0 * float(slope), float(intercept), float(correlation), used)


def bfactor_filter(
    shape: tuple[int, int, int],
    pixel_size_angstrom: float,
    bfactor_angstrom2: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """exp(−B s² / 4) on the half-transform grid, s = |k| / p in 1/Å (B < 0 sharpens).

    Returns:
        (d, h, w // 2 + 1) float64.
    """
    s = radial_frequency(shape, rfft=True, device=device, dtype=torch.float64)
    s = s / pixel_size_angstrom
    return torch.exp(-0.25 * bfactor_angstrom2 * s.square())


def fsc_weighting(fsc: torch.Tensor) -> torch.Tensor:
    """Rosenthal & Henderson's √(2 FSC / (1 + FSC)) per shell; 0 where FSC ≤ 0."""
    positive = fsc.clamp(min=0.0)
    return torch.sqrt(2.0 * positive / (1.0 + positive))


def lowpass_edge(
    shape: tuple[int, int, int],
    cutoff_shell: float,
    edge_width_shells: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Raised-cosine low-pass centred on `cutoff_shell` (½ there), `edge_width_shells` wide.

    RELION's --filter_edge_width: 1 up to cutoff − width/2, 0 from cutoff + width/2.

    Returns:
        (d, h, w // 2 + 1) float64 in [0, 1].
    """
    radius = radial_frequency(shape, rfft=True, device=device, dtype=torch.float64) * max(shape)
    if edge_width_shells <= 0:
        return (radius <= cutoff_shell).double()
    t = ((radius - (cutoff_shell - 0.5 * edge_width_shells)) / edge_width_shells).clamp(0, 1)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def sharpen(
    volume: torch.Tensor,
    pixel_size_angstrom: float,
    bfactor_angstrom2: float,
    fsc: torch.Tensor | None = None,
    lowpass_resolution_angstrom: float | None = None,
    edge_width_shells: float = 2.0,
) -> torch.Tensor:
    """Map × exp(−B s² / 4) × √(2 FSC / (1 + FSC)) × low-pass at a resolution.

    Args:
        volume: real (d, h, w).
        pixel_size_angstrom: Å per voxel.
        bfactor_angstrom2: B, RELION's sign (negative sharpens).
        fsc: (N // 2 + 1,) FSC per shell for the weighting; None: no weighting.
        lowpass_resolution_angstrom: low-pass cutoff, Å; None: none.
        edge_width_shells: width of the low-pass raised-cosine edge, shells.

    Returns:
        real (d, h, w), the volume's dtype.
    """
    shape = (volume.shape[-3], volume.shape[-2], volume.shape[-1])
    device = volume.device
    factor = bfactor_filter(shape, pixel_size_angstrom, bfactor_angstrom2, device)
    if fsc is not None:
        factor = factor * profile_on_grid(fsc_weighting(fsc.double()), shape)
    if lowpass_resolution_angstrom is not None:
        cutoff = max(shape) * pixel_size_angstrom / lowpass_resolution_angstrom
        factor = factor * lowpass_edge(shape, cutoff, edge_width_shells, device)
    transform = centred_rfftn(volume.double(), 3) * factor
    return centred_irfftn(transform, shape).to(volume.dtype)
