"""Fourier grids and the conventions every engine module follows.

Conventions (the one place they are written down):

* Array axes are (..., y, x) for images and (z, y, x) for volumes. Coordinate
  *vectors* are ordered (x, y[, z]), the order RELION's rotation matrices act on;
  a grid's last dimension therefore holds (x, y) or (x, y, z).
* The origin of a box of size N is the pixel N // 2 (RELION's and Leopard-EM's
  choice). Real-space coordinates are pixel offsets from that origin.
* Transforms are "centred": the origin pixel is moved to index 0 (ifftshift)
  before the FFT, so a real, centred object has a real, phase-free transform and
  Fourier slices need no phase ramps. `centred_irfftn` undoes it (fftshift).
* Half transforms (rfft) along x; the other axes keep the FFT order (DC at index 0,
  not shifted). Frequencies are in cycles per pixel, in [-0.5, 0.5).
* Normalisation is torch's default ("backward"): forward unscaled, inverse 1/N.
"""

from __future__ import annotations

import torch


def centred_rfftn(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Half transform of the last `ndim` axes of `x`, with the origin at N // 2.

    Args:
        x: real (..., [z], y, x) array.
        ndim: 2 for images, 3 for volumes.

    Returns:
        complex (..., [z], y, x // 2 + 1) transform, DC at index 0.
    """
    dims = tuple(range(-ndim, 0))
    return torch.fft.rfftn(torch.fft.ifftshift(x, dim=dims), dim=dims)


def centred_irfftn(f: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `centred_rfftn` for a real array whose last axes have `shape`."""
    dims = tuple(range(-len(shape), 0))
    return torch.fft.fftshift(torch.fft.irfftn(f, s=shape, dim=dims), dim=dims)


def frequency_grid(
    shape: tuple[int, ...],
    rfft: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Frequencies of every Fourier sample of an array of `shape`, in cycles per pixel.

    Args:
        shape: (y, x) or (z, y, x) real-space shape.
        rfft: the half transform along x (as `centred_rfftn`) or the full one.

    Returns:
        (*fourier_shape, ndim) with the last axis ordered (kx, ky[, kz]).
    """
    axes = []
    for i, n in enumerate(shape):
        is_x = i == len(shape) - 1
        frequencies = torch.fft.rfftfreq if (rfft and is_x) else torch.fft.fftfreq
        axes.append(frequencies(n, device=device, dtype=dtype))
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh[::-1], dim=-1)


def radial_frequency(
    shape: tuple[int, ...],
    rfft: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """|k| in cycles per pixel of every Fourier sample: (*fourier_shape,)."""
    return torch.linalg.vector_norm(frequency_grid(shape, rfft, device, dtype), dim=-1)


def rfft_column_weights(
    width: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """How many samples of the full transform each rfft column stands for.

    Columns 1 … (W − 1) // 2 also hold their hidden mirrors (weight 2); column 0 and,
    for an even W, the Nyquist column W / 2 stand for themselves only (weight 1).

    Returns:
        (W // 2 + 1,) weights, for sums over a half grid that equal full-grid sums.
    """
    weights = torch.full((width // 2 + 1,), 2.0, device=device, dtype=dtype)
    weights[0] = 1.0
    if width % 2 == 0:
        weights[-1] = 1.0
    return weights


def coordinate_grid(
    shape: tuple[int, ...],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Real-space pixel offsets from the box origin N // 2.

    Returns:
        (*shape, ndim) with the last axis ordered (x, y[, z]).
    """
    axes = [torch.arange(n, device=device, dtype=dtype) - n // 2 for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh[::-1], dim=-1)


def phase_shift(f: torch.Tensor, shift: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Translate a centred half transform by `shift` pixels (sub-pixel, periodic).

    Args:
        f: (..., *fourier_shape) complex, from `centred_rfftn` of an array of `shape`.
        shift: (..., ndim) translation in pixels, ordered (x, y[, z]); a positive
            x shift moves the content towards larger x.
        shape: real-space shape of the transformed axes.

    Returns:
        (..., *fourier_shape) complex transform of the translated array.
    """
    k = frequency_grid(shape, rfft=True, device=f.device, dtype=shift.dtype)
    ndim = len(shape)
    shift = shift.reshape(*shift.shape[:-1], *([1] * ndim), ndim)
    phase = -2.0 * torch.pi * (k * shift).sum(dim=-1)
    return f * torch.polar(torch.ones_like(phase), phase).to(f.dtype)
