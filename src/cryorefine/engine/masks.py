"""Soft real-space masks: a sphere (volumes) and a circle (images) centred at N // 2.

The mask is 1 out to `radius`, falls as a raised cosine ½(1 + cos(π (r − radius) /
soft_edge)) over `soft_edge` pixels, and is 0 beyond radius + soft_edge; r is the
distance in pixels from the box origin N // 2 of every axis (engine.fourier).
"""

from __future__ import annotations

import math

import torch

from cryorefine.engine.fourier import coordinate_grid

Length = torch.Tensor | float


def soft_sphere_mask(
    shape: int | tuple[int, int, int],
    radius: Length,
    soft_edge: Length = 0.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Soft spherical mask of a volume.

    Args:
        shape: D or (d, h, w) volume shape in pixels.
        radius: (...) radius in pixels where the fall-off starts.
        soft_edge: (...) width of the raised-cosine fall-off in pixels (0: hard edge).
        device: where to build it; by default that of a tensor radius/soft_edge.

    Returns:
        (..., d, h, w) mask in [0, 1]; ... the broadcast shape of radius and soft_edge.
    """
    if isinstance(shape, int):
        shape = (shape, shape, shape)
    return _soft_radial_mask(shape, radius, soft_edge, device, dtype)


def soft_circle_mask(
    shape: int | tuple[int, int],
    radius: Length,
    soft_edge: Length = 0.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Soft circular mask of an image.

    Args:
        shape: N or (h, w) image shape in pixels.
        radius, soft_edge, device: as in `soft_sphere_mask`.

    Returns:
        (..., h, w) mask in [0, 1].
    """
    if isinstance(shape, int):
        shape = (shape, shape)
    return _soft_radial_mask(shape, radius, soft_edge, device, dtype)


def _soft_radial_mask(
    shape: tuple[int, ...],
    radius: Length,
    soft_edge: Length,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Raised-cosine mask of distance from the origin, batched over radius/soft_edge."""
    if device is None:
        device = next((v.device for v in (radius, soft_edge) if isinstance(v, torch.Tensor)), None)
    r = torch.linalg.vector_norm(coordinate_grid(shape, device=device, dtype=dtype), dim=-1)
    radius_t, edge_t = torch.broadcast_tensors(
        torch.as_tensor(radius, dtype=dtype, device=r.device),
        torch.as_tensor(soft_edge, dtype=dtype, device=r.device),
    )
    trailing = (1,) * len(shape)
    radius_t = radius_t.reshape(*radius_t.shape, *trailing)
    edge_t = edge_t.reshape(*edge_t.shape, *trailing)
    beyond = r - radius_t
    # A zero-width edge gives a hard mask; keep the division finite there.
    t = (beyond / edge_t.clamp(min=torch.finfo(dtype).tiny)).clamp(0.0, 1.0)
    soft = 0.5 * (1.0 + torch.cos(math.pi * t))
    return torch.where(beyond <= 0, torch.ones_like(soft), soft)
