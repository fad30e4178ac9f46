"""Particle stacks with known poses, origins and CTFs (the truth is the particle table).

An image is the projection of the volume in the particle's view (engine.projection),
multiplied by its CTF (engine.ctf, RELION's sign: particles are white, as in images
RELION extracts with --invert_contrast), translated by its origin offset (RELION's
convention, engine.projection.shift_for_origin), plus Gaussian noise.

SNR: the variance of the noiseless CTF-modulated images over the pixels of the whole
box, averaged over the stack, divided by the noise variance. One noise level serves
the whole stack, as in real data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryorefine.engine.ctf import ctf_2d
from cryorefine.engine.fourier import centred_irfftn, phase_shift
from cryorefine.engine.projection import extract_slices, prepare_for_projection, shift_for_origin
from cryorefine.engine.so3 import euler_to_matrix
from cryorefine.io.mrc import write_mrc
from cryorefine.io.star import write_star_particles
from cryorefine.simulate.noise import PowerSpectrum, coloured_noise, seeded_generator, white_noise

OPTICS_GROUP_NAME = "opticsGroup1"


@dataclass(frozen=True)
class Optics:
    """Microscope settings shared by a dataset (one RELION optics group)."""

    voltage_kv: float = 300.0
    spherical_aberration_mm: float = 2.7
    amplitude_contrast: float = 0.07


@dataclass(frozen=True)
class ParticleStack:
    """Simulated particle images and their truth.

    Attributes:
        images: (n, D, D) noisy images.
        noiseless: (n, D, D) the same without noise.
        table: canonical particle table (RELION 3.1 columns), one row per image.
        noise_std: standard deviation of the added noise (0 without noise).
        pixel_size_angstrom: Å per pixel.
    """

    images: torch.Tensor
    noiseless: torch.Tensor
    table: pd.DataFrame
    noise_std: float
    pixel_size_angstrom: float


def uniform_orientations(n: int, generator: torch.Generator) -> torch.Tensor:
    """n RELION Euler angles (rot, tilt, psi) in degrees, uniform on SO(3): (n, 3).

    The Haar measure in ZYZ angles is sin(tilt) d rot d tilt d psi, so cos(tilt) is
    uniform in [-1, 1] and rot, psi are uniform in [-180, 180).
    """
    u = torch.rand((n, 3), generator=generator, dtype=torch.float64)
    rot = 360.0 * u[:, 0] - 180.0
    tilt = torch.rad2deg(torch.acos(2.0 * u[:, 1] - 1.0))
    psi = 360.0 * u[:, 2] - 180.0
    return torch.stack([rot, tilt, psi], dim=-1)


def render_particles(
    volume: torch.Tensor,
    pixel_size_angstrom: float,
    orientations_degrees: torch.Tensor,
    origins_angstrom: torch.Tensor,
    defocus_u_angstrom: torch.Tensor,
    defocus_v_angstrom: torch.Tensor,
    defocus_angle_degrees: torch.Tensor,
    optics: Optics,
    pad_factor: float = 2.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Noiseless CTF-modulated, translated projections of `volume`.

    Args:
        volume: (D, D, D) real.
        pixel_size_angstrom: Å per voxel.
        orientations_degrees: (n, 3) RELION (rot, tilt, psi).
        origins_angstrom: (n, 2) rlnOriginXAngst, rlnOriginYAngst.
        defocus_u_angstrom, defocus_v_angstrom, defocus_angle_degrees: (n,) CTF.
        optics: voltage, Cs, amplitude contrast.
        pad_factor: padding of the volume for Fourier-slice extraction.
        batch_size: images projected at once (memory).

    Returns:
        (n, D, D) on the volume's device.
    """
    device = volume.device
    box = volume.shape[-1]
    prepared = prepare_for_projection(volume, pad_factor=pad_factor)
    images = []
    for start in range(0, orientations_degrees.shape[0], batch_size):
        part = slice(start, start + batch_size)
        angles = orientations_degrees[part].to(device=device, dtype=torch.float64)
        rotations = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]).to(volume.dtype)
        spectra = extract_slices(prepared, rotations)
        ctf = ctf_2d(
            (box, box),
            pixel_size_angstrom,
            defocus_u_angstrom[part].to(device),
            defocus_v_angstrom[part].to(device),
            defocus_angle_degrees[part].to(device),
            optics.voltage_kv,
            optics.spherical_aberration_mm,
            optics.amplitude_contrast,
        ).to(volume.dtype)
        shift = shift_for_origin(origins_angstrom[part].to(device), pixel_size_angstrom)
        spectra = phase_shift(spectra * ctf, shift.to(volume.dtype), (box, box))
        images.append(centred_irfftn(spectra, (box, box)))
    return torch.cat(images, dim=0)


def _random_subsets(n: int, mode: str, generator: torch.Generator) -> np.ndarray:
    """Gold-standard halves 1/2: alternating, or a random balanced assignment."""
    subsets = np.arange(n) % 2 + 1
    if mode == "random":
        order = torch.randperm(n, generator=generator).numpy()
        subsets = subsets[order]
    elif mode != "alternating":
        raise ValueError(f"random subset mode must be 'alternating' or 'random', got {mode!r}")
    return subsets


def optics_columns(
    optics: Optics, pixel_size_angstrom: float, box_size: int | None
) -> dict[str, str | int | float]:
    """The optics-group columns (one group) merged into every row of a table."""
    columns: dict[str, str | int | float] = {
        "rlnOpticsGroup": 1,
        "rlnOpticsGroupName": OPTICS_GROUP_NAME,
        "rlnVoltage": optics.voltage_kv,
        "rlnSphericalAberration": optics.spherical_aberration_mm,
        "rlnAmplitudeContrast": optics.amplitude_contrast,
    }
    if box_size is not None:
        columns |= {
            "rlnImagePixelSize": pixel_size_angstrom,
            "rlnImageSize": box_size,
            "rlnImageDimensionality": 2,
        }
    return columns


