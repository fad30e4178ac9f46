"""A whole 2DTM search of one micrograph, and the maps decoded from its statistics.

`search` folds the correlation of every (defocus plane, orientation) into
`SearchStatistics`; `decode_maps` turns the best search index of each pixel back
into angles and a relative defocus. Search index = plane · n_orientations +
orientation, fixed for the whole search, so batches can have any size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cryorefine.engine.peaks import valid_region
from cryorefine.engine.projection import PreparedVolume, extract_slices
from cryorefine.engine.search_statistics import SearchStatistics
from cryorefine.engine.template_matching import (
    SearchPlanes,
    correlate_planes,
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
            float rounding of the mean and standard deviation.
        statistics, first_batch: continue a search stopped before batch first_batch.
        on_batch: called as on_batch(next_batch, statistics) after each batch
            (progress, checkpoints).

    Returns:
        SearchStatistics; best_index = plane · n + orientation.
    """
    n_orientations = rotations.shape[0]
    if statistics is None:
        statistics = SearchStatistics.empty(planes.image_shape, device=planes.spectra.device)
    n_batches = -(-n_orientations // batch_size)
    for batch in range(first_batch, n_batches):
        start = batch * batch_size
        chunk = rotations[start : start + batch_size]
        projections = projections_from_slices(extract_slices(prepared, chunk))
        for plane, correlations in correlate_planes(planes, projections):
            statistics.update(correlations, plane * n_orientations + start)
        if on_batch is not None:
            on_batch(batch + 1, statistics)
    return statistics


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
