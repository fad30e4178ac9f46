"""Orientation grids: coverage of SO(3) modulo symmetry, asymmetric units, ranges, local grids.

Bounds used below (s = out-of-plane step, p = in-plane step):
* proven for C1: every rotation is within s + p/2 of the global grid (a direction is
  ≤ s/2 in tilt from a ring and ≤ s/2 along it from a point; psi adds ≤ p/2);
  the same holds in an asymmetric unit, whose rings also sample the half ring gap
  beyond boundaries that slant across them;
* measured: the covering radius over 20,000 seeded random rotations is 0.73-0.83 s for
  C1, C4, D2, T, O, I at p = s (asserted ≤ s), its mean 0.40-0.47 s (asserted ≤ 0.55 s);
* proven for local grids: ≤ step·√3/2 (cubic lattice, non-expanding exp map).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.spatial.transform import Rotation

from cryorefine.engine.so3 import angular_distance, euler_to_matrix, matrix_to_euler
from cryorefine.engine.so3_grid import (
    distance_to_grid,
    global_orientation_grid,
    local_orientation_grid,
    local_rotation_offsets,
)
from cryorefine.engine.symmetry import symmetry_operators
from cryorefine.errors import CryorefineError


def _random_rotations(n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.as_tensor(Rotation.random(n, random_state=seed).as_matrix(), device=device)


def _matrices(grid: torch.Tensor) -> torch.Tensor:
    return euler_to_matrix(grid[:, 0], grid[:, 1], grid[:, 2])


@pytest.mark.parametrize(
    ("symmetry", "step"),
    [("C1", 15.0), ("C4", 15.0), ("D2", 15.0), ("T", 15.0), ("O", 15.0), ("I", 12.0)],
)
def test_global_grid_covers_so3_modulo_symmetry(
    symmetry: str, step: float, device: torch.device
) -> None:
    grid = global_orientation_grid(step, symmetry, device=device)
    assert grid.device.type == device.type and grid.dtype == torch.float64
    gaps = distance_to_grid(
        _random_rotations(20_000, seed=0, device=device),
        _matrices(grid),
        symmetry_operators(symmetry, device=device),
    )
    assert gaps.max() <= step  # measured 0.73-0.83 s
    assert gaps.mean() <= 0.55 * step  # measured 0.40-0.47 s


@pytest.mark.parametrize("symmetry", ["C4", "D2", "D7", "T", "O", "I", "I3"])
def test_asymmetric_unit_has_one_over_group_order_of_the_directions(symmetry: str) -> None:
    """At a 2DTM step (2.5 degrees) the unit holds about |G| times fewer directions.

    The excess is the band of half a ring gap that rings sample beyond boundaries
    slanting across them (T, O, I): the price of covering those as well as the rest.
    """
    count_c1 = len(global_orientation_grid(2.5, "C1", in_plane_step_degrees=360.0))
    count = len(global_orientation_grid(2.5, symmetry, in_plane_step_degrees=360.0))
    ratio = count * len(symmetry_operators(symmetry)) / count_c1
    assert (
        0.97 <= ratio <= 1.25
    )  # measured C4 1.015, D2 1.005, D7 1.035, T 1.089, O 1.084, I 1.201, I3 1.129


@pytest.mark.parametrize(
    ("symmetry", "axis_order"), [("C5", 5), ("D3", 3), ("T", 3), ("O", 4), ("I", 2), ("I3", 5)]
)
def test_directions_lie_in_the_asymmetric_unit(symmetry: str, axis_order: int) -> None:
    """0 ≤ rot ≤ 360/m, and each direction, moved half a step towards z, is at least as
    close to z as any image S·d (rings sample the top of their band: see so3_grid)."""
    step = 7.5
    grid = global_orientation_grid(step, symmetry, in_plane_step_degrees=360.0)
    rot, tilt = grid[:, 0], grid[:, 1]
    assert (rot >= 0.0).all() and (rot <= 360.0 / axis_order).all()
    moved = torch.stack([rot, (tilt - step / 2.0).clamp(min=0.0), torch.zeros_like(rot)], dim=-1)
    directions = _matrices(moved)[:, 2, :]  # third row: projection direction in the volume
    heights = torch.einsum(
        "kj,nj->nk", symmetry_operators(symmetry)[:, 2, :], directions
    )  # z of S·d
    assert (heights[:, 0] >= heights.max(dim=1).values - 1e-9).all()
    if symmetry.startswith("D"):
        assert tilt.max() <= 90.0
    # Without the move, some directions of T, O, I lie just outside: the test is not vacuous.
    directions = _matrices(grid)[:, 2, :]
    heights = torch.einsum("kj,nj->nk", symmetry_operators(symmetry)[:, 2, :], directions)
    outside = heights[:, 0] < heights.max(dim=1).values - 1e-9
    assert outside.any() == (symmetry[0] in "TOI")


@pytest.mark.parametrize(
    ("symmetry", "step"), [("C4", 15.0), ("D2", 15.0), ("T", 15.0), ("O", 15.0), ("I3", 12.0)]
)
def test_every_view_is_equivalent_to_a_view_of_the_unit_by_right_multiplication(
    symmetry: str, step: float
) -> None:
    """Views A and A·S give the same image (test_symmetry.py); the full grid maps into the unit.

    Left multiplication S·A is the wrong action: it only turns psi, so most full-grid
    views stay far from the unit grid; the test can tell the two apart.
    """
    full = _matrices(global_orientation_grid(step, "C1"))
    unit = _matrices(global_orientation_grid(step, symmetry))
    ops = symmetry_operators(symmetry)
    right = distance_to_grid(full, unit, ops)  # min over S, G of angle(Gᵀ · A · S)
    assert right.max() <= step  # measured 0.61-0.64 s
    left = distance_to_grid(full.transpose(-1, -2), unit.transpose(-1, -2), ops)  # angle(Gᵀ S A)
    assert left.max() > 1.4 * step  # measured 2.3-6 s


@pytest.mark.parametrize(
    ("symmetry", "step"), [("C4", 15.0), ("T", 15.0), ("O", 15.0), ("I", 12.0)]
)
def test_no_two_unit_views_are_equivalent(symmetry: str, step: float) -> None:
    views = _matrices(global_orientation_grid(step, symmetry))
    ops = symmetry_operators(symmetry)
    traces = torch.einsum("aji,bjk,ski->abs", views, views, ops).amax(dim=-1)  # trace(Aᵀ B S)
    traces.fill_diagonal_(-1.0)
    closest = torch.rad2deg(torch.acos(((traces.max() - 1.0) / 2.0).clamp(-1.0, 1.0)))
    assert closest >= 0.15 * step  # measured 0.21 (T), 0.23 (I), 0.37 (O), 0.71 (C4) s


def test_ranges_are_respected_and_covered() -> None:
    step, psi_step = 10.0, 5.0
    tilt_range, rot_range, psi_range = (30.0, 60.0), (-45.0, 45.0), (10.0, 100.0)
    grid = global_orientation_grid(step, "C1", psi_step, tilt_range, rot_range, psi_range)
    rot, tilt, psi = grid.unbind(-1)
    assert rot.min() >= -45.0 and rot.max() <= 45.0
    assert tilt.min() >= 30.0 and tilt.max() <= 60.0
    assert psi.min() >= 10.0 and psi.max() <= 100.0
    # Random views inside the ranges are covered within the proven bound s + p/2.
    views = _random_rotations(200_000, seed=5)
    r, t, p = matrix_to_euler(views)
    inside = (t >= 30.0) & (t <= 60.0) & (r.abs() <= 45.0) & (p >= 10.0) & (p <= 100.0)
    assert inside.sum() > 1000
    gaps = distance_to_grid(views[inside], _matrices(grid))
    assert gaps.max() <= step + psi_step / 2.0  # measured 7.35
    assert gaps.max() <= 0.8 * step


def test_ranges_are_intersected_with_the_asymmetric_unit() -> None:
    grid = global_orientation_grid(10.0, "C4", 10.0, rot_range_degrees=(-200.0, 45.0))
    assert grid[:, 0].min() >= 0.0 and grid[:, 0].max() <= 45.0
    full = global_orientation_grid(10.0, "C4", 10.0)
    assert 0.4 < len(grid) / len(full) < 0.6


def test_in_plane_step_is_separate_from_the_out_of_plane_step() -> None:
    coarse = global_orientation_grid(5.0, "D2", in_plane_step_degrees=7.0)
    fine = global_orientation_grid(5.0, "D2", in_plane_step_degrees=1.5)
    directions = torch.unique(coarse[:, :2], dim=0)
    assert len(directions) == len(torch.unique(fine[:, :2], dim=0))
    assert len(coarse) == len(directions) * math.ceil(360 / 7.0)
    assert len(fine) == len(directions) * 240
    psis = torch.unique(fine[:, 2])
    torch.testing.assert_close(psis.diff(), torch.full((239,), 1.5, dtype=torch.float64))
    assert psis[0] == 0.0


def test_degenerate_ranges_give_one_ring_and_one_psi() -> None:
    grid = global_orientation_grid(
        10.0, "C1", tilt_range_degrees=(90.0, 90.0), psi_range_degrees=(0.0, 0.0)
    )
    assert len(grid) == 36
    assert (grid[:, 1] == 90.0).all() and (grid[:, 2] == 0.0).all()
    torch.testing.assert_close(grid[:, 0], torch.arange(36, dtype=torch.float64) * 10.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"angular_step_degrees": 0.0}, "angular_step_degrees"),
        ({"angular_step_degrees": float("nan")}, "angular_step_degrees"),
        ({"in_plane_step_degrees": -1.0}, "in_plane_step_degrees"),
        ({"tilt_range_degrees": (-5.0, 90.0)}, "tilt_range_degrees"),
        ({"tilt_range_degrees": (100.0, 90.0)}, "tilt_range_degrees"),
        ({"rot_range_degrees": (0.0, 400.0)}, "rot_range_degrees"),
        ({"psi_range_degrees": (50.0, 10.0)}, "psi_range_degrees"),
        ({"symmetry": "D2h"}, "symmetry"),
        ({"symmetry": "D2", "tilt_range_degrees": (120.0, 180.0)}, "rot_range_degrees"),
    ],
)
def test_bad_arguments_name_their_field(kwargs: dict, field: str) -> None:
    arguments = {"angular_step_degrees": 10.0, **kwargs}
    with pytest.raises(CryorefineError) as raised:
        global_orientation_grid(**arguments)
    assert raised.value.field == field


def test_distance_to_grid_matches_brute_force(device: torch.device) -> None:
    queries = _random_rotations(37, seed=6, device=device)
    grid = _random_rotations(23, seed=7, device=device)
    ops = symmetry_operators("D3", device=device)
    brute = (
        torch.stack(
            [angular_distance(queries[:, None] @ op, grid[None]).min(dim=1).values for op in ops]
        )
        .min(dim=0)
        .values
    )
    torch.testing.assert_close(
        distance_to_grid(queries, grid, ops, chunk_size=5), brute, atol=1e-6, rtol=0
    )
    plain = angular_distance(queries[:, None], grid[None]).min(dim=1).values
    torch.testing.assert_close(distance_to_grid(queries, grid), plain, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- local grids


def test_local_offsets_identity_first_within_radius_and_cover_the_ball() -> None:
    max_angle, step = 6.0, 1.5
    offsets = local_rotation_offsets(max_angle, step)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.equal(offsets[0], eye)
    torch.testing.assert_close(
        offsets @ offsets.transpose(-1, -2), eye.expand_as(offsets), atol=1e-13, rtol=0
    )
    angles = angular_distance(eye, offsets)
    assert angles.max() <= max_angle + 1e-6
    # Every rotation in the ball: rotation vectors uniform in the ball of radius 6 degrees.
    g = torch.Generator().manual_seed(8)
    direction = torch.nn.functional.normalize(
        torch.randn(20_000, 3, generator=g, dtype=torch.float64), dim=-1
    )
    radius = max_angle * torch.rand(20_000, 1, generator=g, dtype=torch.float64) ** (1.0 / 3.0)
    radius[:2000] = max_angle  # the surface, where clipping could leave gaps
    probes = torch.as_tensor(
        Rotation.from_rotvec((direction * torch.deg2rad(radius)).numpy()).as_matrix()
    )
    gaps = distance_to_grid(probes, offsets)
    assert gaps.max() <= step * math.sqrt(3.0) / 2.0 + 1e-6  # measured 1.27 of bound 1.30
    # Size: the ball holds about (4/3)π(R/h)³ lattice points, plus a projected shell.
    assert (
        4.0 / 3.0 * math.pi * (max_angle / step) ** 3
        < len(offsets)
        < 2.5 * 4.0 / 3.0 * math.pi * (max_angle / step) ** 3
    )


def test_local_grid_is_centre_times_offsets_batched(device: torch.device) -> None:
    centres = _random_rotations(6, seed=9, device=device).reshape(2, 3, 3, 3)
    grid = local_orientation_grid(centres, 5.0, 2.0)
    offsets = local_rotation_offsets(5.0, 2.0, device=device)
    assert grid.shape == (2, 3, len(offsets), 3, 3) and grid.device.type == device.type
    torch.testing.assert_close(grid[..., 0, :, :], centres, atol=1e-15, rtol=0)  # centre included
    torch.testing.assert_close(grid[1, 2], centres[1, 2] @ offsets)
    spread = angular_distance(centres[..., None, :, :], grid)
    assert spread.max() <= 5.0 + 1e-6
    # Float32 centres give float32 grids.
    assert local_orientation_grid(centres.float(), 5.0, 2.0).dtype == torch.float32


def test_local_grid_edge_cases() -> None:
    eye = torch.eye(3, dtype=torch.float64)
    only_centre = local_orientation_grid(eye, 0.0, 1.0)
    assert only_centre.shape == (1, 3, 3) and torch.equal(only_centre[0], eye)
    small = local_rotation_offsets(1.0, 3.0)  # radius below the step: centre plus a shell
    assert angular_distance(eye, small).max() <= 1.0 + 1e-9 and len(small) > 1
    for bad in ({"max_angle_degrees": 200.0}, {"max_angle_degrees": -1.0}, {"step_degrees": 0.0}):
        arguments = {"max_angle_degrees": 5.0, "step_degrees": 1.0, **bad}
        with pytest.raises(CryorefineError) as raised:
            local_rotation_offsets(**arguments)
        assert raised.value.field == next(iter(bad))
