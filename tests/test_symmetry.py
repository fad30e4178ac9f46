"""Point-group operators: group axioms, RELION's own matrices, and pose equivalence."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryorefine.engine.so3 import angular_distance
from cryorefine.engine.symmetry import (
    canonical_symmetry_name,
    symmetric_angular_distance,
    symmetry_operators,
)
from cryorefine.errors import CryorefineError
from relion_tools import run_relion

ORDERS = {
    "C1": 1,
    "C2": 2,
    "C7": 7,
    "D1": 2,
    "D2": 4,
    "D7": 14,
    "T": 12,
    "O": 24,
    "I": 60,
    "I1": 60,
    "I2": 60,
    "I3": 60,
    "I4": 60,
}


def _contains(group: torch.Tensor, matrices: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """(n,) whether each of (n, 3, 3) `matrices` is an element of (k, 3, 3) `group`."""
    gap = (matrices[:, None] - group[None]).abs().amax(dim=(-1, -2))
    return gap.min(dim=1).values < tol


@pytest.mark.parametrize("name", list(ORDERS))
def test_operators_form_a_group_of_proper_rotations(name: str, device: torch.device) -> None:
    ops = symmetry_operators(name, device=device)
    eye = torch.eye(3, dtype=torch.float64, device=device)
    assert ops.shape == (ORDERS[name], 3, 3)
    assert ops.dtype == torch.float64 and ops.device.type == device.type
    torch.testing.assert_close(ops[0], eye, atol=0, rtol=0)  # identity first
    torch.testing.assert_close(ops @ ops.transpose(-1, -2), eye.expand_as(ops), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        torch.linalg.det(ops), torch.ones(len(ops), dtype=ops.dtype, device=device)
    )
    products = (ops[:, None] @ ops[None]).reshape(-1, 3, 3)
    assert _contains(ops, products).all()  # closure
    assert _contains(ops, ops.transpose(-1, -2)).all()  # inverses
    distinct = (ops[:, None] - ops[None]).abs().amax(dim=(-1, -2)) + torch.eye(
        len(ops), device=device
    )
    assert distinct.min() > 1e-3  # no element listed twice


def test_orientation_conventions() -> None:
    """Cn about z; Dn adds a 2-fold about x; T a 3-fold about z; O 4-folds about x, y, z."""
    c4 = symmetry_operators("C4")
    quarter_turn_z = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)
    assert _contains(c4, quarter_turn_z[None]).all()
    two_fold_x = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    assert _contains(symmetry_operators("D5"), two_fold_x[None]).all()
    assert not _contains(
        symmetry_operators("D5"), torch.diag(torch.tensor([-1.0, 1.0, -1.0]))[None].double()
    ).all()
    quarter_turn_x = torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=torch.float64)
    assert _contains(symmetry_operators("O"), torch.stack([quarter_turn_z, quarter_turn_x])).all()
    third_turn_z = torch.tensor(Rotation.from_euler("z", 120, degrees=True).as_matrix())
    assert _contains(symmetry_operators("T"), third_turn_z[None], tol=1e-12).all()


def test_names_are_case_insensitive_and_canonical() -> None:
    assert canonical_symmetry_name(" c4 ") == "C4"
    assert canonical_symmetry_name("d07") == "D7"
    assert canonical_symmetry_name("i") == "I2"
    torch.testing.assert_close(symmetry_operators("i"), symmetry_operators("I2"))
    torch.testing.assert_close(symmetry_operators("d3"), symmetry_operators("D3"))


@pytest.mark.parametrize("bad", ["C0", "D0", "X2", "C", "Oh", "D6h", "C2v", "I5", "", "4"])
def test_unknown_symmetry_names_the_field_and_the_valid_names(bad: str) -> None:
    with pytest.raises(CryorefineError) as raised:
        symmetry_operators(bad)
    assert raised.value.field == "symmetry"
    assert repr(bad) in str(raised.value)
    assert "Dn" in str(raised.value) and "I1" in str(raised.value)


def _relion_operators(relion_bin: str, name: str, workdir: Path) -> np.ndarray:
    out = run_relion(relion_bin, "relion_refine", ["--print_symmetry_ops", "--sym", name], workdir)
    blocks = re.findall(r"R\(\d+\)=\s*\n((?:[ \t]*\S+[ \t]+\S+[ \t]+\S+[ \t]*\n){3})", out)
    return np.array([[float(v) for v in block.split()] for block in blocks]).reshape(-1, 3, 3)


@pytest.mark.relion
@pytest.mark.parametrize("name", ["C4", "D2", "D7", "T", "O", "I", "I1", "I3", "I4"])
def test_operators_equal_relions_as_sets(relion_bin: str, name: str, tmp_path: Path) -> None:
    """RELION prints 5 significant digits: the sets agree to 1e-4 both ways."""
    theirs = torch.as_tensor(_relion_operators(relion_bin, name, tmp_path))
    ours = symmetry_operators(name)
    assert theirs.shape == ours.shape
    assert _contains(ours, theirs, tol=1e-4).all()
    assert _contains(theirs, ours, tol=1e-4).all()


def _orbit_projection(points: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """(k, 2) image positions of point masses at `points`.

    P(x, y) = Σ_z V(Aᵀ r) puts the mass at p where Aᵀ r = p, i.e. r = A p.
    """
    return (points @ view.T)[:, :2]


def _same_point_sets(p: torch.Tensor, q: torch.Tensor, tol: float = 1e-9) -> bool:
    gaps = torch.cdist(p, q, compute_mode="donot_use_mm_for_euclid_dist")
    return bool(gaps.min(dim=1).values.max() < tol and gaps.min(dim=0).values.max() < tol)


@pytest.mark.parametrize("name", ["D2", "T", "O", "I3"])
def test_right_multiplied_views_give_the_same_projection(name: str) -> None:
    """A symmetric volume (the orbit of a point under the group) looks the same from A and A·S."""
    ops = symmetry_operators(name)
    orbit = ops @ torch.tensor([0.3, -0.2, 0.7], dtype=torch.float64)  # (k, 3)
    views = torch.as_tensor(Rotation.random(5, random_state=1).as_matrix())
    left_differs = False
    for view in views:
        reference = _orbit_projection(orbit, view)
        for op in ops:
            assert _same_point_sets(_orbit_projection(orbit, view @ op), reference)
            left_differs |= not _same_point_sets(
                _orbit_projection(orbit, op @ view), reference, 1e-6
            )
    assert left_differs  # S·A is not an equivalent view: the test can tell the two apart


def test_symmetric_angular_distance_matches_brute_force(device: torch.device) -> None:
    ops = symmetry_operators("O", device=device)
    a = torch.as_tensor(Rotation.random(50, random_state=2).as_matrix(), device=device)
    b = torch.as_tensor(Rotation.random(50, random_state=3).as_matrix(), device=device)
    brute = torch.stack([angular_distance(a @ op, b) for op in ops]).min(dim=0).values
    torch.testing.assert_close(symmetric_angular_distance(a, b, ops), brute, atol=1e-9, rtol=0)
    # An equivalent pose is at distance 0, and symmetry never increases the distance.
    torch.testing.assert_close(
        symmetric_angular_distance(a @ ops[7], a, ops),
        torch.zeros(50, dtype=torch.float64, device=device),
        atol=1e-5,
        rtol=0,
    )
    assert symmetric_angular_distance(a, b, ops).max() <= angular_distance(a, b).max()
