"""Our CTF (engine.ctf.ctf_2d) against teamtomo's torch-ctf: same numbers? how fast?

Usage:
    python bench/bench_ctf.py [--batch 100] [--size 512] [--repeats 5] [--device cpu]
        [--torch-ctf-path /tmp/torchctf_pkg]

torch-ctf is optional. To measure it without touching the environment's torch:
    pip download torch-ctf einops torch-grid-utils --no-deps -d /tmp/tc
    pip install --no-deps --target /tmp/torchctf_pkg /tmp/tc/*.whl
and pass --torch-ctf-path /tmp/torchctf_pkg (the default). Prints a table: time per
batch of rfft CTFs and the largest difference between the two.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from cryorefine.engine.ctf import ctf_2d


def _time(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> float:
    """Best wall time of `repeats` calls, in seconds (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--torch-ctf-path", default="/tmp/torchctf_pkg")
    args = parser.parse_args()
    device = torch.device(args.device)

    generator = torch.Generator().manual_seed(0)
    n = args.batch
    defocus_u = (8000 + 20000 * torch.rand(n, generator=generator)).to(device)
    defocus_v = defocus_u - 1000 * torch.rand(n, generator=generator).to(device)
    angle = (360 * torch.rand(n, generator=generator) - 180).to(device)
    pixel_size, voltage, cs, q0, phase = 1.06, 300.0, 2.7, 0.07, 0.0
    shape = (args.size, args.size)

    def ours() -> torch.Tensor:
        return ctf_2d(shape, pixel_size, defocus_u, defocus_v, angle, voltage, cs, q0, phase)

    # The float64 evaluation of RELION's formula is the yardstick for both.
    reference = ctf_2d(
        shape,
        pixel_size,
        defocus_u.double(),
        defocus_v.double(),
        angle.double(),
        voltage,
        cs,
        q0,
        phase,
    ).float()
    rows = [
        (
            "cryorefine ctf_2d",
            _time(ours, args.repeats, device),
            (ours() - reference).abs().max().item(),
        )
    ]

    sys.path.insert(0, args.torch_ctf_path)
    try:
        from torch_ctf import calculate_ctf_2d
    except ImportError as error:
        print(f"torch-ctf not importable from {args.torch_ctf_path} ({error}); ours only.")
    else:

        def theirs() -> torch.Tensor:
            return calculate_ctf_2d(
                defocus=(defocus_u + defocus_v) / 2 * 1e-4,  # µm, mean
                astigmatism=(defocus_u - defocus_v) / 2 * 1e-4,  # µm, half difference
                astigmatism_angle=angle,
                voltage=voltage,
                spherical_aberration=cs,
                amplitude_contrast=q0,
                phase_shift=phase,
                pixel_size=pixel_size,
                image_shape=shape,
                rfft=True,
                fftshift=False,
            )

        difference = (theirs() - reference).abs().max().item()
        rows.append(("torch-ctf calculate_ctf_2d", _time(theirs, args.repeats, device), difference))

    print(
        f"\nCTF batch ({n}, {args.size}, {args.size // 2 + 1}) on {device}, best of {args.repeats}"
    )
    print(f"{'implementation':<28} {'seconds':>9} {'ratio':>7} {'max |diff| vs f64':>18}")
    for name, seconds, difference in rows:
        ratio = seconds / rows[0][1]
        print(f"{name:<28} {seconds:>9.4f} {ratio:>7.2f} {difference:>18.2e}")
    if len(rows) > 1:
        print(
            "max |diff| vs f64: against RELION's formula (λ = 12.2643247/√(V(1+0.978466e-6 V)))"
            " evaluated in float64; torch-ctf takes λ from CODATA constants (6.4e-6 relative"
            " shorter at 300 kV) and computes in float32 only."
        )


if __name__ == "__main__":
    main()
