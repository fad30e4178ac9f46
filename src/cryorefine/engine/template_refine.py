"""Local 2DTM refinement of one particle: orientations × defocus × pixel size × position.

A box of the filtered, normalised micrograph around the particle is correlated
with projections at the particle's orientation composed with local offsets, over
defocus planes and candidate pixel sizes, using the same normalised score as the
whole-micrograph search (engine.template_matching) so refined scores share the
search's scale. Positions are searched where the template lies wholly inside the
box: (B − D + 1)² shifts around the box centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cryorefine.engine.peaks import valid_region
from cryorefine.engine.projection import PreparedVolume, extract_slices
from cryorefine.engine.template_matching import (
    correlate_positions,
    prepare_planes,
    projections_from_slices,
)


@dataclass(frozen=True)
class LocalBest:
    """The best candidate of a local search.

    score: normalised correlation; rotation: (3, 3) view matrix; plane: index of the
    defocus plane; scale_index: index of the pixel size; shift_yx: (dy, dx) pixels of
    the centre from the box centre; n_candidates: correlations computed (positions
    not counted).
    """

    score: float
    rotation: torch.Tensor
    plane: int
    scale_index: int
    shift_yx: tuple[int, int]
    n_candidates: int


def refine_in_box(
    prepared: PreparedVolume,
    box: torch.Tensor,
    rotations: torch.Tensor,
    plane_filters_per_scale: list[torch.Tensor],
    scales: list[float],
    batch_size: int = 256,
) -> LocalBest:
    """Best (rotation, defocus plane, scale, shift) for one particle's box.

    Args:
        prepared: the template (D, D, D), prepared for projection.
        box: real (B, B) cut from the filtered, normalised micrograph, centred on the
            particle's current position.
        rotations: (m, 3, 3) candidate orientations.
        plane_filters_per_scale: per scale, real (P, B, B // 2 + 1) template-side
            filters (image filter · CTF at that pixel size, with the contrast sign).
        scales: template voxel size / candidate pixel size, one per filter stack.
        batch_size: orientations correlated at once.

    Returns:
        LocalBest; ties keep the first candidate met (scales in order, then rotation
        batches, then planes, then positions).
    """
    template_size = prepared.box_size
    box_size = box.shape[-1]
    rows, columns = valid_region((box_size, box_size), template_size)
    best: tuple[float, int, int, int, int, int] | None = None
    n_rotations = rotations.shape[0]
    for scale_index, (scale, filters) in enumerate(
        zip(scales, plane_filters_per_scale, strict=True)
    ):
        planes = prepare_planes(box, box.new_ones(()), filters, template_size, normalise=False)
        for start in range(0, n_rotations, batch_size):
            chunk = rotations[start : start + batch_size]
            projections = projections_from_slices(extract_slices(prepared, chunk, scale=scale))
            for plane, inside in correlate_positions(planes, projections, rows, columns):
                flat = int(inside.flatten().argmax())
                value = float(inside.flatten()[flat])
                if best is None or value > best[0]:
                    rotation, position = divmod(flat, inside.shape[-2] * inside.shape[-1])
                    y, x = divmod(position, inside.shape[-1])
                    best = (value, start + rotation, plane, scale_index, y, x)
    assert best is not None
    value, rotation, plane, scale_index, y, x = best
    centre = box_size // 2
    n_planes = sum(f.shape[0] for f in plane_filters_per_scale)
    return LocalBest(
        score=value,
        rotation=rotations[rotation],
        plane=plane,
        scale_index=scale_index,
        shift_yx=(rows.start + y - centre, columns.start + x - centre),
        n_candidates=n_rotations * n_planes,
    )
