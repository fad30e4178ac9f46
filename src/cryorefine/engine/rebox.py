"""New box size and pixel size of a map: real-space crop/pad and Fourier resampling.

Both keep the box origin at N // 2 (engine.fourier): the voxel at the origin of the
old box lands on the origin of the new one.

* `crop_or_pad`: the map cut out of, or set into, a box of another size (new
  voxels 0); the sampling is unchanged.
* `fourier_resample`: the same field sampled on M voxels per axis instead of N
  (pixel size × N / M) by cropping or zero-padding its centred transform, i.e.
  the trigonometric interpolant of the map evaluated on the new grid. Values keep
  their density scale: a constant map stays that constant, so the mean over the
  box is preserved. At an even size the Nyquist coefficient stands for both ±N/2:
  padding splits it evenly between the two, cropping to an even size folds +M/2
  onto −M/2, which makes padding then cropping back exact.
"""

from __future__ import annotations

import torch


def crop_or_pad(volume: torch.Tensor, size: int | tuple[int, ...], ndim: int = 3) -> torch.Tensor:
    """The last `ndim` axes cut or zero-padded to `size`, origin N // 2 kept at M // 2.

    Args:
        volume: real or complex (..., n₁, .., n_ndim).
        size: M, or (M₁, .., M_ndim), the new shape of those axes.

    Returns:
        (..., M₁, .., M_ndim), new voxels 0.
    """
    sizes = (size,) * ndim if isinstance(size, int) else tuple(size)
    result = volume
    for axis, new in zip(range(-ndim, 0), sizes, strict=True):
        old = result.shape[axis]
        if new == old:
            continue
        shape = list(result.shape)
        shape[axis] = new
        target = torch.zeros(shape, dtype=result.dtype, device=result.device)
        # New index j holds old index j − M//2 + N//2 where both exist.
        start_old = max(0, old // 2 - new // 2)
        start_new = max(0, new // 2 - old // 2)
        length = min(old - start_old, new - start_new)
        target.narrow(axis, start_new, length).copy_(result.narrow(axis, start_old, length))
        result = target
    return result


def _resample_axis(volume: torch.Tensor, axis: int, new: int) -> torch.Tensor:
    """One axis of `fourier_resample`: complex in, complex out."""
    old = volume.shape[axis]
    if new == old:
        return volume
    spectrum = torch.fft.fft(torch.fft.ifftshift(volume, dim=axis), dim=axis)
    frequency = torch.round(torch.fft.fftfreq(old, device=volume.device) * old).long()
    weight = torch.ones(old, dtype=torch.float64, device=volume.device)
    source = torch.arange(old, device=volume.device)
    if old % 2 == 0:
        # The old Nyquist sample stands for −N/2 and +N/2: half of it to each.
        nyquist = old // 2
        weight[nyquist] = 0.5
        source = torch.cat([source, source.new_tensor([nyquist])])
        frequency = torch.cat([frequency, frequency.new_tensor([old // 2])])
        weight = torch.cat([weight, weight.new_tensor([0.5])])
    if new % 2 == 0:
        # The new grid has −M/2 but not +M/2: what lands on +M/2 folds onto −M/2.
        frequency = torch.where(frequency == new // 2, -frequency, frequency)
    keep = (frequency >= -(new // 2)) & (frequency <= (new - 1) // 2)
    target = torch.remainder(frequency[keep], new)
    gathered = spectrum.index_select(axis, source[keep])
    shape = [1] * volume.dim()
    shape[axis] = -1
    gathered = gathered * weight[keep].reshape(shape).to(gathered.dtype)
    out_shape = list(volume.shape)
    out_shape[axis] = new
    result = torch.zeros(out_shape, dtype=spectrum.dtype, device=volume.device)
    result = result.index_add(axis, target, gathered)
    # ×(M / N): the inverse divides by M, the forward sum ran over N samples.
    return torch.fft.fftshift(torch.fft.ifft(result, dim=axis), dim=axis) * (new / old)


def fourier_resample(
    volume: torch.Tensor, size: int | tuple[int, ...], ndim: int = 3
) -> torch.Tensor:
    """The map on M instead of N voxels per axis, by Fourier cropping or zero-padding.

    The box's physical extent is kept: the new pixel size is the old one × N / M.

    Args:
        volume: real (..., n₁, .., n_ndim).
        size: M, or (M₁, .., M_ndim), the new shape of those axes.

    Returns:
        real (..., M₁, .., M_ndim), the volume's dtype (computed in float64 / complex128).
    """
    sizes = (size,) * ndim if isinstance(size, int) else tuple(size)
    result = volume.to(torch.complex128)
    for axis, new in zip(range(-ndim, 0), sizes, strict=True):
        result = _resample_axis(result, axis, new)
    return result.real.to(volume.dtype)


def resampled_size(size: int, pixel_size_angstrom: float, new_pixel_size_angstrom: float) -> int:
    """round(N · p_old / p_new): the box that holds the same extent at the new pixel size."""
    return max(1, round(size * pixel_size_angstrom / new_pixel_size_angstrom))
