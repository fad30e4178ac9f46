"""Fourier filters of images: radial power spectra, whitening, soft band-pass.

Frequencies are in cycles per pixel, as in `engine.fourier`; filters are real
(..., h, w // 2 + 1) arrays on the layout of `frequency_grid` (rfft along x, DC at
index 0), applied with `apply_filter`.

Radial profiles are sampled at |k| = i / N cycles per pixel, N = max(h, w), out to
the corner of the grid (|k| up to √2 / 2), so a profile covers every Fourier sample
of the image it came from. A sample at |k| N = i + t (0 ≤ t < 1) counts with weight
1 − t in shell i and t in shell i + 1 (linear binning): the adjoint of the linear
interpolation that lays a profile back on a grid, so that whitening an image with
its own profile flattens it without a bias, and each shell averages over about two
rings of samples (the sparse shells near the corner need it).
"""

from __future__ import annotations

import math

import torch

from cryorefine.engine.fourier import (
    centred_irfftn,
    centred_rfftn,
    radial_frequency,
    rfft_column_weights,
)


def radial_shell_frequencies(
    shape: tuple[int, int], device: torch.device | str | None = None
) -> torch.Tensor:
    """|k| in cycles per pixel of each shell of a radial profile of (h, w) images.

    Returns:
        (n_shells,) = i / max(h, w), i = 0 .. n_shells − 1, the last at or just beyond
        the grid's corner.
    """
    return torch.arange(_shell_count(shape), device=device, dtype=torch.float32) / max(shape)


def radial_power_spectrum(images: torch.Tensor) -> torch.Tensor:
    """Rotationally averaged power spectrum |F(k)|² / (h w) of images.

    The average is over the full Fourier plane (the rfft's hidden half counted
    through its mirror samples), so unit-variance white noise gives ≈ 1 in every shell.

    Args:
        images: real (..., h, w).

    Returns:
        (..., n_shells) power per shell; shell i stands for |k| = i / max(h, w)
        cycles per pixel (`radial_shell_frequencies`).
    """
    shape = (images.shape[-2], images.shape[-1])
    power = torch.fft.rfftn(images, dim=(-2, -1)).abs().square() / (shape[0] * shape[1])
    return _radial_mean(power, shape)


def radial_profile_on_grid(
    profile: torch.Tensor,
    shell_width: float,
    shape: tuple[int, int],
    rfft: bool = True,
) -> torch.Tensor:
    """Linear interpolation of a radial profile at every Fourier sample of a grid.

    Args:
        profile: (..., n) values at |k| = i · shell_width, i = 0 .. n − 1.
        shell_width: spacing of the profile in cycles per pixel (1 / N of the image
            it was measured on), so a micrograph's profile can be laid on a
            template's smaller grid.
        shape: (h, w) real-space shape of the target grid.
        rfft: target the half transform (h, w // 2 + 1) or the full one (h, w).

    Returns:
        (..., h, w // 2 + 1) or (..., h, w); beyond the last shell the last value.
    """
    radius = radial_frequency(shape, rfft=rfft, device=profile.device, dtype=profile.dtype)
    position = (radius / shell_width).clamp(max=profile.shape[-1] - 1)
    lower = position.floor().long().clamp(max=profile.shape[-1] - 2).clamp(min=0)
    fraction = position - lower
    flat_lower = lower.reshape(-1)
    below = profile[..., flat_lower].reshape(*profile.shape[:-1], *lower.shape)
    if profile.shape[-1] == 1:
        return below
    above = profile[..., flat_lower + 1].reshape(*profile.shape[:-1], *lower.shape)
    return torch.lerp(below, above, fraction)


