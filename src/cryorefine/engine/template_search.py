"""A whole 2DTM search of one micrograph, and the maps decoded from its statistics.

`search` folds the correlation of every (defocus plane, orientation) into
`SearchStatistics`; `decode_maps` turns the best search index of each pixel back
into angles and a relative defocus. Search index = plane · n_orientations +
orientation, fixed for the whole search, so batches can have any size.

Per projection and plane the search does one complex product and one inverse FFT
into preallocated buffers (fresh 4 MiB tensors cost page faults on a CPU), keeps
only the rows where the template lies inside the micrograph, and folds the maps
into the statistics in groups of FOLD_GROUP (one fused pass per group where the
search is large enough to compile it, `search_statistics.compile_pays_off`). The mean needs no pass
per map: the sum of the correlations is the correlation with the sum of the
weighted templates, added once at the end (one inverse FFT per plane).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cryorefine.engine.peaks import valid_region
from cryorefine.engine.projection import PreparedVolume, extract_slices
from cryorefine.engine.search_statistics import (
    FOLD_GROUP,
    SearchStatistics,
    compile_pays_off,
)
from cryorefine.engine.template_matching import (
    SearchPlanes,
    conjugate_transforms,
    inverse_correlation,
    inverse_norms,
    projection_norms,
    projections_from_slices,
)


def search(
    prepared: PreparedVolume,
    planes: SearchPlanes,
    rotations: torch.Tensor,
    batch_size: int,
    *,
    statistics: SearchStatistics | None = None,
    first_batch: int = 0,
    on_batch: Callable[[int, SearchStatistics], None] | None = None,
) -> SearchStatistics:
    """Fold every (plane, orientation) correlation into per-pixel statistics.

    Args:
        prepared: the template, prepared for projection.
        planes: the micrograph side (`prepare_planes`).
        rotations: (n, 3, 3) orientations searched.
        batch_size: orientations per batch; results do not depend on it beyond
            float rounding of the mean and standard deviation. A tie between two
            search positions keeps the lower orientation, then the lower plane.
        statistics, first_batch: continue a search stopped before batch first_batch.
        on_batch: called as on_batch(next_batch, statistics) after each batch
            (progress, checkpoints).

    Returns:
        SearchStatistics; best_index = plane · n + orientation. Pixels outside the
        valid region (`peaks.valid_region`) keep mip −inf and best_index −1.
    """
    n_orientations = rotations.shape[0]
    device = planes.spectra.device
    height, width = planes.image_shape
    size = planes.template_size
    if statistics is None:
        statistics = SearchStatistics.empty(planes.image_shape, device=device)
    if statistics.template_sums is None:
        statistics.template_sums = torch.zeros(
            planes.n_planes, size, size, dtype=torch.float64, device=device
        )
    rows = valid_region(planes.image_shape, size)[0]
    half = (height, width // 2 + 1)
    # One projection at a time: batched full-size FFTs thrash the cache on a CPU.
    padded = torch.zeros(1, height, width, device=device)
    transform = torch.empty(1, *half, dtype=torch.complex64, device=device)
    product = torch.empty(half, dtype=torch.complex64, device=device)
    columns = torch.empty_like(product)
    maps = torch.empty(FOLD_GROUP, rows.stop - rows.start, width, device=device)
    map_scales = torch.empty(FOLD_GROUP, device=device)
    map_indices = torch.empty(FOLD_GROUP, dtype=torch.int32, device=device)
    n_maps = (n_orientations - first_batch * batch_size) * planes.n_planes
    compiled = compile_pays_off(n_maps, maps[0].numel())

    n_batches = -(-n_orientations // batch_size)
    for batch in range(first_batch, n_batches):
        start = batch * batch_size
        chunk = rotations[start : start + batch_size]
        projections = projections_from_slices(extract_slices(prepared, chunk))
        batch_scales = inverse_norms(projection_norms(planes, projections))
        statistics.template_sums += torch.einsum(
            "bp,byx->pyx", batch_scales.double(), projections.double()
        )
        filled = 0
        for offset, scales in enumerate(batch_scales):
            projection = projections[offset : offset + 1]
            conjugate_transforms(projection, planes.image_shape, out=transform, padded=padded)
            for plane in range(planes.n_planes):
                torch.mul(transform[0], planes.spectra[plane], out=product)
                inverse_correlation(product, width, rows, columns=columns, out=maps[filled])
                map_scales[filled] = scales[plane]
                map_indices[filled] = plane * n_orientations + start + offset
                filled += 1
                if filled == FOLD_GROUP:
                    statistics.fold(maps, map_scales, map_indices, rows, compiled)
                    filled = 0
        if filled:
            statistics.fold(
                maps[:filled], map_scales[:filled], map_indices[:filled], rows, compiled
            )
        if on_batch is not None:
            on_batch(batch + 1, statistics)
    add_template_sums(statistics, planes)
    return statistics


def add_template_sums(statistics: SearchStatistics, planes: SearchPlanes) -> None:
    """Add the correlations of the weighted template sums to the statistics' total.

    Σ_b c_{b,d} / ‖f_{b,d}‖ = correlation with Σ_b p_b / ‖f_{b,d}‖: one inverse FFT
    per plane instead of a pass per map. The sums are kept in float64; the FFT's
    float32 error is relative to the total itself and does not grow with the
    number of maps.
    """
    sums = statistics.template_sums
    if sums is None:
        return
    width = planes.image_shape[-1]
    for plane in range(planes.n_planes):
        transform = conjugate_transforms(sums[plane : plane + 1].float(), planes.image_shape)
        statistics.add_to_total(inverse_correlation(transform[0] * planes.spectra[plane], width))
    statistics.template_sums = None


@dataclass(frozen=True)
class SearchMaps:
    """Per-pixel results of a search, (H, W) each, 0 outside the valid region.

    mip, z_score, mean, std: correlation statistics; rot, tilt, psi: best
    orientation (degrees); relative_defocus: best plane (Å); valid: bool, where
    the template lies wholly inside the image.
    """

    mip: torch.Tensor
    z_score: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    rot: torch.Tensor
    tilt: torch.Tensor
    psi: torch.Tensor
    relative_defocus: torch.Tensor
    valid: torch.Tensor


def decode_maps(
    statistics: SearchStatistics,
    orientations_degrees: torch.Tensor,
    relative_defoci: torch.Tensor,
    template_size: int,
) -> SearchMaps:
    """Per-pixel maps from statistics: best index → (plane, orientation) → angles, defocus."""
    shape = (statistics.mip.shape[-2], statistics.mip.shape[-1])
    valid = torch.zeros(shape, dtype=torch.bool, device=statistics.mip.device)
    rows, columns = valid_region(shape, template_size)
    valid[rows, columns] = True
    n_orientations = orientations_degrees.shape[0]
    index = statistics.best_index.clamp(min=0)
    plane, orientation = index // n_orientations, index % n_orientations
    angles = orientations_degrees.to(statistics.mip.device, torch.float32)[orientation]
    defocus = relative_defoci.to(statistics.mip.device, torch.float32)[plane]

    mean, std = statistics.mean(), statistics.std()
    z_score = statistics.z_score(mean, std)

    def masked(values: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, values.float(), 0.0)

    return SearchMaps(
        mip=masked(statistics.mip),
        z_score=masked(z_score),
        mean=masked(mean),
        std=masked(std),
        rot=masked(angles[..., 0]),
        tilt=masked(angles[..., 1]),
        psi=masked(angles[..., 2]),
        relative_defocus=masked(defocus),
        valid=valid,
    )
