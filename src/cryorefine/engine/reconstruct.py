"""Back-projection: insert central slices into a padded 3D transform, then finish a map.

The transpose of engine.projection's slice extraction. Each sample of a D × D centred
half transform (a particle image, or CTF · image) is splatted with the trilinear
weights of its position Aᵀ · (kx, ky, 0) into two accumulators on the padded grid of
the interpolation layout (engine.projection module docstring): `data` (complex, sum of
weight-spread samples) and `weight` (real, sum of the per-sample weights spread the
same way, e.g. CTF²). Samples with kx < 0 after rotation go to −k conjugated; the
mirror contributions to the kx = 0 plane are added once, in `reconstruct_map`.

`reconstruct_map` divides data by weight (plus an optional Wiener regularisation),
inverse-transforms, crops the padding and divides by the real-space transfer of the
trilinear kernel (engine.projection.gridding_kernel_transform): with dense sampling,
data / weight is the transform convolved with the kernel, i.e. the map times S(r).

For a CTF-weighted reconstruction insert slices CTF · X̂ with weights CTF²; for noise
weighting divide both by the noise power σ² of each sample.

Slices of the image box D land pad_factor grid steps apart, so at the lowest
frequencies (the first padded shells) the nearest samples are all farther out and the
weighted average is biased: ≈ 25 % at DC and ≈ 10 % in shells 1-3 for a positive
density at pad 2 (relion_reconstruct's DC is worse). Inserting the images zero-padded
to the padded box (`zero_pad_slices`, with weights evaluated on that finer grid) fills
those gaps: ≈ 3× smaller low-resolution errors, for pad_factor² more samples and
slightly larger errors near Nyquist.
"""

from __future__ import annotations

import torch

from cryorefine.engine.fourier import centred_irfftn, centred_rfftn, frequency_grid
from cryorefine.engine.projection import (
    frequency_points,
    gridding_kernel_transform,
    padded_box_size,
    rotations_per_chunk,
    trilinear_stencil,
)


