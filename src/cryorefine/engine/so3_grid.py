"""Orientation grids: global searches over an asymmetric unit, local searches around poses.

Global grid. Projection directions lie on rings of constant tilt; each ring carries
points at an arc spacing ≤ the out-of-plane step (rot step ≈ step / sin(tilt), as
cisTEM and Leopard-EM do), and every direction carries the same in-plane (psi)
lattice. Rings of constant tilt were chosen over HEALPix or Fibonacci points because
users set the out-of-plane and in-plane steps separately and to any value (HEALPix
only halves), restrict tilt/rot/psi to ranges, and because the asymmetric unit can be
cut out of each ring in closed form, so its boundary is sampled as densely as its
interior and is not sampled twice.

Rings and points sit at the centres of equal sub-intervals (a range of length L at
step s gets ceil(L / s) points, L / ceil(L / s) apart, the outer ones half a spacing
inside the ends). Each ring stands for the band of half a ring gap (≤ s/2) either
side of it and carries the rots that the searched region has anywhere in that band.
So every direction of the region is within s/2 in tilt of a ring and within s/2 along
that ring of a point: the direction error is ≤ s, and with the in-plane error
≤ psi_step / 2 the rotation error is ≤ s + psi_step / 2 (triangle inequality;
measured 0.73-0.83 s for equal steps, see tests/test_so3_grid.py).

Asymmetric unit. The views A and A · S (S a symmetry operator) give the same image
(engine/symmetry.py), and the projection direction of A in the volume's frame is
d = Aᵀ · (0, 0, 1), the third row of A = (sin tilt cos rot, sin tilt sin rot, cos tilt);
for A · S it is Sᵀ · d. So the group acts on directions as the operators themselves,
and the unit is a fundamental domain of that action:

    F = {d : d · z ≥ d · (S z) for all S}  ∩  {d : d · c ≥ d · (S c) for S fixing z},

the Dirichlet (Voronoi) cell of the z axis, which every RELION group has as a
rotation axis of order m, cut by the m-fold axis into the wedge 0 ≤ rot ≤ 360/m
(c = the equator point at rot = 180/m). For Cn this is 0 ≤ rot ≤ 360/n; for Dn
also tilt ≤ 90; for T, O, I a spherical polygon with a corner on z. Every half-space
is bounded by a great circle, so F's arc on a ring is found in closed form, and each
meridian meets F in one segment starting at z: the rots of F in a ring's band are
those at the band's top. The boundary is closed: a direction exactly on it is kept
(deterministically; no tie is left to rounding). Where an edge of F slants across
rings (T, O, I), a ring's points reach up to half a ring gap beyond it; the grid then
holds up to ~20 % (I at 2.5°) more than |G| times fewer views than the C1 grid.

Local grid. Rotations Δ = exp(ω) for ω on a cubic lattice of spacing `step` in
rotation-vector space (|ω| = rotation angle), clipped to the ball |ω| ≤ max_angle;
lattice points just outside the ball (within step·√3/2) are projected radially onto
its surface. The exponential map does not stretch distances and the projection onto
a ball does not either, so every rotation within max_angle of the centre is within
step·√3/2 of a grid rotation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryorefine.engine.symmetry import symmetry_operators
from cryorefine.errors import CryorefineError

_TOL = 1e-12


# --------------------------------------------------------------------------- global grid


def _equal_subdivision_centres(start: float, stop: float, step: float) -> np.ndarray:
    """Centres of ceil((stop - start) / step) equal sub-intervals of [start, stop]."""
    length = stop - start
    if length <= 1e-9:
        return np.array([start])
    count = max(1, math.ceil(length / step - 1e-9))
    return start + (np.arange(count) + 0.5) * (length / count)


def _full_circle(start: float, step: float) -> np.ndarray:
    """ceil(360 / step) equally spaced angles in degrees from `start` (inclusive)."""
    count = max(1, math.ceil(360.0 / step - 1e-9))
    return start + np.arange(count) * (360.0 / count)


def _asymmetric_unit_normals(operators: np.ndarray) -> np.ndarray:
    """(k, 3) unit normals n with F = {d : n · d ≥ 0 for all n} (see module docstring)."""
    z = np.array([0.0, 0.0, 1.0])
    images_of_z = operators @ z  # (n, 3)
    fixes_z = np.linalg.norm(images_of_z - z, axis=1) < 1e-9
    m = int(fixes_z.sum())
    c = np.array([math.cos(math.pi / m), math.sin(math.pi / m), 0.0])
    normals = np.concatenate(
        [z - images_of_z[~fixes_z], c - operators[fixes_z] @ c], axis=0
    )  # identity gives c - c = 0, dropped below
    lengths = np.linalg.norm(normals, axis=1)
    normals = normals[lengths > 1e-9] / lengths[lengths > 1e-9, None]
    # Many operators share an image of z; one half-space each is enough.
    return np.unique(np.round(normals, 12), axis=0)


def _intersect_intervals(
    a: list[tuple[float, float]], b: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    out = []
    for lo_a, hi_a in a:
        for lo_b, hi_b in b:
            lo, hi = max(lo_a, lo_b), min(hi_a, hi_b)
            if hi >= lo:
                out.append((lo, hi))
    return sorted(out)


def _ring_arcs(
    tilt_degrees: float, normals: np.ndarray, rot_range: tuple[float, float]
) -> list[tuple[float, float]] | None:
    """Arcs [lo, hi] (degrees, in [rot_min, rot_min + 360]) of the ring inside the region.

    Returns None when the whole circle is inside (no boundary on this ring),
    [] when the ring misses the region.
    """
    rot_min, rot_max = rot_range
    full_rot = rot_max - rot_min >= 360.0 - 1e-9
    t = math.radians(tilt_degrees)
    sin_t, cos_t = math.sin(t), math.cos(t)
    arcs: list[tuple[float, float]] = [(0.0, 360.0)]  # in degrees from rot_min
    bounded = not full_rot
    if not full_rot:
        arcs = [(0.0, rot_max - rot_min)]
    for nx, ny, nz in normals:
        # n · d(rot) = sin_t (nx cos rot + ny sin rot) + nz cos_t ≥ 0
        radius = sin_t * math.hypot(nx, ny)
        offset = nz * cos_t
        if radius <= _TOL:
            if offset < -1e-12:
                return []
            continue
        ratio = -offset / radius
        if ratio <= -1.0:
            continue
        if ratio > 1.0 + 1e-12:
            return []
        half = math.degrees(math.acos(min(ratio, 1.0)))
        centre = math.degrees(math.atan2(ny, nx)) - rot_min
        start = (centre - half) % 360.0
        stop = start + 2.0 * half
        allowed = [(start, stop)] if stop <= 360.0 else [(start, 360.0), (0.0, stop - 360.0)]
        arcs = _intersect_intervals(arcs, allowed)
        bounded = True
        if not arcs:
            return []
    if not bounded:
        return None
    # An arc through rot_min (mod 360) arrives as two pieces [0, a] and [b, 360]: join them.
    if full_rot and len(arcs) >= 2 and arcs[0][0] <= 1e-9 and arcs[-1][1] >= 360.0 - 1e-9:
        first, last = arcs[0], arcs[-1]
        arcs = [(last[0], first[1] + 360.0), *arcs[1:-1]]
    return [(lo + rot_min, hi + rot_min) for lo, hi in arcs]


def _region_tilt_extent(
    normals: np.ndarray, tilt_range: tuple[float, float], rot_range: tuple[float, float]
) -> tuple[float, float] | None:
    """Smallest and largest tilt (degrees) of the searched region, to ~1e-9 degrees."""

    def occupied(tilt: float) -> bool:
        return _ring_arcs(tilt, normals, rot_range) != []

    lo_range, hi_range = tilt_range
    scan = np.linspace(lo_range, hi_range, max(2, math.ceil((hi_range - lo_range) / 0.5) + 1))
    hits = [i for i, t in enumerate(scan) if occupied(float(t))]
    if not hits:
        return None

    def bisect(outside: float, inside: float) -> float:
        for _ in range(60):
            middle = 0.5 * (outside + inside)
            if occupied(middle):
                inside = middle
            else:
                outside = middle
        return inside

    first, last = hits[0], hits[-1]
    lo = float(scan[0]) if first == 0 else bisect(float(scan[first - 1]), float(scan[first]))
    hi = (
        float(scan[-1])
        if last == len(scan) - 1
        else bisect(float(scan[last + 1]), float(scan[last]))
    )
    return lo, hi


def _check_step(value: float, field: str) -> float:
    if not (math.isfinite(value) and value > 0.0):
        raise CryorefineError(
            f"the angular step must be a positive number of degrees, got {value}.",
            field=field,
            fix="give a step such as 2.5 (out-of-plane) or 1.5 (in-plane).",
        )
    return float(value)


def _check_range(
    value: tuple[float, float], field: str, lowest: float | None, highest: float | None
) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    bad = not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi)
    if lowest is not None and highest is not None:
        bad = bad or lo < lowest or hi > highest
        rule = f"{lowest} ≤ min ≤ max ≤ {highest}"
    else:
        bad = bad or hi - lo > 360.0 + 1e-9
        rule = "min ≤ max ≤ min + 360"
    if bad:
        raise CryorefineError(
            f"the angle range must satisfy {rule} (degrees), got ({lo}, {hi}).",
            field=field,
            fix=f"give (min, max) with {rule}.",
        )
    return lo, hi


def global_orientation_grid(
    angular_step_degrees: float,
    symmetry: str = "C1",
    in_plane_step_degrees: float | None = None,
    tilt_range_degrees: tuple[float, float] = (0.0, 180.0),
    rot_range_degrees: tuple[float, float] = (0.0, 360.0),
    psi_range_degrees: tuple[float, float] = (0.0, 360.0),
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Near-uniform views of the asymmetric unit of `symmetry`, as RELION Euler angles.

    Args:
        angular_step_degrees: out-of-plane step: the largest spacing of projection
            directions, along and between rings of constant tilt (degrees).
        symmetry: RELION point group (C1, Cn, Dn, T, O, I, I1..I4).
        in_plane_step_degrees: largest psi spacing (degrees); default = out-of-plane step.
        tilt_range_degrees: (min, max) tilt, within [0, 180].
        rot_range_degrees: (min, max) rot, max - min ≤ 360; a full turn is no limit.
        psi_range_degrees: (min, max) psi, max - min ≤ 360; a full turn is no limit.
            Each range is intersected with the asymmetric unit: it restricts the
            unit's representatives of the views, not the views themselves.

    Returns:
        (n, 3) (rot, tilt, psi) in degrees, direction by direction (rings from
        small tilt up), psi fastest. Values stay within the ranges; rot lies in
        [rot_min, rot_min + 360), psi in [psi_min, psi_min + 360). Directions may lie
        up to half a ring gap (≤ step/2) of tilt beyond a slanting edge of the unit
        (module docstring). Matrices: engine.so3.euler_to_matrix(*grid.unbind(-1)).

    Raises:
        CryorefineError for a bad step, range or symmetry name, or ranges that
        leave nothing of the asymmetric unit.
    """
    step = _check_step(angular_step_degrees, "angular_step_degrees")
    psi_step = (
        step
        if in_plane_step_degrees is None
        else _check_step(in_plane_step_degrees, "in_plane_step_degrees")
    )
    tilt_range = _check_range(tilt_range_degrees, "tilt_range_degrees", 0.0, 180.0)
    rot_range = _check_range(rot_range_degrees, "rot_range_degrees", None, None)
    psi_range = _check_range(psi_range_degrees, "psi_range_degrees", None, None)
    normals = _asymmetric_unit_normals(symmetry_operators(symmetry).numpy())

    extent = _region_tilt_extent(normals, tilt_range, rot_range)
    if extent is None:
        raise CryorefineError(
            f"the tilt range {tilt_range} and rot range {rot_range} leave no view of the "
            f"asymmetric unit of {symmetry}.",
            field="rot_range_degrees",
            fix="widen the ranges, or leave them at their defaults.",
        )
    rots, tilts = [], []
    ring_tilts = _equal_subdivision_centres(extent[0], extent[1], step)
    half_gap = (extent[1] - extent[0]) / len(ring_tilts) / 2.0
    for tilt in ring_tilts:
        # A ring stands for the band tilt ± half_gap. The region narrows away from z,
        # so the band's widest arc is at its top: sampling that arc keeps boundaries
        # that slant across rings covered (a few points lie up to half_gap outside).
        band_top = max(float(tilt) - half_gap, extent[0], min(float(tilt), 1e-7))
        arcs = _ring_arcs(band_top, normals, rot_range)
        sin_t = math.sin(math.radians(float(tilt)))
        if arcs is None:  # the whole ring; arc spacing 360 sin(tilt) / count ≤ step
            ring = _full_circle(rot_range[0], step / max(sin_t, 1e-12))
        else:
            pieces = [
                _equal_subdivision_centres(lo, hi, step / max(sin_t, 1e-12)) for lo, hi in arcs
            ]
            ring = np.concatenate(pieces) if pieces else np.empty(0)
        ring = np.where(ring >= rot_range[0] + 360.0, ring - 360.0, ring)
        if sin_t < 1e-12:
            ring = ring[:1]  # a pole is one direction whatever its rot
        rots.append(ring)
        tilts.append(np.full_like(ring, float(tilt)))
    directions = np.stack([np.concatenate(rots), np.concatenate(tilts)], axis=1)

    psi_lo, psi_hi = psi_range
    if psi_hi - psi_lo >= 360.0 - 1e-9:
        psis = _full_circle(psi_lo, psi_step)
    else:
        psis = _equal_subdivision_centres(psi_lo, psi_hi, psi_step)
    grid = np.concatenate(
        [np.repeat(directions, len(psis), axis=0), np.tile(psis, len(directions))[:, None]],
        axis=1,
    )
    return torch.as_tensor(grid, dtype=dtype, device=device)


