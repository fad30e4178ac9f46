"""Masks made from a map, as RELION's relion_mask_create: threshold, extend, soft edge.

The map is binarised (voxels at or above a threshold), the binary mask grown (or shrunk)
by a Euclidean distance in voxels, and a raised-cosine edge ½(1 + cos(π d / w)) added
over the voxels at distance 0 < d < w from it (w = the soft-edge width in voxels, 0
from d = w on). Distances are Euclidean between voxel centres, exact, and the box is
not periodic: a mask touching one face does not reappear at the opposite one.
"""

from __future__ import annotations

import math

import torch


def distance_from_mask(binary: torch.Tensor, max_distance: float) -> torch.Tensor:
    """Euclidean distance in voxels from every voxel to the nearest True voxel.

    Separable exact transform, three 1D passes of min over offsets t of f(x + t) + t²,
    truncated at |t| ≤ max_distance per axis: exact for every distance ≤
    max_distance (each component of such an offset is within it too).

    Args:
        binary: bool (..., d, h, w), True inside.
        max_distance: the largest distance needed, voxels.

    Returns:
        float32 (..., d, h, w): 0 inside, the distance where it is ≤ max_distance,
        +inf beyond (and everywhere if the mask is empty).
    """
    reach = max(0, math.floor(max_distance))
    squared = torch.where(binary, 0.0, math.inf).to(torch.float32)
    for axis in (-3, -2, -1):
        squared = _min_plus_parabola(squared, axis, reach)
    distance = squared.sqrt()
    return torch.where(distance <= max_distance + 1e-6, distance, math.inf)


def _min_plus_parabola(values: torch.Tensor, axis: int, reach: int) -> torch.Tensor:
    """min over |t| ≤ reach of values[x + t] + t² along one axis, +inf outside the box."""
    if reach == 0:
        return values
    size = values.shape[axis]
    pad_shape = list(values.shape)
    pad_shape[axis] = reach
    far = torch.full(pad_shape, math.inf, dtype=values.dtype, device=values.device)
    padded = torch.cat([far, values, far], dim=axis)
    result = values.clone()
    for offset in range(-reach, reach + 1):
        if offset == 0:
            continue
        shifted = padded.narrow(axis, reach + offset, size)
        result = torch.minimum(result, shifted + float(offset * offset))
    return result


def extend_binary_mask(binary: torch.Tensor, extend_voxels: float) -> torch.Tensor:
    """Grow a binary mask by `extend_voxels` (Euclidean), or shrink it if negative.

    RELION's rule (relion_mask_create --extend_inimask, checked voxel for voxel): growing
    by e adds the voxels at a distance d < e from the mask, shrinking by e removes
    those at d < e from its outside; so |e| ≤ 1 changes nothing.

    Returns:
        bool, the shape of `binary`.
    """
    if extend_voxels > 0:
        return distance_from_mask(binary, extend_voxels) < extend_voxels
    if extend_voxels < 0:
        return ~(distance_from_mask(~binary, -extend_voxels) < -extend_voxels)
    return binary.clone()


def soft_edge_mask(binary: torch.Tensor, soft_edge_voxels: float) -> torch.Tensor:
    """1 inside the binary mask, ½(1 + cos(π d / w)) at distance d < w outside, then 0.

    Args:
        binary: bool (..., d, h, w).
        soft_edge_voxels: w, the width of the raised-cosine edge (0: the hard mask).

    Returns:
        float32 (..., d, h, w) in [0, 1].
    """
    if soft_edge_voxels <= 0:
        return binary.to(torch.float32)
    distance = distance_from_mask(binary, soft_edge_voxels)
    t = (distance / soft_edge_voxels).clamp(max=1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def threshold_mask(
    volume: torch.Tensor,
    threshold: float,
    extend_voxels: float = 0.0,
    soft_edge_voxels: float = 0.0,
) -> torch.Tensor:
    """relion_mask_create: binarise at `threshold` (voxels ≥ it, as RELION), extend, soften.

    Args:
        volume: real (d, h, w) map.
        threshold: density at or above which a voxel is in the seed mask.
        extend_voxels: grow (> 0) or shrink (< 0) the seed by this distance, voxels.
        soft_edge_voxels: width of the raised-cosine edge beyond it, voxels.

    Returns:
        float32 (d, h, w) mask in [0, 1].
    """
    binary = extend_binary_mask(volume >= threshold, extend_voxels)
    return soft_edge_mask(binary, soft_edge_voxels)
