"""Rotations: RELION's ZYZ Euler angles <-> matrices, and distances between rotations.

This is the one home of the Euler convention. RELION's matrix (XMIPP's
Euler_angles2matrix) is A = Rz(psi) · Ry(tilt) · Rz(rot), where each factor is the
coordinate-frame (passive) rotation, e.g. Rz(a) = [[cos a, sin a, 0],
[-sin a, cos a, 0], [0, 0, 1]]. A acts on (x, y, z) column vectors and takes the
reference volume into the particle's view: the projection is
P(x, y) = sum_z V(Aᵀ · (x, y, z)), so the Fourier slice of a view is
P̂(kx, ky) = V̂(Aᵀ · (kx, ky, 0)). Leopard-EM's (phi, theta, psi) are the same numbers.

Angles are degrees at interfaces; matrices are float tensors (..., 3, 3).
"""

from __future__ import annotations

import functools

import torch


def euler_to_matrix(
    rot: torch.Tensor | float, tilt: torch.Tensor | float, psi: torch.Tensor | float
) -> torch.Tensor:
    """RELION rotation matrices from ZYZ Euler angles in degrees.

    Args:
        rot, tilt, psi: broadcastable (...) angles in degrees.

    Returns:
        (..., 3, 3) matrices A = Rz(psi) · Ry(tilt) · Rz(rot) acting on (x, y, z), in
        the promoted floating dtype of the tensor angles (float64 for plain numbers).
    """
    given = [a for a in (rot, tilt, psi) if isinstance(a, torch.Tensor)]
    # Plain numbers must not drag float64 tensors down to torch's float32 default.
    floats = [a.dtype for a in given if a.is_floating_point()]
    dtype = functools.reduce(torch.promote_types, floats, floats[0]) if floats else torch.float64
    device = given[0].device if given else None
    angles = torch.broadcast_tensors(
        *(torch.as_tensor(a, dtype=dtype, device=device) for a in (rot, tilt, psi))
    )
    a, b, g = (torch.deg2rad(angle) for angle in angles)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    rows = [
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
        [sb * ca, sb * sa, cb],
    ]
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


def matrix_to_euler(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ZYZ Euler angles (rot, tilt, psi) in degrees of RELION rotation matrices.

    Inverse of `euler_to_matrix` with tilt in [0, 180] and rot, psi in (-180, 180].
    At tilt 0 or 180 only rot ± psi is defined; rot is then set to 0.

    Args:
        matrix: (..., 3, 3) rotation matrices.

    Returns:
        rot, tilt, psi: (...) each, degrees.
    """
    m = matrix
    sin_tilt = torch.hypot(m[..., 0, 2], m[..., 1, 2])
    tilt = torch.atan2(sin_tilt, m[..., 2, 2])
    regular = sin_tilt > 1e-6
    rot = torch.where(regular, torch.atan2(m[..., 2, 1], m[..., 2, 0]), torch.zeros_like(tilt))
    psi_regular = torch.atan2(m[..., 1, 2], -m[..., 0, 2])
    # Gimbal lock: A = Rz(psi ± rot) about z; with rot = 0 the in-plane angle is all psi.
    psi_up = torch.atan2(-m[..., 1, 0], m[..., 0, 0])
    psi_down = torch.atan2(m[..., 1, 0], -m[..., 0, 0])
    psi = torch.where(regular, psi_regular, torch.where(m[..., 2, 2] > 0, psi_up, psi_down))
    return torch.rad2deg(rot), torch.rad2deg(tilt), torch.rad2deg(psi)


def angular_distance(matrix_a: torch.Tensor, matrix_b: torch.Tensor) -> torch.Tensor:
    """Geodesic angle in degrees between rotations: (...) from two (..., 3, 3).

    atan2(sin θ, cos θ) rather than acos(cos θ), which loses half the digits near 0.
    """
    r = matrix_a.transpose(-1, -2) @ matrix_b
    cos_angle = (r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0
    axis_times_sin = torch.stack(
        [r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]],
        dim=-1,
    )
    sin_angle = torch.linalg.vector_norm(axis_times_sin, dim=-1) / 2.0
    return torch.rad2deg(torch.atan2(sin_angle, cos_angle))
