"""Helpers for the projection tests: RELION runs in a temporary folder, test volumes, FSC.

RELION is driven through its files (MRC via mrcfile, STAR via starfile) on purpose:
the tests pin engine conventions against RELION itself, independently of cryorefine.io.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch

from cryorefine.engine.fourier import coordinate_grid
from cryorefine.engine.fsc import fourier_shell_correlation

RELION_TIMEOUT_SECONDS = 120


def run_relion(bin_dir: str, program: str, args: list[str], cwd: Path) -> str:
    """Run `bin_dir/program args` in `cwd`; return its stdout, or fail with its output."""
    result = subprocess.run(
        [f"{bin_dir}/{program}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RELION_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{program} {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    return result.stdout


def write_volume(path: Path, volume: np.ndarray, pixel_size_angstrom: float) -> None:
    """Write a (z, y, x) float32 volume as MRC with its voxel size."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
        mrc.voxel_size = pixel_size_angstrom


def write_particles(
    path: Path,
    angles_degrees: np.ndarray,
    origins_angstrom: np.ndarray,
    pixel_size_angstrom: float,
    box_size: int,
    image_names: list[str] | None = None,
) -> None:
    """Write a RELION 3.1 particle STAR (optics + particles blocks).

    Args:
        angles_degrees: (n, 3) rlnAngleRot, rlnAngleTilt, rlnAnglePsi.
        origins_angstrom: (n, 2) rlnOriginXAngst, rlnOriginYAngst.
        image_names: rlnImageName per row ("000001@stack.mrcs"); placeholders if None.
    """
    n = angles_degrees.shape[0]
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [pixel_size_angstrom],
            "rlnImageSize": [box_size],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    names = image_names or [f"{i + 1:06d}@placeholder.mrcs" for i in range(n)]
    particles = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnAngleRot": angles_degrees[:, 0],
            "rlnAngleTilt": angles_degrees[:, 1],
            "rlnAnglePsi": angles_degrees[:, 2],
            "rlnOriginXAngst": origins_angstrom[:, 0],
            "rlnOriginYAngst": origins_angstrom[:, 1],
            "rlnOpticsGroup": np.ones(n, dtype=int),
            "rlnDefocusU": np.full(n, 10000.0),
            "rlnDefocusV": np.full(n, 10000.0),
            "rlnDefocusAngle": np.zeros(n),
        }
    )
    starfile.write({"optics": optics, "particles": particles}, path, overwrite=True)


def relion_project(
    bin_dir: str,
    workdir: Path,
    volume: np.ndarray,
    pixel_size_angstrom: float,
    angles_degrees: np.ndarray,
    origins_angstrom: np.ndarray,
) -> tuple[np.ndarray, Path]:
    """Project `volume` with relion_project at the given angles and origins.

    Returns:
        (n, D, D) float images in STAR order, and the STAR file relion_project wrote
        (its rlnImageName rows point at the stack, for relion_reconstruct).
    """
    box_size = volume.shape[-1]
    write_volume(workdir / "volume.mrc", volume, pixel_size_angstrom)
    write_particles(
        workdir / "angles.star", angles_degrees, origins_angstrom, pixel_size_angstrom, box_size
    )
    run_relion(
        bin_dir,
        "relion_project",
        ["--i", "volume.mrc", "--o", "projections", "--ang", "angles.star"],
        workdir,
    )
    images = mrcfile.read(workdir / "projections.mrcs").astype(np.float64)
    return images.reshape(-1, box_size, box_size), workdir / "projections.star"


