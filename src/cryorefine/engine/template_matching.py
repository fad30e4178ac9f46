"""Normalised cross-correlation of a micrograph with many filtered template projections.

The 2DTM score of a projection p (D × D, centre at D//2) at micrograph pixel (y, x) is

    c(y, x) = Σ m(y + dy, x + dx) · f(D//2 + dy, D//2 + dx) / ‖f‖,

with m the micrograph after the image-side filter (whitening, band-pass),
normalised to zero mean and unit variance, and f the projection after the
template-side filter G_d = image filter · CTF of defocus plane d, with zero mean
(G_d(0) = 0). For white unit-variance noise c is a standard normal variable.

Unlike filtering on the template's own D × D grid, G_d is applied on the
micrograph's grid, which is the CTF's true action (the CTF spreads a particle's
signal beyond its box) and lets the expensive part be shared:

- planes: S_d = M̂ · G_d · e, one per defocus plane, computed once per micrograph,
  so each projection is transformed only once, whatever the number of planes
  (`conjugate_transforms`). The correlation needs conj(P̂); for a real projection
  that is the transform of the projection flipped in both axes, times a phase
  ramp, and e holds that ramp together with the move from the corner of the
  micrograph grid to its centre (`centring_ramp`).
- per projection and plane: one half-size complex product and one inverse FFT
  (`inverse_correlation`).
- ‖f‖² = Σ_k |P̂(k)|² G_d(k)² / (H W) needs no full-size transform: by Parseval it
  equals Σ_Δ a_p(Δ) κ_d(Δ), a_p the projection's autocorrelation (lags |Δ| < D)
  and κ_d = irfft2(G_d²) (`norm_kernels`), a small matrix product per batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cryorefine.engine.fourier import centred_irfftn, rfft_column_weights


@dataclass(frozen=True)
class SearchPlanes:
    """The micrograph side of a search, one plane per defocus.

    Attributes:
        spectra: complex (P, H, W // 2 + 1) S_d = M̂ · G_d · e.
        norm_kernels: real (P, 2D, 2D) κ_d on the autocorrelation lag layout, for
            images larger than the lag grid; else None and
        norm_weights: real (P, H · (W // 2 + 1)) weights w_k G_d(k)² / (H W) of
            Parseval's sum on the image's own half grid (boxes in refinement).
        image_shape: (H, W).
        template_size: D.
    """

    spectra: torch.Tensor
    norm_kernels: torch.Tensor | None
    norm_weights: torch.Tensor | None
    image_shape: tuple[int, int]
    template_size: int

    @property
    def n_planes(self) -> int:
        return int(self.spectra.shape[0])


def normalised_filtered_image(image: torch.Tensor, image_filter: torch.Tensor) -> torch.Tensor:
    """Image after a Fourier filter, with zero mean and unit variance.

    Args:
        image: real (H, W).
        image_filter: real (H, W // 2 + 1) on torch.fft.rfftn's layout.

    Returns:
        real (H, W) float32.
    """
    filtered = torch.fft.irfftn(
        torch.fft.rfftn(image.float()) * image_filter, s=image.shape[-2:], dim=(-2, -1)
    )
    filtered = filtered - filtered.mean()
    std = filtered.std(correction=0)
    if not bool(std > 0):
        raise ValueError("the filtered image is constant: nothing to correlate with")
    return filtered / std


def centring_ramp(
    image_shape: tuple[int, int], shift: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """e(k) = exp(−2πi (k_y s / H + k_x s / W)): rolls a map by (s, s) pixels.

    Returns:
        complex64 (H, W // 2 + 1) on the rfft layout.
    """
    height, width = image_shape
    ky = torch.fft.fftfreq(height, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(width, device=device, dtype=torch.float64)
    phase = -2.0 * torch.pi * shift * (ky[:, None] + kx[None, :])
    return torch.polar(torch.ones_like(phase), phase).to(torch.complex64)


def hermitian_consistent(half_filter: torch.Tensor) -> torch.Tensor:
    """A real filter on the rfft half grid made even where the half grid meets itself.

    The columns k_x = 0 and k_x = W/2 hold both k_y and −k_y; an astigmatic CTF
    differs between them on the Nyquist column (it is even in k, not in k_y), and an
    inverse rfft would silently symmetrise it. Averaging the two makes the filter
    one that the correlation and the norm (`norm_kernels`) both see the same way.

    Args:
        half_filter: real (..., H, W // 2 + 1).

    Returns:
        a new real (..., H, W // 2 + 1) tensor.
    """
    result = half_filter.clone()
    for column in (0, -1):
        values = half_filter[..., column]
        partner = values.flip(-1).roll(1, dims=-1)  # index (H − i) mod H holds −k_y
        result[..., column] = 0.5 * (values + partner)
    return result


def norm_kernels(template_filters: torch.Tensor, template_size: int) -> torch.Tensor:
    """κ_d = irfft2(G_d²) at the lags of a D × D projection's autocorrelation.

    Args:
        template_filters: real (P, H, W // 2 + 1) G_d on the rfft layout (even in k).
        template_size: D.

    Returns:
        real (P, 2D, 2D) float32; index j along an axis holds lag j for j < D and
        lag j − 2D for j ≥ D (the layout of `autocorrelations`).
    """
    height = template_filters.shape[-2]
    width = 2 * (template_filters.shape[-1] - 1)
    if torch.fft.rfftfreq(width).numel() != template_filters.shape[-1]:
        raise ValueError("template_filters must be an rfft half grid")
    # float32: the norms agree with float64 kernels to 1e-7 (4096², 3 planes) at a
    # quarter of the time, which is seconds per plane for a 4096² micrograph.
    kernel = torch.fft.irfftn(template_filters.float().square(), s=(height, width), dim=(-2, -1))
    # An odd W cannot be told from W − 1 by its half grid; 2DTM micrographs are even.
    lags = torch.arange(2 * template_size, device=template_filters.device)
    lags = torch.where(lags < template_size, lags, lags - 2 * template_size)
    rows = lags.remainder(height)
    columns = lags.remainder(width)
    kernel = kernel[:, rows][:, :, columns]
    kernel[:, template_size, :] = 0.0  # lag ±D does not occur for a D-wide projection
    kernel[:, :, template_size] = 0.0
    return kernel


def parseval_weights(template_filters: torch.Tensor) -> torch.Tensor:
    """w_k G_d(k)² / (H W) on the half grid: ‖irfft2(G_d · P̂)‖² = Σ_k weights · |P̂(k)|².

    w_k = 2 for the columns standing for k and −k, 1 for k_x = 0 and k_x = W / 2.

    Args:
        template_filters: real (P, H, W // 2 + 1), Hermitian-consistent.

    Returns:
        real (P, H · (W // 2 + 1)) float32.
    """
    height, half = template_filters.shape[-2:]
    width = 2 * (half - 1)
    multiplicity = rfft_column_weights(width, device=template_filters.device)
    weights = multiplicity * template_filters.double().square() / (height * width)
    return weights.flatten(-2).float()


def prepare_planes(
    image: torch.Tensor,
    image_filter: torch.Tensor,
    plane_filters: torch.Tensor,
    template_size: int,
    normalise: bool = True,
) -> SearchPlanes:
    """The micrograph side of a search.

    Args:
        image: real (H, W) micrograph, H and W even.
        image_filter: real (H, W // 2 + 1) filter applied to the micrograph (whitening,
            band-pass), rfft layout.
        plane_filters: real (P, H, W // 2 + 1) template-side filters G_d (image filter ·
            CTF of plane d, with the template's contrast sign), rfft layout.
        template_size: D, the projections' box.
        normalise: filter and normalise the image (a whole micrograph); False for a
            box already cut from a normalised, filtered micrograph, so that its
            scores stay on the micrograph's scale (refinement).

    Returns:
        SearchPlanes on the image's device.
    """
    height, width = image.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"image sides must be even, got {(height, width)}")
    if template_size > min(height, width):
        raise ValueError(
            f"template of {template_size} px is larger than the image {(height, width)}"
        )
    plane_filters = hermitian_consistent(plane_filters.float())
    plane_filters[..., 0, 0] = 0.0  # zero-mean templates
    if normalise:
        image = normalised_filtered_image(image, image_filter)
    image_ft = torch.fft.rfftn(image.float())
    # conj(P̂) = ω^(−k(D−1)) · FFT(flipped p) with ω = exp(−2πi/N); with the move of
    # the projection's centre D//2 from the corner that is one roll by D//2 − D + 1.
    shift = template_size // 2 - template_size + 1
    ramp = centring_ramp((height, width), shift, device=image.device)
    spectra = image_ft * ramp * plane_filters
    # Parseval on whichever grid is smaller: the image's half grid (a box) or the
    # (2D)² lags of the projection's autocorrelation (a whole micrograph).
    direct = height * (width // 2 + 1) <= (2 * template_size) ** 2
    return SearchPlanes(
        spectra=spectra,
        norm_kernels=None if direct else norm_kernels(plane_filters, template_size),
        norm_weights=parseval_weights(plane_filters) if direct else None,
        image_shape=(height, width),
        template_size=template_size,
    )


def extract_boxes(image: torch.Tensor, centres_yx: torch.Tensor, box_size: int) -> torch.Tensor:
    """Square boxes of an image centred on given pixels, zero beyond the image's edge.

    Args:
        image: real (H, W).
        centres_yx: int (n, 2) pixel (y, x) of each box's centre (index box_size // 2).
        box_size: B.

    Returns:
        real (n, B, B).
    """
    margin = box_size
    padded = torch.nn.functional.pad(image[None, None], (margin,) * 4)[0, 0]
    corners = centres_yx.long().cpu() - box_size // 2 + margin
    boxes = [padded[y : y + box_size, x : x + box_size] for y, x in corners.tolist()]
    if not boxes:
        return image.new_zeros((0, box_size, box_size))
    return torch.stack(boxes)


def projections_from_slices(slices: torch.Tensor) -> torch.Tensor:
    """Real projections (B, D, D), centre at D//2, from centred half transforms (B, D, D//2 + 1)."""
    size = slices.shape[-2]
    return centred_irfftn(slices, (size, size)).float()


#: Largest temporary an FFT call here makes (bytes). torch's CPU FFTs copy their
#: input or output, and glibc serves blocks above 32 MiB with fresh pages: at 4096²
#: whole-map calls spent a third of their time in page faults.
FFT_BLOCK_BYTES = 8 * 2**20


def _block(count: int, bytes_per_item: int, device: torch.device) -> int:
    """Items per FFT call so that one call's temporary stays within FFT_BLOCK_BYTES.

    CPU only: on a GPU fresh memory costs nothing and every call is a launch.
    """
    if device.type != "cpu":
        return max(count, 1)
    return max(1, min(count, FFT_BLOCK_BYTES // max(bytes_per_item, 1)))


def conjugate_transforms(
    projections: torch.Tensor,
    image_shape: tuple[int, int],
    out: torch.Tensor | None = None,
    padded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Half transforms of projections flipped in both axes, laid at the corner of the image grid.

    For real projections this is conj(P̂) (P̂: the projection's transform at the
    corner) times a phase ramp that `prepare_planes` folds into the planes, so the
    correlation needs no conjugate pass. |conjugate_transforms|² = |P̂|².

    Args:
        projections: real (B, D, D).
        image_shape: (H, W).
        out: complex (B, H, W // 2 + 1) to write into, or None.
        padded: real (B, H, W) scratch, zero outside its corner D × D, kept between
            calls: on a CPU, padding into fresh memory costs more than the FFT.

    Returns:
        complex (B, H, W // 2 + 1).
    """
    # One 2D transform of the padded image: transforming only the D non-zero rows
    # and then the columns is slower on a CPU (strided column FFTs), 1.0 ms more at
    # 1024², 40 at 4096².
    flipped = projections.flip(-2, -1)
    if padded is None:
        return torch.fft.rfftn(flipped, s=image_shape, dim=(-2, -1), out=out)
    size = projections.shape[-1]
    padded[..., :size, :size] = flipped
    return torch.fft.rfftn(padded, dim=(-2, -1), out=out)


def inverse_correlation(
    product: torch.Tensor,
    width: int,
    rows: slice = slice(None),
    columns: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Real maps from half-grid products, only the rows asked for.

    Columns first, then the half-length rows (irfftn's 2D c2r copies its input once
    more on a CPU, and the row pass can skip rows nobody reads), each in blocks of
    at most FFT_BLOCK_BYTES.

    Args:
        product: complex (..., H, W // 2 + 1).
        width: W.
        rows: output rows wanted.
        columns: complex (..., H, W // 2 + 1) scratch for the column pass, or None.
        out: real (..., R, W) for the R rows, or None.

    Returns:
        real (..., R, W).
    """
    height, half = product.shape[-2:]
    maps = product[..., 0, 0].numel()
    if columns is None:
        columns = torch.empty_like(product)
    step = _block(half, maps * height * 8, product.device)
    for start in range(0, half, step):
        block = slice(start, start + step)
        torch.fft.ifft(product[..., block], dim=-2, out=columns[..., block])
    selected = columns[..., rows, :]
    n_rows = selected.shape[-2]
    if out is None:
        out = product.real.new_empty((*product.shape[:-2], n_rows, width))
    step = _block(n_rows, maps * half * 8, product.device)
    for start in range(0, n_rows, step):
        block = slice(start, start + step)
        torch.fft.irfft(selected[..., block, :], n=width, dim=-1, out=out[..., block, :])
    return out


def inverse_norms(norms: torch.Tensor) -> torch.Tensor:
    """1 / norms, 0 where a filtered projection is blank (its correlations are all 0)."""
    tiny = torch.finfo(norms.dtype).tiny
    return torch.where(norms > 0, 1.0 / norms.clamp(min=tiny), 0.0)


def autocorrelations(projections: torch.Tensor) -> torch.Tensor:
    """Linear autocorrelations a_p(Δ) = Σ_y p(y) p(y + Δ), |Δ| < D.

    Returns:
        real (B, 2D, 2D), lag layout of `norm_kernels`.
    """
    size = projections.shape[-1]
    spectrum = torch.fft.rfftn(projections.float(), s=(2 * size, 2 * size), dim=(-2, -1))
    power = spectrum.real.square() + spectrum.imag.square()
    return torch.fft.irfftn(power, s=(2 * size, 2 * size), dim=(-2, -1))


def projection_norms(
    planes: SearchPlanes, projections: torch.Tensor, transforms: torch.Tensor | None = None
) -> torch.Tensor:
    """‖f_{b,d}‖: norm of projection b after the template filter of plane d.

    Args:
        planes: from `prepare_planes`.
        projections: real (B, D, D).
        transforms: their `conjugate_transforms`, if already computed.

    Returns:
        real (B, P) float32 (> 0 unless the filtered projection is blank).
    """
    if planes.norm_weights is not None:
        if transforms is None:
            transforms = conjugate_transforms(projections, planes.image_shape)
        power = (transforms.real.square() + transforms.imag.square()).flatten(-2)
        squared = power @ planes.norm_weights.T
    else:
        assert planes.norm_kernels is not None
        lags = autocorrelations(projections).flatten(-2)
        squared = lags @ planes.norm_kernels.flatten(-2).T
    return squared.clamp(min=0.0).sqrt()


def correlate_planes(
    planes: SearchPlanes, projections: torch.Tensor
) -> Iterator[tuple[int, torch.Tensor]]:
    """Normalised correlation maps of a batch of projections, plane by plane.

    Args:
        planes: from `prepare_planes`.
        projections: real (B, D, D), centre at D//2 (unfiltered; the planes hold the
            filters).

    Yields:
        (plane index d, real (B, H, W) float32 c as in the module docstring, with
        c[b, y, x] the score of projection b centred on pixel (y, x)).
    """
    projections = projections.float()
    transforms = conjugate_transforms(projections, planes.image_shape)
    scales = inverse_norms(projection_norms(planes, projections, transforms))
    for plane in range(planes.n_planes):
        product = transforms * planes.spectra[plane]
        correlations = inverse_correlation(product, planes.image_shape[-1])
        correlations *= scales[:, plane, None, None]
        yield plane, correlations


def position_kernels(
    image_shape: tuple[int, int],
    rows: slice,
    columns: slice,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse real DFT restricted to a block of output pixels, as two matrices.

    irfft2(Z)[y, x] = Re Σ_kx (Σ_ky e^(2πi ky y / H) Z[ky, kx]) · w_kx e^(2πi kx x / W) / (H W),
    w_kx = 1 at kx = 0 and W/2, else 2 (Z Hermitian where the half grid meets itself).

    Returns:
        row_kernel: complex64 (R, H) e^(2πi ky y / H) for the R rows.
        column_kernel: complex64 (W // 2 + 1, C) w_kx e^(2πi kx x / W) / (H W) for the
            C columns.
    """
    height, width = image_shape
    half = width // 2 + 1
    ys = torch.arange(height, device=device, dtype=torch.float64)[rows]
    xs = torch.arange(width, device=device, dtype=torch.float64)[columns]
    ky = torch.arange(height, device=device, dtype=torch.float64)
    kx = torch.arange(half, device=device, dtype=torch.float64)
    row_phase = 2.0 * torch.pi * ys[:, None] * ky[None, :] / height
    column_phase = 2.0 * torch.pi * kx[:, None] * xs[None, :] / width
    weight = rfft_column_weights(width, device=device) / (height * width)
    row_kernel = torch.polar(torch.ones_like(row_phase), row_phase)
    column_kernel = torch.polar(weight[:, None].expand_as(column_phase), column_phase)
    return row_kernel.to(torch.complex64), column_kernel.to(torch.complex64)


def correlate_positions(
    planes: SearchPlanes, projections: torch.Tensor, rows: slice, columns: slice
) -> Iterator[tuple[int, torch.Tensor]]:
    """`correlate_planes` at a block of pixels only, by two small matrix products.

    For the few hundred positions of a refinement box this is ~10× cheaper than the
    inverse FFT of the whole box (144² box, 17² positions: 15 against 150 µs per map).

    Yields:
        (plane index d, real (B, R, C) float32 scores at pixels (rows, columns)).
    """
    projections = projections.float()
    transforms = conjugate_transforms(projections, planes.image_shape)
    scales = inverse_norms(projection_norms(planes, projections, transforms))
    row_kernel, column_kernel = position_kernels(
        planes.image_shape, rows, columns, device=projections.device
    )
    for plane in range(planes.n_planes):
        partial = torch.matmul(row_kernel, transforms * planes.spectra[plane])
        scores = torch.matmul(partial, column_kernel).real
        scores *= scales[:, plane, None, None]
        yield plane, scores
