"""RELION's ZYZ Euler convention (engine/so3.py): formula, RELION's own numbers, inverses."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from scipy.spatial.transform import Rotation

from cryorefine.engine.so3 import angular_distance, euler_to_matrix, matrix_to_euler
from relion_tools import run_relion


def _f64(*values: float) -> tuple[torch.Tensor, ...]:
    """Angles as float64 tensors (a bare Python float becomes a float32 tensor in so3)."""
    return tuple(torch.tensor(v, dtype=torch.float64) for v in values)


def _passive_z(angle_degrees: float) -> torch.Tensor:
    a = math.radians(angle_degrees)
    return torch.tensor(
        [[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )


def _passive_y(angle_degrees: float) -> torch.Tensor:
    a = math.radians(angle_degrees)
    return torch.tensor(
        [[math.cos(a), 0.0, -math.sin(a)], [0.0, 1.0, 0.0], [math.sin(a), 0.0, math.cos(a)]],
        dtype=torch.float64,
    )


@pytest.mark.parametrize(
    ("rot", "tilt", "psi"),
    [(0.0, 0.0, 0.0), (30.0, 0.0, 0.0), (0.0, 40.0, 0.0), (0.0, 0.0, 50.0), (-73.0, 121.0, 200.0)],
)
def test_matrix_is_xmipp_euler_angles2matrix(rot: float, tilt: float, psi: float) -> None:
    """A = Rz(psi) · Ry(tilt) · Rz(rot) with XMIPP's (passive) factors."""
    expected = _passive_z(psi) @ _passive_y(tilt) @ _passive_z(rot)
    torch.testing.assert_close(euler_to_matrix(*_f64(rot, tilt, psi)), expected, atol=1e-15, rtol=0)


def test_explicit_entries() -> None:
    """rot = 90: x goes to -y (passive); tilt = 90 sends the projection axis to x."""
    torch.testing.assert_close(
        euler_to_matrix(*_f64(90.0, 0.0, 0.0)),
        torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64),
        atol=1e-15,
        rtol=0,
    )
    # Third row = projection direction in the volume frame (sin t cos r, sin t sin r, cos t).
    a = euler_to_matrix(*_f64(30.0, 60.0, 45.0))
    t, r = math.radians(60.0), math.radians(30.0)
    expected = torch.tensor(
        [math.sin(t) * math.cos(r), math.sin(t) * math.sin(r), math.cos(t)], dtype=torch.float64
    )
    torch.testing.assert_close(a[2], expected, atol=1e-15, rtol=0)