def empty_accumulators(
    box_size: int,
    pad_factor: float = 2.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed data and weight accumulators for maps of edge `box_size`.

    Args:
        box_size: D (pixels) of the images and of the map.
        pad_factor: padded edge / D; the padded edge Np is engine.projection.padded_box_size.
        dtype: real dtype of the weights (the data is its complex counterpart).

    Returns:
        data: complex (Np + 2, Np + 2, Np//2 + 2); weight: real, same shape. Both in the
        interpolation layout; accumulators of separate workers or batches may be summed.
    """
    padded_size = padded_box_size(box_size, pad_factor)
    shape = (padded_size + 2, padded_size + 2, padded_size // 2 + 2)
    weight = torch.zeros(shape, device=device, dtype=dtype)
    return torch.zeros_like(weight, dtype=weight.dtype.to_complex()), weight


def insert_slices(
    data_accumulator: torch.Tensor,
    weight_accumulator: torch.Tensor,
    slices: torch.Tensor,
    rotations: torch.Tensor,
    weights: torch.Tensor | None = None,
    symmetry_operators: torch.Tensor | None = None,
    points_per_chunk: int | None = None,
) -> None:
    """Add central slices to the accumulators, in place (the transpose of extract_slices).

    Args:
        data_accumulator: complex (Np+2, Np+2, Np//2+2), from `empty_accumulators`.
        weight_accumulator: real, same shape.
        slices: complex (..., n, n//2+1) centred half transforms (e.g. CTF · image) of
            images of the map's box (n = D) or zero-padded ones (`zero_pad_slices`).
        rotations: (..., 3, 3) view matrices A of the slices (engine.so3); leading dims
            broadcast with those of `slices`.
        weights: real (..., D, D//2+1) per-sample weights broadcasting with `slices`
            (e.g. CTF²); None for 1.
        symmetry_operators: (n, 3, 3) matrices R with V(R·s) = V(s) (a group,
            identity included); each slice is inserted as the views A · R for all R.
        points_per_chunk: memory bound (engine.projection.DEFAULT_POINTS_PER_CHUNK if
            None); the result does not depend on it beyond float rounding.
    """
    box_size = slices.shape[-2]
    if slices.shape[-1] != box_size // 2 + 1:
        raise ValueError(f"slices must be (..., D, D//2+1) half transforms, got {slices.shape}")
    if weight_accumulator.shape != data_accumulator.shape:
        raise ValueError("data and weight accumulators must have the same shape")
    real_dtype = weight_accumulator.dtype
    device = weight_accumulator.device
    if weights is None:
        weights = torch.ones((), dtype=real_dtype, device=device)
    rotations = rotations.to(device=device, dtype=real_dtype)
    if symmetry_operators is not None:
        operators = symmetry_operators.to(device=device, dtype=real_dtype)
        # The view A of a symmetric volume is also the view A · R for every operator R.
        rotations = rotations[..., None, :, :] @ operators
        slices = slices.unsqueeze(-3)
        weights = weights.unsqueeze(-3) if weights.ndim >= 2 else weights
    batch_shape = torch.broadcast_shapes(
        slices.shape[:-2], weights.shape[:-2], rotations.shape[:-2]
    )
    samples = box_size * (box_size // 2 + 1)
    flat_slices = slices.to(device=device).expand(*batch_shape, box_size, box_size // 2 + 1)
    flat_weights = weights.to(device=device, dtype=real_dtype)
    if flat_weights.ndim < 2:
        flat_weights = flat_weights.expand(box_size, box_size // 2 + 1)
    flat_weights = flat_weights.expand(*batch_shape, box_size, box_size // 2 + 1)
    frequencies = frequency_grid((box_size, box_size), rfft=True, device=device, dtype=real_dtype)
    insert_samples(
        data_accumulator,
        weight_accumulator,
        flat_slices.reshape(-1, samples),
        rotations.expand(*batch_shape, 3, 3).reshape(-1, 3, 3),
        frequencies.reshape(-1, 2),
        flat_weights.reshape(-1, samples),
        points_per_chunk,
    )


def insert_samples(
    data_accumulator: torch.Tensor,
    weight_accumulator: torch.Tensor,
    samples: torch.Tensor,
    rotations: torch.Tensor,
    frequencies: torch.Tensor,
    weights: torch.Tensor,
    points_per_chunk: int | None = None,
) -> None:
    """Add central-slice samples at chosen frequencies to the accumulators, in place.

    The transpose of engine.projection.extract_samples; `insert_slices` is this for
    every frequency of a D × D half transform.

    Args:
        data_accumulator: complex (Np+2, Np+2, Np//2+2), from `empty_accumulators`.
        weight_accumulator: real, same shape.
        samples: complex (B, S) values (e.g. CTF · image) at `frequencies`.
        rotations: (B, 3, 3) view matrices A of the samples' slices.
        frequencies: (S, 2) (kx, ky) in cycles per voxel of the map; samples beyond
            Nyquist are not inserted.
        weights: real (B, S) per-sample weights (e.g. CTF²).
        points_per_chunk: memory bound; the result does not depend on it beyond rounding.
    """
    padded_size = data_accumulator.shape[0] - 2
    real_dtype = weight_accumulator.dtype
    device = weight_accumulator.device
    rotations = rotations.to(device=device, dtype=real_dtype)
    frequencies = frequencies.to(device=device, dtype=real_dtype)
    samples = samples.to(device=device, dtype=data_accumulator.dtype)
    weights = weights.to(device=device, dtype=real_dtype)
    # (real, imag) interleaved: 1D index_add_ is the fast path on CPU and CUDA alike.
    data_flat = torch.view_as_real(data_accumulator).view(-1)
    weight_flat = weight_accumulator.view(-1)
    grid_shape = (data_accumulator.shape[0], data_accumulator.shape[1], data_accumulator.shape[2])
    step = rotations_per_chunk(frequencies.shape[0], points_per_chunk)
    for start in range(0, rotations.shape[0], step):
        points, conjugate, inside = frequency_points(
            rotations[start : start + step], frequencies, padded_size
        )
        values = samples[start : start + step]
        values = torch.view_as_real(torch.where(conjugate, values.conj(), values))
        sample_weights = weights[start : start + step] * inside
        values = values * inside[:, None]
        real, imag = values.unbind(-1)
        for index, kernel in trilinear_stencil(points, grid_shape):
            index = index.reshape(-1)
            data_flat.index_add_(0, 2 * index, (real * kernel).reshape(-1))
            data_flat.index_add_(0, 2 * index + 1, (imag * kernel).reshape(-1))
            weight_flat.index_add_(0, index, (sample_weights * kernel).reshape(-1))


def fold_interpolation_layout(grid: torch.Tensor) -> torch.Tensor:
    """Accumulator (Np+2, Np+2, Np//2+2) -> (Np, Np, Np//2+1) half transform in FFT order.

    Inverse-shifts z and y and adds what was splatted onto the k = +Np/2 planes (index Np)
    to their periodic copies at −Np/2; the outermost border (beyond Nyquist) is dropped.
    """
    n = grid.shape[0] - 2
    folded = grid[: n + 1, : n + 1, : n // 2 + 1].clone()
    folded[0] += folded[n]
    folded[:, 0] += folded[:, n]  # row 0 now includes the (+n, +n) corner
    return torch.fft.ifftshift(folded[:n, :n], dim=(0, 1))


def zero_pad_slices(slices: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Half transforms of the images zero-padded about their origin to Np × Np.

    Exact oversampling of images that vanish at their box edges; insert the result with
    weights evaluated on the Np grid (same pixel size, e.g. ctf_2d((Np, Np), ...)).

    Args:
        slices: complex (..., D, D//2 + 1) centred half transforms.
        padded_size: Np ≥ D (e.g. engine.projection.padded_box_size(D, pad_factor)).

    Returns:
        complex (..., Np, Np//2 + 1); for Np = 2 D its even samples are `slices`.
    """
    box_size = slices.shape[-2]
    images = centred_irfftn(slices, (box_size, box_size))
    start = padded_size // 2 - box_size // 2
    padded = images.new_zeros((*images.shape[:-2], padded_size, padded_size))
    padded[..., start : start + box_size, start : start + box_size] = images
    return centred_rfftn(padded, ndim=2)


def symmetrise_friedel_plane(half_spectrum: torch.Tensor) -> torch.Tensor:
    """Add the kx = 0 plane's Friedel mirror: F(0, k) + conj(F(0, −k)).

    A half-transform accumulator misses the mirror −k of samples inserted near kx = 0;
    this adds them. Real inputs (weights) get F(0, k) + F(0, −k).

    Args:
        half_spectrum: (Np, Np, Np//2 + 1) in FFT order.

    Returns:
        The same shape, with the kx = 0 plane made Hermitian.
    """
    plane = half_spectrum[:, :, 0]
    mirror = torch.roll(torch.flip(plane, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    out = half_spectrum.clone()
    out[:, :, 0] = plane + mirror.conj()
    return out


def reconstruct_map(
    data_accumulator: torch.Tensor,
    weight_accumulator: torch.Tensor,
    box_size: int,
    regularisation: float | torch.Tensor = 0.0,
    min_relative_weight: float = 1e-6,
    gridding_correction: bool = True,
) -> torch.Tensor:
    """Finish a map from the accumulators: V̂ = data / (weight + λ), back to real space.

    Args:
        data_accumulator: complex (Np+2, Np+2, Np//2+2) from `insert_slices`.
        weight_accumulator: real, same shape.
        box_size: D (pixels) of the map.
        regularisation: λ, added to the weights: a constant, or a real (n_shells,) tensor
            per Fourier shell s = round(|k| · D) (k in cycles/pixel; shells ≥ n_shells
            use the last value). Units of one inserted sample's weight per voxel of the
            unpadded D grid, i.e. RELION's σ²/τ²(s) for weights CTF² (σ², τ² in
            unnormalised-DFT units): it is scaled by (D / Np)³ here, the density of
            samples per padded voxel (measured optimal for D-size slices; multiply by
            (Np / D)² for slices from `zero_pad_slices`). 0 for a plain weighted average
            (exact for noise-free, CTF-free data).
        min_relative_weight: Fourier voxels whose weight is below this fraction of the
            largest weight are set to zero (nothing was inserted there).
        gridding_correction: divide by the trilinear kernel's real-space transfer.

    Returns:
        real (D, D, D) map, axes (z, y, x), origin at D//2.
    """
    padded_size = data_accumulator.shape[0] - 2
    data = symmetrise_friedel_plane(fold_interpolation_layout(data_accumulator))
    weight = symmetrise_friedel_plane(fold_interpolation_layout(weight_accumulator))
    scale = (box_size / padded_size) ** 3
    significant = weight > min_relative_weight * weight.max()
    if isinstance(regularisation, torch.Tensor) and regularisation.ndim > 0:
        shells = regularisation.to(device=weight.device, dtype=weight.dtype)
        radius = _radius_in_box_units(padded_size, box_size, weight.device, weight.dtype)
        index = radius.round().long().clamp(max=shells.shape[0] - 1)
        denominator = weight + scale * shells[index]
    else:
        denominator = weight + scale * float(regularisation)
    spectrum = torch.where(significant, data / torch.where(significant, denominator, 1.0), 0.0)
    padded = centred_irfftn(spectrum, (padded_size,) * 3)
    start = padded_size // 2 - box_size // 2
    end = start + box_size
    volume = padded[start:end, start:end, start:end]
    if gridding_correction:
        volume = volume / gridding_kernel_transform(
            box_size, padded_size, volume.device, volume.dtype
        )
    return volume


def _radius_in_box_units(
    padded_size: int, box_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """|k| · D of every voxel of the (Np, Np, Np//2+1) padded half transform."""
    kz = torch.fft.fftfreq(padded_size, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(padded_size, device=device, dtype=dtype)
    k2 = kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2
    return k2.sqrt() * box_size


def shell_mean_weights(weight_accumulator: torch.Tensor, box_size: int) -> torch.Tensor:
    """Mean summed weight per Fourier shell, in the units of `reconstruct_map`'s λ.

    With a half map's signal-to-noise ratio SSNR(s) per shell, the Wiener
    regularisation is λ(s) = mean weight(s) / SSNR(s): for a voxel of summed weight W,
    noise power σ²/W and signal power τ², SSNR = τ² W / σ², so σ²/τ² = W / SSNR.

    Args:
        weight_accumulator: real (Np+2, Np+2, Np//2+2) from `insert_slices`.
        box_size: D of the map.

    Returns:
        (D // 2 + 1,) mean weight of the voxels in each shell round(|k| · D) (shells
        with no voxel get 0).
    """
    padded_size = weight_accumulator.shape[0] - 2
    weight = symmetrise_friedel_plane(fold_interpolation_layout(weight_accumulator))
    radius = _radius_in_box_units(padded_size, box_size, weight.device, weight.dtype)
    shells = radius.round().long().reshape(-1)
    n_shells = box_size // 2 + 1
    inside = shells < n_shells
    totals = torch.zeros(n_shells, dtype=weight.dtype, device=weight.device)
    totals.index_add_(0, shells[inside], weight.reshape(-1)[inside])
    counts = torch.bincount(shells[inside], minlength=n_shells).to(weight.dtype)
    scale = (box_size / padded_size) ** 3
    return totals / counts.clamp_min(1) / scale
