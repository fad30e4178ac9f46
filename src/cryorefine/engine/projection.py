"""Projection by the Fourier-slice theorem: central slices of a padded 3D transform.

The projection of a volume V (z, y, x) in the view of rotation A (engine.so3) is
P(x, y) = Σ_z V(Aᵀ · (x, y, z)); its centred half transform is the central slice
P̂(kx, ky) = V̂(Aᵀ · (kx, ky, 0)). We sample that slice by trilinear interpolation in
the transform of the volume zero-padded to an even box of edge Np ≈ pad_factor · D,
at the frequencies of the D × D image (so the image itself needs no padding or crop).

Interpolation layout. The padded half transform (Np, Np, Np//2 + 1) is stored
shifted along z and y (index = k + Np//2, k in padded-grid units) with a border:
shape (Np + 2, Np + 2, Np//2 + 2), k = +Np/2 repeating −Np/2 and zeros beyond, so the
eight neighbours of every point with |k| ≤ Nyquist are in range. Points with kx < 0
are read at −k and conjugated (Friedel symmetry of a real volume). Slice samples
beyond Nyquist (|k| > 0.5 cycles/pixel) are set to zero, as RELION does.

Gridding correction. Trilinear interpolation of a transform is a convolution with the
tent kernel Λ³, which multiplies the padded real-space volume by
S(r) = Π_i sinc²(r_i / Np) (r in pixels from the origin, normalised sinc). Dividing
the volume by S before the transform undoes that for points between grid nodes. On
the nodes themselves (e.g. the identity view at pad 2, where every sample lands on a
node) nothing is interpolated, so there the correction overshoots: the projection is
then exactly Σ_z V/S. The error grows with the distance r of the density from the box
centre, ≈ (π r / Np)² / 3 per in-plane axis (0.5 % at r = D/8 and 2 % at r = D/4 with
pad 2); a larger pad_factor reduces it quadratically.

Origins (RELION). `relion_project` translates the projection of a particle with
rlnOriginXAngst/rlnOriginYAngst = (ox, oy) by −(ox, oy) / pixel size: the particle's
centre lies at box//2 − origin in its image (and at rlnCoordinateX − rlnOriginX in
the micrograph), so translating the image by +origin re-centres it. Pinned against
relion_project by tests/test_relion_conventions.py; `shift_for_origin` gives the
matching `engine.fourier.phase_shift` argument.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn.functional import grid_sample

from cryorefine.engine.fourier import centred_irfftn, centred_rfftn, frequency_grid

# Interpolation points per chunk of a batch: bounds its temporary memory to about
# 150 bytes per point (≈ 80 MB at this default).
DEFAULT_POINTS_PER_CHUNK = 2**19

# The eight corners of a trilinear stencil as (dz, dy, dx) offsets.
_CORNERS = [(dz, dy, dx) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]


@dataclass(frozen=True)
class PreparedVolume:
    """A volume's padded, gridding-corrected transform in the interpolation layout.

    Attributes:
        channels: real (1, 2, Np + 2, Np + 2, Np//2 + 2), the real and imaginary parts
            of the transform (see the module docstring) as the two channels that
            grid_sample reads; only this copy is kept (a 256³ template's is 1 GiB).
        box_size: D, the edge of the original volume and of its projections (pixels).
        padded_size: Np, the even edge of the padded box (pixels).
    """

    channels: torch.Tensor
    box_size: int
    padded_size: int

    @classmethod
    def from_spectrum(
        cls, spectrum: torch.Tensor, box_size: int, padded_size: int
    ) -> PreparedVolume:
        """From a complex (Np + 2, Np + 2, Np//2 + 2) transform in the interpolation layout."""
        channels = torch.view_as_real(spectrum).permute(3, 0, 1, 2)[None].contiguous()
        return cls(channels=channels, box_size=box_size, padded_size=padded_size)


def padded_box_size(box_size: int, pad_factor: float) -> int:
    """Edge Np of the padded box: the even integer nearest pad_factor · D (and ≥ D)."""
    if pad_factor < 1.0:
        raise ValueError(f"pad_factor must be >= 1, got {pad_factor}")
    size = max(round(pad_factor * box_size), box_size)
    return size + (size % 2)


def gridding_kernel_transform(
    box_size: int,
    padded_size: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Real-space transfer S(r) = Π_i sinc²(r_i / Np) of trilinear interpolation.

    Args:
        box_size: D; S is evaluated on the D³ box, r in pixels from its origin D//2.
        padded_size: Np, the edge of the box whose transform is interpolated.

    Returns:
        (D, D, D) real: 1 at the origin, ≥ sinc²(D / (2 Np))³ in the corners.
    """
    r = torch.arange(box_size, device=device, dtype=dtype) - box_size // 2
    s = torch.sinc(r / padded_size) ** 2
    return s[:, None, None] * s[None, :, None] * s[None, None, :]


def to_interpolation_layout(half_spectrum: torch.Tensor) -> torch.Tensor:
    """FFT-order half transform (Np, Np, Np//2+1) -> shifted, bordered (Np+2, Np+2, Np//2+2).

    Index i along z and y holds k = i − Np//2; index Np repeats index 0 (k = +Np/2 is
    the periodic copy of −Np/2, so points near either Nyquist plane interpolate the same
    data); the last index of every axis is zero.
    """
    nz, ny, nx = half_spectrum.shape
    grid = half_spectrum.new_zeros((nz + 2, ny + 2, nx + 1))
    grid[:nz, :ny, :nx] = torch.fft.fftshift(half_spectrum, dim=(0, 1))
    grid[nz, :ny] = grid[0, :ny]
    grid[:, ny] = grid[:, 0]
    return grid


def prepare_for_projection(
    volume: torch.Tensor, pad_factor: float = 2.0, gridding_correction: bool = True
) -> PreparedVolume:
    """Pad, gridding-correct and transform a volume once, to extract many slices from.

    Args:
        volume: real (D, D, D), axes (z, y, x), origin at D//2.
        pad_factor: padded edge / D (≥ 1); 2 is RELION's default.
        gridding_correction: divide by the trilinear kernel's transform S first.

    Returns:
        PreparedVolume on the volume's device (complex64 spectrum for float32 input).
    """
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"volume must be a cube (D, D, D), got shape {tuple(volume.shape)}")
    box_size = volume.shape[-1]
    padded_size = padded_box_size(box_size, pad_factor)
    if gridding_correction:
        volume = volume / gridding_kernel_transform(
            box_size, padded_size, volume.device, volume.dtype
        )
    start = padded_size // 2 - box_size // 2
    end = start + box_size
    padded = volume.new_zeros((padded_size,) * 3)
    padded[start:end, start:end, start:end] = volume
    spectrum = to_interpolation_layout(centred_rfftn(padded, ndim=3))
    return PreparedVolume.from_spectrum(spectrum, box_size, padded_size)


def central_slice_points(
    rotations: torch.Tensor, box_size: int, padded_size: int, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the samples of D × D half-transform slices lie in the interpolation layout.

    Args:
        rotations: (B, 3, 3) matrices A; the slice of view A holds V̂(Aᵀ · (kx, ky, 0)).
        box_size: D of the images.
        padded_size: Np of the volume's padded box.
        scale: image frequency → volume frequency factor: a projection whose pixels
            are 1/scale of the volume's voxels (pixel-size refinement) reads the
            volume at scale · k.

    Returns:
        As `frequency_points`, for S = D · (D//2 + 1) samples in the (ky, kx) order of
        the image's half transform.
    """
    k = frequency_grid((box_size, box_size), rfft=True, device=rotations.device)
    return frequency_points(rotations, scale * k.to(rotations.dtype).reshape(-1, 2), padded_size)


def frequency_points(
    rotations: torch.Tensor, frequencies: torch.Tensor, padded_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the central-slice samples at `frequencies` lie in the interpolation layout.

    Args:
        rotations: (B, 3, 3) matrices A; the sample at k holds V̂(Aᵀ · (kx, ky, 0)).
        frequencies: (S, 2) (kx, ky) in cycles per voxel of the volume.
        padded_size: Np of the volume's padded box.

    Returns:
        points: (B, S, 3) coordinates (x, y, z) in index units of the interpolation
            layout, x ≥ 0. Samples beyond Nyquist are put at the DC node.
        conjugate: (B, S) bool, True where the sample was read at −k (so the value
            at k is the conjugate of the one interpolated at `points`).
        inside: (S,) bool, False for samples beyond the volume's Nyquist (|k| > 0.5).
    """
    k = frequencies.to(rotations.dtype)
    inside = torch.linalg.vector_norm(k, dim=-1) <= 0.5
    k = k * inside[:, None]
    # Aᵀ · (kx, ky, 0) = kx · A[0, :] + ky · A[1, :], in padded-grid units.
    q = padded_size * (k @ rotations[..., :2, :])
    conjugate = q[..., 0] < 0
    q = q * (1 - 2 * conjugate[..., None].to(q.dtype))
    centre = float(padded_size // 2)
    points = q + q.new_tensor([0.0, centre, centre])
    return points, conjugate, inside


def trilinear_stencil(
    points: torch.Tensor, grid_shape: tuple[int, int, int]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The eight (flat index, weight) terms of trilinear interpolation at `points`.

    Args:
        points: (..., 3) coordinates (x, y, z) in index units of a (nz, ny, nx) grid,
            inside [0, nx-1] × [0, ny-1] × [0, nz-1].
        grid_shape: (nz, ny, nx).

    Yields:
        (index, weight): (...) long indices into the flattened grid and (...) weights;
        the eight weights sum to 1 at every point.
    """
    nz, ny, nx = grid_shape
    fx, fy, fz = points.unbind(-1)
    # Clamping only moves points that are already out of range (weights become a
    # linear extrapolation); callers give those zero weight.
    x0 = fx.floor().clamp(0, nx - 2)
    y0 = fy.floor().clamp(0, ny - 2)
    z0 = fz.floor().clamp(0, nz - 2)
    tx, ty, tz = fx - x0, fy - y0, fz - z0
    base = (z0.long() * ny + y0.long()) * nx + x0.long()
    for dz, dy, dx in _CORNERS:
        weight = (tz if dz else 1 - tz) * (ty if dy else 1 - ty) * (tx if dx else 1 - tx)
        yield base + ((dz * ny + dy) * nx + dx), weight


def rotations_per_chunk(samples_per_rotation: int, points_per_chunk: int | None = None) -> int:
    """How many rotations to process at once so a chunk holds ≤ points_per_chunk samples."""
    budget = DEFAULT_POINTS_PER_CHUNK if points_per_chunk is None else points_per_chunk
    return max(1, budget // samples_per_rotation)


def extract_slices(
    prepared: PreparedVolume,
    rotations: torch.Tensor,
    points_per_chunk: int | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Central slices of a prepared volume: centred half transforms of its projections.

    Args:
        prepared: from `prepare_for_projection`.
        rotations: (..., 3, 3) matrices A (engine.so3.euler_to_matrix).
        points_per_chunk: interpolation points per chunk (memory bound); None for
            DEFAULT_POINTS_PER_CHUNK. The result does not depend on it.
        scale: volume voxel size / image pixel size (see `central_slice_points`).

    Returns:
        complex (..., D, D//2 + 1): engine.fourier.centred_rfftn of the projections.
    """
    box_size = prepared.box_size
    k = frequency_grid((box_size, box_size), rfft=True, device=prepared.channels.device)
    frequencies = scale * k.reshape(-1, 2)
    samples = extract_samples(prepared, rotations, frequencies, points_per_chunk)
    return samples.reshape(*rotations.shape[:-2], box_size, box_size // 2 + 1)


def extract_samples(
    prepared: PreparedVolume,
    rotations: torch.Tensor,
    frequencies: torch.Tensor,
    points_per_chunk: int | None = None,
) -> torch.Tensor:
    """Central-slice samples V̂(Aᵀ · (kx, ky, 0)) at chosen frequencies.

    The transform of the projection in view A at frequency k: the same values
    `extract_slices` gives at those k, without computing the others.

    Args:
        prepared: from `prepare_for_projection`.
        rotations: (..., 3, 3) matrices A.
        frequencies: (S, 2) (kx, ky) in cycles per voxel of the volume; samples beyond
            Nyquist (|k| > 0.5) are 0.
        points_per_chunk: memory bound, as in `extract_slices`.

    Returns:
        complex (..., S).
    """
    channels = prepared.channels
    real_dtype = channels.dtype
    batch_shape = rotations.shape[:-2]
    flat_rotations = rotations.reshape(-1, 3, 3).to(device=channels.device, dtype=real_dtype)
    frequencies = frequencies.to(device=channels.device, dtype=real_dtype)
    samples = frequencies.shape[0]
    # grid_sample's trilinear kernel (align_corners: node i at 2i/(n-1) - 1) reads the
    # real and imaginary parts as two channels, several times faster than eight gathers.
    nz, ny, nx = channels.shape[-3:]
    to_unit = frequencies.new_tensor([2 / (nx - 1), 2 / (ny - 1), 2 / (nz - 1)])
    complex_dtype = torch.complex128 if real_dtype == torch.float64 else torch.complex64
    out = torch.zeros(
        (flat_rotations.shape[0], samples), dtype=complex_dtype, device=channels.device
    )
    # Samples beyond Nyquist are 0 whatever the view: interpolate only the others
    # (π/4 of a square slice's half plane).
    kept = torch.linalg.vector_norm(frequencies, dim=-1) <= 0.5
    kept_frequencies = frequencies[kept]
    step = rotations_per_chunk(kept_frequencies.shape[0], points_per_chunk)
    for start in range(0, flat_rotations.shape[0], step):
        chunk = flat_rotations[start : start + step]
        points, conjugate, _ = frequency_points(chunk, kept_frequencies, prepared.padded_size)
        grid = (points * to_unit - 1)[None, :, :, None, :]
        parts = grid_sample(channels, grid, mode="bilinear", align_corners=True)[0, ..., 0]
        imaginary = torch.where(conjugate, -parts[1], parts[1])
        out[start : start + step, kept] = torch.complex(parts[0], imaginary)
    return out.reshape(*batch_shape, samples)


def project_fourier(
    volume: torch.Tensor, rotations: torch.Tensor, pad_factor: float = 2.0
) -> torch.Tensor:
    """Centred half transforms of projections P(x, y) = Σ_z V(Aᵀ · (x, y, z)).

    Args:
        volume: real (D, D, D), axes (z, y, x), origin at D//2.
        rotations: (..., 3, 3) matrices A.
        pad_factor: padded edge / D used for interpolation.

    Returns:
        complex (..., D, D//2 + 1), as engine.fourier.centred_rfftn of the projections.
    """
    return extract_slices(prepare_for_projection(volume, pad_factor), rotations)


def project(volume: torch.Tensor, rotations: torch.Tensor, pad_factor: float = 2.0) -> torch.Tensor:
    """Projections P(x, y) = Σ_z V(Aᵀ · (x, y, z)): real (..., D, D), origin at D//2.

    Args:
        volume: real (D, D, D), axes (z, y, x).
        rotations: (..., 3, 3) matrices A.
        pad_factor: padded edge / D used for interpolation.
    """
    box_size = volume.shape[-1]
    return centred_irfftn(project_fourier(volume, rotations, pad_factor), (box_size, box_size))


def shift_for_origin(origin_xy_angstrom: torch.Tensor, pixel_size_angstrom: float) -> torch.Tensor:
    """The translation RELION applies to a particle's projection for its origin offsets.

    Args:
        origin_xy_angstrom: (..., 2) rlnOriginXAngst, rlnOriginYAngst.
        pixel_size_angstrom: image pixel size.

    Returns:
        (..., 2) shift in pixels, ordered (x, y): −origin / pixel size, so that
        engine.fourier.phase_shift(project_fourier(volume, A), shift, (D, D)) is the
        transform of the image relion_project writes for that particle.
    """
    return -origin_xy_angstrom / pixel_size_angstrom