def test_batched_orthonormal_proper(device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    angles = (torch.rand(4, 50, 3, generator=g, dtype=torch.float64) * 360.0 - 180.0).to(device)
    m = euler_to_matrix(angles[..., 0], angles[..., 1], angles[..., 2])
    assert m.shape == (4, 50, 3, 3) and m.device.type == device.type
    eye = torch.eye(3, dtype=m.dtype, device=device).expand_as(m)
    torch.testing.assert_close(m @ m.transpose(-1, -2), eye, atol=1e-13, rtol=0)
    torch.testing.assert_close(torch.linalg.det(m), torch.ones(4, 50, dtype=m.dtype, device=device))
    # float32 in, float32 out
    assert euler_to_matrix(angles[..., 0].float(), 10.0, 20.0).dtype == torch.float32


def test_round_trip_regular(device: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    n = 2000
    rot = (torch.rand(n, generator=g, dtype=torch.float64) * 360.0 - 179.999).to(device)
    tilt = (torch.rand(n, generator=g, dtype=torch.float64) * 179.0 + 0.5).to(device)
    psi = (torch.rand(n, generator=g, dtype=torch.float64) * 360.0 - 179.999).to(device)
    back = matrix_to_euler(euler_to_matrix(rot, tilt, psi))
    for got, want in zip(back, (rot, tilt, psi), strict=True):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_round_trip_gimbal_lock(tilt: float, device: torch.device) -> None:
    """At tilt 0 or 180 only rot ± psi is defined: rot comes back 0, the matrix is unchanged."""
    rot = torch.tensor([10.0, -60.0, 170.0, 0.0], dtype=torch.float64, device=device)
    psi = torch.tensor([25.0, 100.0, -30.0, 90.0], dtype=torch.float64, device=device)
    m = euler_to_matrix(rot, torch.tensor(tilt, dtype=torch.float64, device=device), psi)
    r, t, p = matrix_to_euler(m)
    torch.testing.assert_close(r, torch.zeros_like(r))
    torch.testing.assert_close(t, torch.full_like(t, tilt))
    torch.testing.assert_close(euler_to_matrix(r, t, p), m, atol=1e-12, rtol=0)
    # tilt 0: A = Rz(rot + psi); tilt 180: A depends on psi - rot only.
    combined = rot + psi if tilt == 0.0 else psi - rot
    wrapped = torch.remainder(p - combined + 180.0, 360.0) - 180.0
    torch.testing.assert_close(wrapped, torch.zeros_like(wrapped), atol=1e-9, rtol=0)


def test_angular_distance(device: torch.device) -> None:
    g = torch.Generator().manual_seed(2)
    angle = torch.rand(100, generator=g, dtype=torch.float64) * 180.0
    axis = torch.nn.functional.normalize(
        torch.randn(100, 3, generator=g, dtype=torch.float64), dim=-1
    )
    delta = torch.as_tensor(
        Rotation.from_rotvec((axis * torch.deg2rad(angle)[:, None]).numpy()).as_matrix()
    )
    base = torch.as_tensor(Rotation.random(100, random_state=3).as_matrix())
    a, b = base.to(device), (base @ delta).to(device)
    torch.testing.assert_close(angular_distance(a, b), angle.to(device), atol=1e-6, rtol=0)
    torch.testing.assert_close(angular_distance(b, a), angle.to(device), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        angular_distance(a, a), torch.zeros_like(angle, device=device), atol=1e-5, rtol=0
    )
    # Left and right multiplication by the same rotation leaves the distance unchanged.
    c = torch.as_tensor(Rotation.random(1, random_state=4).as_matrix()[0], device=device)
    torch.testing.assert_close(
        angular_distance(c @ a, c @ b), angular_distance(a, b), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        angular_distance(a @ c, b @ c), angular_distance(a, b), atol=1e-6, rtol=0
    )


@pytest.mark.relion
def test_relion_prints_the_same_matrix_for_its_euler_angles(
    relion_bin: str, tmp_path: Path
) -> None:
    """`relion_refine --print_symmetry_ops` prints each operator and its Euler angles.

    Our euler_to_matrix of RELION's angles is RELION's matrix (5 printed digits), and
    matrix_to_euler of the matrix gives RELION's angles back away from gimbal lock
    (6 printed significant digits: 2e-3 degrees).
    """
    checked = 0
    for name in ("T", "I1", "I3", "D7"):
        out = run_relion(
            relion_bin, "relion_refine", ["--print_symmetry_ops", "--sym", name], tmp_path
        )
        pattern = r"R\(\d+\)=\s*\n((?:[ \t]*\S+[ \t]+\S+[ \t]+\S+[ \t]*\n){3})\s*Euler angles:(.*)"
        for matrix_text, angles_text in re.findall(pattern, out):
            relion_matrix = torch.tensor(
                [float(v) for v in matrix_text.split()], dtype=torch.float64
            )
            rot, tilt, psi = (float(v) for v in angles_text.split())
            ours = euler_to_matrix(*_f64(rot, tilt, psi))
            torch.testing.assert_close(ours.reshape(9), relion_matrix, atol=1e-4, rtol=0)
            if 0.01 < tilt < 179.99:
                back = matrix_to_euler(relion_matrix.reshape(3, 3))
                for got, want in zip(back, (rot, tilt, psi), strict=True):
                    gap = (float(got) - want + 180.0) % 360.0 - 180.0
                    assert abs(gap) < 2e-3
            checked += 1
    assert checked == 11 + 59 + 59 + 13