# --------------------------------------------------------------------------- local grid


def _rotation_vectors_to_matrices(vectors: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotations exp([ω]×) from (..., 3) rotation vectors ω (radians)."""
    angle = vectors.norm(dim=-1, keepdim=True)[..., None]  # (..., 1, 1)
    zero = torch.zeros_like(vectors[..., 0])
    wx, wy, wz = vectors.unbind(-1)
    skew = torch.stack(
        [
            torch.stack([zero, -wz, wy], dim=-1),
            torch.stack([wz, zero, -wx], dim=-1),
            torch.stack([-wy, wx, zero], dim=-1),
        ],
        dim=-2,
    )
    small = angle < 1e-8
    safe = torch.where(small, torch.ones_like(angle), angle)
    # Taylor terms near 0 keep the identity exact at ω = 0.
    a = torch.where(small, 1.0 - angle**2 / 6.0, torch.sin(safe) / safe)
    b = torch.where(small, 0.5 - angle**2 / 24.0, (1.0 - torch.cos(safe)) / safe**2)
    eye = torch.eye(3, dtype=vectors.dtype, device=vectors.device)
    return eye + a * skew + b * (skew @ skew)


def local_rotation_offsets(
    max_angle_degrees: float,
    step_degrees: float,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rotations within `max_angle_degrees` of the identity, spaced `step_degrees`.

    Args:
        max_angle_degrees: largest rotation angle, in [0, 180].
        step_degrees: lattice spacing of the rotation vectors (> 0).

    Returns:
        (m, 3, 3) rotations, the identity first (exactly). Every rotation within
        max_angle of the identity is within step·√3/2 degrees of one of them.
    """
    step = _check_step(step_degrees, "step_degrees")
    max_angle = float(max_angle_degrees)
    if not (math.isfinite(max_angle) and 0.0 <= max_angle <= 180.0):
        raise CryorefineError(
            f"the local search radius must be within [0, 180] degrees, got {max_angle_degrees}.",
            field="max_angle_degrees",
            fix="give the largest expected pose error, e.g. 6.",
        )
    reach = max_angle + step * math.sqrt(3.0) / 2.0
    half_width = math.floor(reach / step + 1e-9)
    axis = torch.arange(-half_width, half_width + 1, dtype=torch.float64) * step
    lattice = torch.cartesian_prod(axis, axis, axis).reshape(-1, 3)
    length = lattice.norm(dim=-1)
    lattice, length = lattice[length <= reach + 1e-9], length[length <= reach + 1e-9]
    # Points just outside move onto the sphere |ω| = max_angle: the surface stays
    # covered to step·√3/2 without leaving the search radius.
    outside = length > max_angle
    lattice[outside] *= (max_angle / length[outside])[:, None]
    if max_angle == 0.0:
        lattice = torch.zeros(1, 3, dtype=torch.float64)
    order = torch.argsort(lattice.norm(dim=-1), stable=True)  # identity (|ω| = 0) first
    lattice = lattice[order]
    return _rotation_vectors_to_matrices(torch.deg2rad(lattice)).to(dtype=dtype, device=device)


def local_orientation_grid(
    center_rotations: torch.Tensor, max_angle_degrees: float, step_degrees: float
) -> torch.Tensor:
    """Rotations within `max_angle_degrees` of each centre: centre · Δ.

    Args:
        center_rotations: (..., 3, 3) view matrices (engine.so3.euler_to_matrix).
        max_angle_degrees: search radius (geodesic angle), in [0, 180].
        step_degrees: spacing of the offsets Δ (see `local_rotation_offsets`).

    Returns:
        (..., m, 3, 3) on the centres' device and dtype; index 0 is the centre itself.
        Every rotation within max_angle of a centre is within step·√3/2 degrees of
        one of its m rotations.
    """
    offsets = local_rotation_offsets(
        max_angle_degrees,
        step_degrees,
        dtype=center_rotations.dtype,
        device=center_rotations.device,
    )
    return center_rotations[..., None, :, :] @ offsets


# --------------------------------------------------------------------------- distances


def distance_to_grid(
    rotations: torch.Tensor,
    grid_rotations: torch.Tensor,
    symmetry_operators: torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Angle in degrees from each rotation to the nearest grid rotation, modulo symmetry.

    min over grid rotations G and operators S of angle(Gᵀ · R · S), computed as
    matrix products in chunks of `chunk_size` rotations (memory ~ chunk · m · k).

    Args:
        rotations: (n, 3, 3) query rotations R.
        grid_rotations: (m, 3, 3).
        symmetry_operators: (k, 3, 3) or None (= identity only).

    Returns:
        (n,) angles in degrees, on the rotations' device.
    """
    grid = grid_rotations.to(rotations)
    if symmetry_operators is not None:
        # angle(Gᵀ R S) = angle((G Sᵀ)ᵀ R): fold the operators into the grid.
        ops = symmetry_operators.to(rotations)
        grid = (grid[:, None] @ ops.transpose(-1, -2)[None]).reshape(-1, 3, 3)
    flat_grid = grid.reshape(-1, 9)
    best = []
    for chunk in rotations.reshape(-1, 9).split(chunk_size):
        # trace(Gᵀ R) = Σ_ij G_ij R_ij
        best.append((chunk @ flat_grid.T).max(dim=-1).values)
    trace = torch.cat(best) if best else rotations.new_zeros(0)
    return torch.rad2deg(torch.acos(((trace - 1.0) / 2.0).clamp(-1.0, 1.0)))