def simulate_particle_stack(
    volume: torch.Tensor,
    pixel_size_angstrom: float,
    n_particles: int,
    snr: float | None = 0.1,
    seed: int = 0,
    orientations_degrees: torch.Tensor | None = None,
    defocus_range_angstrom: tuple[float, float] = (10000.0, 25000.0),
    max_astigmatism_angstrom: float = 500.0,
    max_origin_angstrom: float = 0.0,
    optics: Optics | None = None,
    random_subset: str = "alternating",
    noise_spectrum: PowerSpectrum | None = None,
    stack_name: str = "particles.mrcs",
    micrograph_name: str = "simulated.mrc",
    pad_factor: float = 2.0,
) -> ParticleStack:
    """Simulate a particle stack with known truth.

    Args:
        volume: (D, D, D) template (e.g. `potential_from_atoms`), on any device.
        pixel_size_angstrom: Å per pixel of volume and images.
        n_particles: number of images.
        snr: signal variance / noise variance (see module docstring); None = no noise.
        seed: seeds every random choice; the same seed gives the same stack.
        orientations_degrees: (n, 3) (rot, tilt, psi); uniform on SO(3) if None.
        defocus_range_angstrom: defocus U drawn uniformly in this range (Å).
        max_astigmatism_angstrom: U - V drawn uniformly in [0, this] (Å).
        max_origin_angstrom: origins drawn uniformly in a disc of this radius (Å).
        optics: voltage, Cs, amplitude contrast (defaults: 300 kV, 2.7 mm, 0.07).
        random_subset: "alternating" (1, 2, 1, ...) or "random" (balanced) halves.
        noise_spectrum: relative radial power of the noise (cycles/pixel); white if None.
        stack_name: file name in rlnImageName ("000001@particles.mrcs").
        micrograph_name: rlnMicrographName of every particle.
        pad_factor: padding for the projections.

    Returns:
        ParticleStack with images, noiseless images and the particle table.
    """
    optics = optics or Optics()
    generator = seeded_generator(seed)
    n = n_particles
    if orientations_degrees is None:
        orientations = uniform_orientations(n, generator)
    else:
        orientations = torch.as_tensor(orientations_degrees, dtype=torch.float64).reshape(n, 3)
    low, high = defocus_range_angstrom
    u = torch.rand((n, 5), generator=generator, dtype=torch.float64)
    defocus_u = low + (high - low) * u[:, 0]
    defocus_v = defocus_u - max_astigmatism_angstrom * u[:, 1]
    defocus_angle = 180.0 * u[:, 2] - 90.0
    radius = max_origin_angstrom * torch.sqrt(u[:, 3])
    azimuth = 2.0 * torch.pi * u[:, 4]
    origins = torch.stack([radius * torch.cos(azimuth), radius * torch.sin(azimuth)], dim=-1)
    subsets = _random_subsets(n, random_subset, generator)

    noiseless = render_particles(
        volume,
        pixel_size_angstrom,
        orientations,
        origins,
        defocus_u,
        defocus_v,
        defocus_angle,
        optics,
        pad_factor=pad_factor,
    )
    box = volume.shape[-1]
    noise_std = 0.0
    images = noiseless
    if snr is not None:
        signal_variance = float(noiseless.var(dim=(-2, -1)).mean())
        noise_std = (signal_variance / snr) ** 0.5
        if noise_spectrum is None:
            noise = white_noise((n, box, box), noise_std, generator, device=volume.device)
        else:
            noise = coloured_noise(
                (box, box), noise_std, noise_spectrum, generator, n=n, device=volume.device
            )
        images = noiseless + noise.to(noiseless.dtype)

    table = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(n)],
            "rlnMicrographName": micrograph_name,
            "rlnAngleRot": orientations[:, 0].numpy(),
            "rlnAngleTilt": orientations[:, 1].numpy(),
            "rlnAnglePsi": orientations[:, 2].numpy(),
            "rlnOriginXAngst": origins[:, 0].numpy(),
            "rlnOriginYAngst": origins[:, 1].numpy(),
            "rlnDefocusU": defocus_u.numpy(),
            "rlnDefocusV": defocus_v.numpy(),
            "rlnDefocusAngle": defocus_angle.numpy(),
            "rlnPhaseShift": 0.0,
            "rlnCtfBfactor": 0.0,
            "rlnRandomSubset": subsets,
        }
    )
    for column, value in optics_columns(optics, pixel_size_angstrom, box).items():
        table[column] = value
    return ParticleStack(images, noiseless, table, noise_std, pixel_size_angstrom)


def write_particle_stack(
    stack: ParticleStack,
    folder: str | Path,
    stack_name: str = "particles.mrcs",
    star_name: str = "particles.star",
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write the images as an MRC stack and the table as a RELION 3.1 particles STAR file.

    The table's rlnImageName must refer to `stack_name` (as `simulate_particle_stack`
    writes it), relative to `folder`.

    Returns:
        (stack path, STAR path).
    """
    folder = Path(folder)
    stack_path = write_mrc(
        folder / stack_name,
        stack.images,
        stack.pixel_size_angstrom,
        overwrite=overwrite,
        is_stack=True,
    )
    star_path = write_star_particles(folder / star_name, stack.table, overwrite=overwrite)
    return stack_path, star_path
