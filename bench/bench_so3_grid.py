"""Global orientation grids at 2DTM steps: size, time and covering radius, ours vs torch-so3.

Run:  .venv/bin/python bench/bench_so3_grid.py [--out-of-plane 2.5] [--in-plane 1.5]

torch-so3 (teamtomo; Leopard-EM's grid) is compared when importable. It is not a
dependency: install it into a throwaway folder, never into .venv (it would pull its
own torch), e.g.

    pip download torch-so3 healpy astropy pyerfa --no-deps -d /tmp/wheels
    pip install --no-deps --target /tmp/tso3 /tmp/wheels/*.whl

and point TORCH_SO3_PATH at that folder (default /tmp/tso3). Its symmetry support is
a rectangle of (phi, theta) ranges per group (`get_symmetry_ranges`); we measure how
well that rectangle covers SO(3) modulo RELION's operators.

The covering radius is the largest, over 20,000 seeded random rotations R, of the
smallest angle between R·S and a grid rotation (S over the group's operators): a
gap-free grid at step s has a covering radius below s. Nearest neighbours come from a
k-d tree of unit quaternions (angle = 4·asin(|q1 - q2| / 2) for q1 · q2 ≥ 0),
cross-checked against engine.so3_grid.distance_to_grid on a subset.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from cryorefine.engine.so3 import euler_to_matrix
from cryorefine.engine.so3_grid import (
    distance_to_grid,
    global_orientation_grid,
    local_rotation_offsets,
)
from cryorefine.engine.symmetry import symmetry_operators


def _timed(make: Callable[[], torch.Tensor], repeats: int = 3) -> tuple[torch.Tensor, float]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = make()
        times.append(time.perf_counter() - start)
    assert result is not None
    return result, statistics.median(times)


def _covering(
    grid_degrees: torch.Tensor, symmetry: str, probes: np.ndarray
) -> tuple[float, float, float]:
    """(max, mean, cross-check error) of the distance from probes to the grid modulo symmetry."""
    matrices = euler_to_matrix(*grid_degrees.double().unbind(-1))
    ops = symmetry_operators(symmetry)
    # angle(Gᵀ R S) = angle((G Sᵀ)ᵀ R): the tree holds every G·Sᵀ, as ±quaternions.
    expanded = (matrices[:, None] @ ops.transpose(-1, -2)[None]).reshape(-1, 3, 3).numpy()
    quats = Rotation.from_matrix(expanded).as_quat()
    tree = cKDTree(np.concatenate([quats, -quats]))
    chord, _ = tree.query(Rotation.from_matrix(probes).as_quat(), k=1)
    angles = np.degrees(4.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0)))
    check = distance_to_grid(torch.as_tensor(probes[:200]), matrices, ops).numpy()
    return float(angles.max()), float(angles.mean()), float(np.abs(check - angles[:200]).max())


def _torch_so3() -> Any:
    path = os.environ.get("TORCH_SO3_PATH", "/tmp/tso3")
    if os.path.isdir(path) and path not in sys.path:
        sys.path.append(path)  # appended: .venv's own torch stays first
    try:
        import torch_so3
    except ImportError as error:
        print(f"torch-so3 not importable from {path} ({error}); comparing ours only.")
        return None
    return torch_so3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-of-plane", type=float, default=2.5, help="degrees")
    parser.add_argument("--in-plane", type=float, default=1.5, help="degrees")
    parser.add_argument("--probes", type=int, default=20_000)
    parser.add_argument("--symmetries", default="C1,D2,T,O,I")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    probes = Rotation.random(args.probes, random_state=0).as_matrix()
    tso3 = _torch_so3()

    header = (
        f"{'grid':<10} {'sym':<4} {'rotations':>10} {'directions':>10} {'x|G|/C1':>8} "
        f"{'time s':>7} {'cover max':>9} {'cover mean':>10} {'max/step':>8}"
    )
    print(
        f"out-of-plane {args.out_of_plane} deg, in-plane {args.in_plane} deg, {args.probes} probes"
    )
    print(header)
    print("-" * len(header))
    counts_c1: dict[str, int] = {}
    worst_check = 0.0
    for symmetry in args.symmetries.split(","):
        order = len(symmetry_operators(symmetry))
        makers: dict[str, Callable[[], torch.Tensor]] = {
            "cryorefine": partial(
                global_orientation_grid,
                args.out_of_plane,
                symmetry,
                in_plane_step_degrees=args.in_plane,
            )
        }
        if tso3 is not None:
            # Leopard-EM's symmetry handling: a (phi, theta) rectangle per group.
            ranges = tso3.get_symmetry_ranges(symmetry[0], int(symmetry[1:] or 1))
            makers["torch-so3"] = partial(
                tso3.get_uniform_euler_angles,
                psi_step=args.in_plane,
                theta_step=args.out_of_plane,
                **ranges._asdict(),
            )
        for label, make in makers.items():
            grid, seconds = _timed(make)
            directions = len(torch.unique(grid[:, :2], dim=0))
            if symmetry == "C1":
                counts_c1[label] = len(grid)
            relative = len(grid) * order / counts_c1.get(label, float("nan"))
            cover_max, cover_mean, check = _covering(grid, symmetry, probes)
            worst_check = max(worst_check, check)
            print(
                f"{label:<10} {symmetry:<4} {len(grid):>10} {directions:>10} {relative:>8.3f} "
                f"{seconds:>7.3f} {cover_max:>9.2f} {cover_mean:>10.2f} "
                f"{cover_max / args.out_of_plane:>8.2f}"
            )
    print(f"k-d tree vs distance_to_grid on 200 probes: max difference {worst_check:.2e} deg")

    print("\nlocal grids (offsets around a pose; covering bound step·√3/2)")
    for max_angle, step in ((6.0, 1.5), (3.0, 0.5), (10.0, 1.0)):
        offsets, seconds = _timed(partial(local_rotation_offsets, max_angle, step))
        print(
            f"  radius {max_angle:>4} deg, step {step:>4} deg: "
            f"{len(offsets):>6} rotations, {seconds:.4f} s"
        )


if __name__ == "__main__":
    main()