def whitening_filter(images: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Filter 1 / √P(|k|) that flattens the images' radially averaged power P.

    Applied to the images themselves (`whiten`) it makes their radial power
    spectrum 1 in every shell; 2DTM applies a micrograph's filter to the templates
    too, on the templates' own grid (`shape`).

    Args:
        images: real (..., h, w) images whose power spectrum is measured.
        shape: (h', w') grid to lay the filter on; the images' shape by default.

    Returns:
        real (..., h', w' // 2 + 1) filter on the rfft layout. Shells with no power
        (a blank image) get a filter of 0, not infinity.
    """
    image_shape = (images.shape[-2], images.shape[-1])
    power = radial_power_spectrum(images)
    tiny = torch.finfo(power.dtype).tiny
    inverse_amplitude = torch.where(power > 0, power.clamp(min=tiny).rsqrt(), 0.0)
    return radial_profile_on_grid(
        inverse_amplitude, 1.0 / max(image_shape), shape or image_shape, rfft=True
    )


def whiten(images: torch.Tensor) -> torch.Tensor:
    """Images with a flat (unit) radially averaged power spectrum: (..., h, w) -> (..., h, w)."""
    return apply_filter(images, whitening_filter(images))


def lowpass_filter(
    shape: tuple[int, ...],
    cutoff: float,
    edge_width: float,
    rfft: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """1 up to `cutoff`, raised-cosine fall to 0 at `cutoff + edge_width`, 0 beyond.

    Args:
        shape: (h, w) real-space image shape, or (d, h, w) for a volume.
        cutoff, edge_width: cycles per pixel (edge_width 0 gives a hard edge).
        rfft: half (..., w // 2 + 1) or full (..., w) layout.

    Returns:
        real float32 filter on the `frequency_grid` layout.
    """
    radius = radial_frequency(shape, rfft=rfft, device=device)
    return _raised_cosine_step(radius, cutoff, edge_width)


def lowpass_volume(
    volume: torch.Tensor, resolution_angstrom: float, pixel_size_angstrom: float
) -> torch.Tensor:
    """A (D, D, D) map low-passed to `resolution_angstrom`, as RELION's --ini_high.

    The raised-cosine edge is two Fourier shells (2 / D cycles/px) wide and centred on
    the cutoff pixel_size / resolution.
    """
    shape = tuple(volume.shape)
    edge = 2.0 / shape[-1]
    cutoff = pixel_size_angstrom / resolution_angstrom - edge / 2
    transfer = lowpass_filter(shape, cutoff, edge, device=volume.device)
    return centred_irfftn(centred_rfftn(volume, ndim=3) * transfer, shape)


def highpass_filter(
    shape: tuple[int, int],
    cutoff: float,
    edge_width: float,
    rfft: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """0 up to `cutoff − edge_width`, raised-cosine rise to 1 at `cutoff`, 1 beyond.

    Arguments and result as `lowpass_filter`.
    """
    radius = radial_frequency(shape, rfft=rfft, device=device)
    return 1.0 - _raised_cosine_step(radius, cutoff - edge_width, edge_width)


def bandpass_filter(
    shape: tuple[int, int],
    low_cutoff: float | None,
    high_cutoff: float | None,
    edge_width: float,
    rfft: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Keeps `low_cutoff` ≤ |k| ≤ `high_cutoff` (cycles per pixel) with soft edges.

    The product of `highpass_filter(low_cutoff)` and `lowpass_filter(high_cutoff)`;
    None leaves that side open. Arguments and result otherwise as `lowpass_filter`.
    """
    radius = radial_frequency(shape, rfft=rfft, device=device)
    result = torch.ones_like(radius)
    if low_cutoff is not None:
        result = result * (1.0 - _raised_cosine_step(radius, low_cutoff - edge_width, edge_width))
    if high_cutoff is not None:
        result = result * _raised_cosine_step(radius, high_cutoff, edge_width)
    return result


def apply_filter(images: torch.Tensor, filter_ft: torch.Tensor) -> torch.Tensor:
    """Multiply the images' centred half transform by a real filter and transform back.

    Args:
        images: real (..., h, w).
        filter_ft: real (..., h, w // 2 + 1) on the rfft layout (broadcasts with images).

    Returns:
        real (..., h, w) filtered images.
    """
    shape = (images.shape[-2], images.shape[-1])
    return centred_irfftn(centred_rfftn(images, 2) * filter_ft, shape)


def _raised_cosine_step(radius: torch.Tensor, start: float, width: float) -> torch.Tensor:
    """1 for radius ≤ start, ½(1 + cos(π (radius − start) / width)) up to start + width, then 0."""
    if width <= 0:
        return (radius <= start).to(radius.dtype)
    t = ((radius - start) / width).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def _shell_count(shape: tuple[int, int]) -> int:
    """Shells 0 .. ⌈|k|max N⌉ so that every sample's upper neighbour shell exists."""
    # The farthest sample: |ky| = (h // 2) / h (fftfreq), kx = (w // 2) / w (rfftfreq).
    corner = math.hypot((shape[0] // 2) / shape[0], (shape[1] // 2) / shape[1])
    return math.ceil(corner * max(shape) - 1e-9) + 1


def radial_shell_mean(
    values: torch.Tensor, shape: tuple[int, int], shell_width: float, n_shells: int
) -> torch.Tensor:
    """Linearly binned mean of rfft-layout values over the full Fourier plane.

    Shell i stands for |k| = i · shell_width (cycles/pixel); a sample at i + t shells
    counts 1 − t in shell i and t in shell i + 1; samples beyond the last shell count
    in it. Columns 1 .. (w − 1) // 2 also stand for their hidden mirror samples.

    Args:
        values: real (..., h, w // 2 + 1).
        shape: (h, w) of the real-space image.

    Returns:
        (..., n_shells); 0 in a shell no sample reaches.
    """
    position = radial_frequency(shape, device=values.device, dtype=torch.float64) / shell_width
    position = position.clamp(max=n_shells - 1)
    lower = position.floor().long().clamp(max=max(n_shells - 2, 0))
    upper = (lower + 1).clamp(max=n_shells - 1)
    fraction = (position - lower).to(values.dtype)
    mirror = rfft_column_weights(shape[1], device=values.device, dtype=values.dtype)
    weight_lower = (mirror * (1.0 - fraction)).reshape(-1)
    weight_upper = (mirror * fraction).reshape(-1)
    lower, upper = lower.reshape(-1), upper.reshape(-1)
    flat = values.reshape(*values.shape[:-2], -1)
    sums = torch.zeros(*values.shape[:-2], n_shells, device=values.device, dtype=values.dtype)
    sums = sums.index_add(-1, lower, flat * weight_lower).index_add(-1, upper, flat * weight_upper)
    counts = torch.zeros(n_shells, device=values.device, dtype=values.dtype)
    counts = counts.index_add(0, lower, weight_lower).index_add(0, upper, weight_upper)
    return torch.where(counts > 0, sums / counts.clamp(min=1e-30), 0.0)


def _radial_mean(values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Full-plane, linearly binned mean of real rfft-layout (..., h, w // 2 + 1) -> (..., n)."""
    return radial_shell_mean(values, shape, 1.0 / max(shape), _shell_count(shape))
