"""Projection speed and accuracy: cryorefine.engine.projection vs torch-fourier-slice.

torch-fourier-slice (teamtomo; what Leopard-EM uses) is imported from a throwaway
folder, never installed into the project's environment:

    .venv/bin/pip download torch-fourier-slice torch-image-interpolation \\
        torch-grid-utils torch-ctf einops --no-deps -d /tmp/tfs
    .venv/bin/pip install --no-deps --target /tmp/tfs_pkg /tmp/tfs/*.whl
    .venv/bin/python bench/bench_projection.py --peer-path /tmp/tfs_pkg

Speed: slices per second from a prepared volume (the 2DTM hot loop: one template,
thousands of views) and whole projections (`project` / `project_3d_to_2d`, volume
preparation and inverse FFTs included). Accuracy: max |error| / peak of projections
of an off-centre anisotropic Gaussian against the analytic line integral, for generic
views and for the identity view (where trilinear samples land on grid nodes).
Prints one table; run with --device cuda where there is a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cryorefine.engine.projection import extract_slices, prepare_for_projection, project
from cryorefine.engine.so3 import euler_to_matrix
from relion_tools import gaussian_projection, gaussian_volume, random_rotations

COVARIANCE = torch.tensor([[9.0, 2.0, 0.0], [2.0, 6.0, 1.0], [0.0, 1.0, 4.0]])
GENERIC_VIEWS = [(30.0, 40.0, 50.0), (123.0, 77.0, -20.0), (-70.0, 150.0, 100.0)]


def timed(function: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    """Best wall time of `repeats` runs in seconds (after one warm-up run)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def max_error(
    projector: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    box: int,
    centre: tuple[float, float, float],
    angles: list[tuple[float, float, float]],
    device: torch.device,
) -> float:
    volume = gaussian_volume(box, centre, COVARIANCE).float().to(device)
    rotations = euler_to_matrix(*torch.tensor(angles, dtype=torch.float64).T).float()
    images = projector(volume, rotations.to(device)).double().cpu()
    errors = []
    for image, rotation in zip(images, rotations, strict=True):
        truth = gaussian_projection(box, centre, COVARIANCE, rotation)
        errors.append(((image - truth).abs().max() / truth.abs().max()).item())
    return max(errors)


def peer_projector(
    pad_factor: float,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str] | None:
    """torch-fourier-slice's project_3d_to_2d taking our matrices A, or None if absent.

    Its matrices rotate the slice's sample points; which of A and Aᵀ matches RELION's
    view A is decided here on an asymmetric Gaussian (the better one is used)."""
    try:
        from torch_fourier_slice import project_3d_to_2d
    except ImportError:
        return None
    candidates = {
        "A": lambda v, a: project_3d_to_2d(v, a, pad_factor=pad_factor),
        "A^T": lambda v, a: project_3d_to_2d(v, a.transpose(-1, -2), pad_factor=pad_factor),
    }
    cpu = torch.device("cpu")
    scores = {
        name: max_error(fn, 48, (5.0, -3.0, 2.0), GENERIC_VIEWS, cpu)
        for name, fn in candidates.items()
    }
    best = min(scores, key=scores.__getitem__)
    return candidates[best], best


def peer_prepared_extractor(
    volume: torch.Tensor, pad_factor: float, transpose: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Leopard-EM-style hot loop with torch-fourier-slice: prepare once, extract slices."""
    from torch_fourier_slice import extract_central_slices_rfft_3d
    from torch_fourier_slice.volume_utils import separable_sinc2_correction

    box = volume.shape[-1]
    pad = int((box * (pad_factor - 1.0)) // 2)
    padded = torch.nn.functional.pad(volume, [pad] * 6)
    padded = padded / separable_sinc2_correction(tuple(padded.shape), device=volume.device)
    dft = torch.fft.rfftn(torch.fft.ifftshift(padded, dim=(-3, -2, -1)), dim=(-3, -2, -1))
    dft = torch.fft.fftshift(dft, dim=(-3, -2))

    def extract(rotations: torch.Tensor) -> torch.Tensor:
        matrices = rotations.transpose(-1, -2) if transpose else rotations
        return extract_central_slices_rfft_3d(dft, matrices)

    return extract


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--views", type=int, default=1000)
    parser.add_argument("--pad", type=float, default=2.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=100, help="views per peer call (memory)")
    parser.add_argument("--peer-path", default=None, help="folder holding torch_fourier_slice")
    args = parser.parse_args()
    if args.peer_path:
        sys.path.insert(0, args.peer_path)
    device = torch.device(args.device)
    torch.manual_seed(0)

    volume = gaussian_volume(args.box, (10.0, -6.0, 4.0), COVARIANCE).float().to(device)
    rotations = random_rotations(args.views, seed=1).to(device)
    rows: list[tuple[str, str, str, str, str]] = []

    prepared = prepare_for_projection(volume, args.pad)
    prep_s = timed(lambda: prepare_for_projection(volume, args.pad).channels, device, args.repeats)
    extract_s = timed(lambda: extract_slices(prepared, rotations), device, args.repeats)
    project_s = timed(lambda: project(volume, rotations, args.pad), device, args.repeats)

    def ours(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return project(v, a, args.pad)

    ours_error = max_error(ours, 64, (5.0, -3.0, 2.0), GENERIC_VIEWS, device)
    ours_identity = max_error(ours, 64, (5.0, -3.0, 2.0), [(0.0, 0.0, 0.0)], device)
    d = args.box
    rows.append(
        (
            "cryorefine",
            f"{args.views / extract_s:,.0f} ({d}x{d // 2 + 1})",
            f"{args.views / project_s:,.0f} (prep {prep_s * 1e3:.0f} ms)",
            f"{ours_error:.2e}",
            f"{ours_identity:.2e}",
        )
    )

    peer = peer_projector(args.pad)
    if peer is None:
        print("torch-fourier-slice not importable: pass --peer-path (see the docstring)")
    else:
        peer_project, convention = peer
        chunks = rotations.split(args.chunk)

        def peer_all() -> torch.Tensor:
            return torch.cat([peer_project(volume, c) for c in chunks])

        extract = peer_prepared_extractor(volume, args.pad, transpose=convention == "A^T")

        def peer_extract_all() -> torch.Tensor:
            return torch.cat([extract(c) for c in chunks])

        padded_box = args.box + 2 * int((args.box * (args.pad - 1.0)) // 2)
        peer_extract_s = timed(peer_extract_all, device, args.repeats)
        peer_project_s = timed(peer_all, device, args.repeats)
        peer_error = max_error(peer_project, 64, (5.0, -3.0, 2.0), GENERIC_VIEWS, device)
        peer_identity = max_error(peer_project, 64, (5.0, -3.0, 2.0), [(0.0, 0.0, 0.0)], device)
        rows.append(
            (
                f"torch-fourier-slice ({convention})",
                f"{args.views / peer_extract_s:,.0f} ({padded_box}x{padded_box // 2 + 1})",
                f"{args.views / peer_project_s:,.0f}",
                f"{peer_error:.2e}",
                f"{peer_identity:.2e}",
            )
        )
        rows.append(
            (
                "ratio cryorefine / peer",
                f"{peer_extract_s / extract_s:.2f}x",
                f"{peer_project_s / project_s:.2f}x",
                "",
                "",
            )
        )

    print(
        f"\nbox {args.box}^3, {args.views} views, pad {args.pad}, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("accuracy: 64^3 Gaussian centred at (5, -3, 2) px, max |error| / peak")
    header = (
        "method",
        "slices/s (slice shape)",
        "projections/s",
        "error generic",
        "error identity",
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