def anisotropic_blobs(box_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(D, D, D) sum of a few off-centre anisotropic Gaussians: no symmetry at all."""
    r = coordinate_grid((box_size,) * 3, dtype=torch.float64)
    s = box_size / 48.0
    blobs = [  # centre (x, y, z) px / s, axes std px / s, rotation about z deg, amplitude
        ((6.0, -3.0, 2.0), (2.0, 3.5, 1.5), 20.0, 1.0),
        ((-8.0, 5.0, -1.0), (1.8, 1.8, 2.5), 0.0, 0.6),
        ((2.0, 9.0, -7.0), (3.0, 1.2, 1.2), -35.0, 0.8),
        ((-4.0, -9.0, 6.0), (1.3, 2.2, 3.0), 60.0, 0.5),
    ]
    volume = torch.zeros((box_size,) * 3, dtype=torch.float64)
    for centre, std, angle, amplitude in blobs:
        c, sn = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        rotation = torch.tensor([[c, -sn, 0.0], [sn, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
        d = (r - s * torch.tensor(centre, dtype=torch.float64)) @ rotation
        scaled = d / (s * torch.tensor(std, dtype=torch.float64))
        volume += amplitude * torch.exp(-0.5 * (scaled**2).sum(-1))
    return volume.to(dtype)


def masked_noise_volume(
    box_size: int,
    radius: float,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    mean: float = 0.0,
) -> torch.Tensor:
    """(D, D, D) white noise (unit variance, + mean) inside a soft-edged ball of `radius`
    pixels: power up to Nyquist, like a density."""
    generator = torch.Generator().manual_seed(seed)
    noise = mean + torch.randn((box_size,) * 3, generator=generator, dtype=torch.float64)
    distance = coordinate_grid((box_size,) * 3, dtype=torch.float64).norm(dim=-1)
    edge = ((radius + 2.0 - distance) / 4.0).clamp(0.0, 1.0)
    return (noise * (0.5 - 0.5 * torch.cos(torch.pi * edge))).to(dtype)


def band_limit(volume: torch.Tensor, max_frequency: float = 0.5) -> torch.Tensor:
    """The volume with every Fourier component beyond |k| = max_frequency (cycles/px) removed."""
    box_size = volume.shape[-1]
    k = torch.fft.fftfreq(box_size, dtype=torch.float64, device=volume.device)
    radius = (k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2).sqrt()
    spectrum = torch.fft.fftn(volume.double()) * (radius <= max_frequency)
    return torch.fft.ifftn(spectrum).real.to(volume.dtype)


def fsc(map_a: torch.Tensor, map_b: torch.Tensor) -> torch.Tensor:
    """FSC of two (D, D, D) maps in float64: (D//2 + 1,) shells round(|k| D), Nyquist last."""
    return fourier_shell_correlation(map_a.double().cpu(), map_b.double().cpu())


def random_rotations(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, 3, 3) rotations uniform on SO(3) (normalised Gaussian quaternions)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=1).reshape(n, 3, 3).to(dtype)


def fibonacci_angles(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) RELION (rot, tilt, psi) degrees: Fibonacci-sphere view directions over the
    whole sphere, in-plane angles spread by the golden angle plus a seeded jitter."""
    i = np.arange(n) + 0.5
    tilt = np.degrees(np.arccos(1.0 - 2.0 * i / n))
    golden = 180.0 * (3.0 - math.sqrt(5.0))
    rot = np.mod(golden * i, 360.0) - 180.0
    jitter = np.random.default_rng(seed).uniform(-10.0, 10.0, n)
    psi = np.mod(golden * 7.0 * i + jitter, 360.0) - 180.0
    return np.stack([rot, tilt, psi], axis=1)


def gaussian_volume(
    box_size: int, centre_xyz: tuple[float, float, float], covariance: torch.Tensor
) -> torch.Tensor:
    """(D, D, D) float64 exp(−½ (r − c)ᵀ Σ⁻¹ (r − c)), r in pixels from the origin D//2."""
    d = coordinate_grid((box_size,) * 3, dtype=torch.float64) - torch.tensor(
        centre_xyz, dtype=torch.float64
    )
    precision = torch.linalg.inv(covariance.double())
    return torch.exp(-0.5 * torch.einsum("...i,ij,...j->...", d, precision, d))


def gaussian_projection(
    box_size: int,
    centre_xyz: tuple[float, float, float],
    covariance: torch.Tensor,
    rotation: torch.Tensor,
) -> torch.Tensor:
    """Analytic ∫ dz of `gaussian_volume` in the view A = rotation: (D, D) float64.

    In the view frame the Gaussian has centre A c and covariance A Σ Aᵀ; integrating
    over z leaves the (x, y) marginal times √(2π) √(|Σ| / |C_xy|).
    """
    a = rotation.double()
    covariance = covariance.double()
    view_covariance = (a @ covariance @ a.T)[:2, :2]
    centre = (a @ torch.tensor(centre_xyz, dtype=torch.float64))[:2]
    d = coordinate_grid((box_size, box_size), dtype=torch.float64) - centre
    precision = torch.linalg.inv(view_covariance)
    amplitude = math.sqrt(2.0 * math.pi) * math.sqrt(
        (torch.linalg.det(covariance) / torch.linalg.det(view_covariance)).item()
    )
    return amplitude * torch.exp(-0.5 * torch.einsum("...i,ij,...j->...", d, precision, d))
