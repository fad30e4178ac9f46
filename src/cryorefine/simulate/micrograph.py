"""Micrographs with particles at known positions, poses and defoci.

Each particle's projection (engine.projection) is zero-padded to a box wide enough
to hold the CTF's delocalisation (λ Δf k up to Nyquist on each side), translated
by the sub-pixel part of its position with a phase ramp, modulated by its own CTF,
and added to the micrograph at the integer part of its position; what falls beyond
the micrograph's edges is dropped (outside the field of view). Contrast follows RELION's CTF sign
(particles white, as in RELION after --invert_contrast); `invert_contrast=True`
gives the dark particles of raw data.

Positions: rlnCoordinateX/Y is the particle centre in micrograph pixels (0-based
array index, sub-pixel), the point where the box origin D // 2 of the particle's
projection lands.

SNR: as for particle stacks, the variance of each particle's noiseless CTF-modulated
projection over a D x D box, averaged over the particles, divided by the noise
variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cryorefine.engine.ctf import ctf_2d, electron_wavelength_angstrom
from cryorefine.engine.fourier import centred_irfftn, centred_rfftn, phase_shift
from cryorefine.engine.projection import extract_slices, prepare_for_projection
from cryorefine.engine.so3 import euler_to_matrix
from cryorefine.errors import CryorefineError
from cryorefine.io.particles import RELATIVE_DEFOCUS
from cryorefine.simulate.noise import PowerSpectrum, coloured_noise, seeded_generator, white_noise
from cryorefine.simulate.particles import Optics, optics_columns, uniform_orientations


@dataclass(frozen=True)
class Micrograph:
    """A simulated micrograph and its truth.

    Attributes:
        image: (H, W) noisy micrograph.
        noiseless: (H, W) without noise.
        particles: canonical particle table, one row per particle (positions,
            angles, absolute defoci, relative defocus).
        ctf: one-row table of the micrograph's CTF (rlnMicrographName, rlnDefocusU/V/
            Angle and the optics columns), as in a RELION micrographs STAR file.
        noise_std: standard deviation of the added noise (0 without noise).
        pixel_size_angstrom: Å per pixel.
    """

    image: torch.Tensor
    noiseless: torch.Tensor
    particles: pd.DataFrame
    ctf: pd.DataFrame
    noise_std: float
    pixel_size_angstrom: float


def random_positions(
    n: int,
    micrograph_shape: tuple[int, int],
    min_distance_px: float,
    edge_margin_px: float,
    generator: torch.Generator,
    max_draws: int = 200,
) -> torch.Tensor:
    """n positions (x, y) in pixels, at least `min_distance_px` apart and from the edges.

    Dart throwing: candidates are drawn uniformly in [margin, size - 1 - margin] and
    kept when far enough from every kept one.

    Returns:
        (n, 2) float64 positions ordered (x, y).

    Raises:
        CryorefineError: the particles do not fit.
    """
    height, width = micrograph_shape
    span = torch.tensor([width - 1 - 2 * edge_margin_px, height - 1 - 2 * edge_margin_px])
    if bool((span <= 0).any()):
        raise CryorefineError(
            f"a {height}x{width} micrograph has no room inside an edge margin of "
            f"{edge_margin_px} pixels.",
            fix="use a larger micrograph or a smaller particle box.",
        )
    kept: list[torch.Tensor] = []
    if n == 0:
        return torch.zeros((0, 2), dtype=torch.float64)
    for _ in range(max_draws):
        candidates = edge_margin_px + span * torch.rand(
            (n, 2), generator=generator, dtype=torch.float64
        )
        for candidate in candidates:
            if len(kept) == n:
                break
            if (
                kept
                and float(torch.cdist(candidate[None], torch.stack(kept)).min()) < min_distance_px
            ):
                continue
            kept.append(candidate)
        if len(kept) == n:
            return torch.stack(kept)
    raise CryorefineError(
        f"could not place {n} particles at least {min_distance_px:g} pixels apart in a "
        f"{height}x{width} micrograph (placed {len(kept)}).",
        fix="ask for fewer particles, a larger micrograph or a smaller minimum distance.",
    )


def _add_clipped(canvas: torch.Tensor, image: torch.Tensor, corner_xy: tuple[int, int]) -> None:
    """Add `image` (L, L) into `canvas` (H, W) with its first pixel at corner (x, y).

    What falls outside the canvas is dropped (it is outside the field of view).
    """
    height, width = canvas.shape
    size = image.shape[-1]
    x, y = corner_xy
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + size, width), min(y + size, height)
    if x1 > x0 and y1 > y0:
        canvas[y0:y1, x0:x1] += image[y0 - y : y1 - y, x0 - x : x1 - x]


def ctf_box_size(
    box_size: int, pixel_size_angstrom: float, max_defocus_angstrom: float, voltage_kv: float
) -> int:
    """Edge of the box in which a particle's CTF is applied: the particle box plus the
    CTF's delocalisation λ Δf k on each side, with k the Nyquist frequency (pixels, even).
    """
    wavelength = float(electron_wavelength_angstrom(voltage_kv))
    nyquist = 0.5 / pixel_size_angstrom
    delocalisation_px = wavelength * abs(max_defocus_angstrom) * nyquist / pixel_size_angstrom
    size = box_size + 2 * math.ceil(delocalisation_px) + 8
    return size + size % 2


def simulate_micrograph(
    volume: torch.Tensor,
    pixel_size_angstrom: float,
    micrograph_shape: tuple[int, int],
    n_particles: int | None = None,
    positions_px: torch.Tensor | None = None,
    orientations_degrees: torch.Tensor | None = None,
    defocus_u_angstrom: float = 15000.0,
    defocus_v_angstrom: float | None = None,
    defocus_angle_degrees: float = 0.0,
    defocus_offsets_angstrom: torch.Tensor | None = None,
    ice_thickness_angstrom: float = 0.0,
    optics: Optics | None = None,
    snr: float | None = 0.1,
    noise_std: float | None = None,
    noise_spectrum: PowerSpectrum | None = None,
    min_distance_px: float | None = None,
    edge_margin_px: float | None = None,
    invert_contrast: bool = False,
    micrograph_name: str = "micrograph_001.mrc",
    seed: int = 0,
    pad_factor: float = 2.0,
    ctf_box_px: int | None = None,
    batch_size: int = 32,
) -> Micrograph:
    """Simulate one micrograph with known particle positions, poses and defoci.

    Args:
        volume: (D, D, D) template, on any device (the micrograph is computed there).
        pixel_size_angstrom: Å per pixel of volume and micrograph.
        micrograph_shape: (H, W) pixels.
        n_particles: number of particles at random positions; or give `positions_px`.
        positions_px: (n, 2) particle centres (x, y) in pixels.
        orientations_degrees: (n, 3) (rot, tilt, psi); uniform on SO(3) if None.
        defocus_u_angstrom, defocus_v_angstrom, defocus_angle_degrees: the
            micrograph's CTF (V = U if None).
        defocus_offsets_angstrom: (n,) per-particle defocus offsets (height in the
            ice; positive = more underfocus), added to U and V.
        ice_thickness_angstrom: if no offsets are given, they are drawn uniformly in
            ±thickness / 2 (0: every particle at the micrograph's defocus).
        optics: voltage, Cs, amplitude contrast.
        snr: particle SNR (module docstring); ignored if `noise_std` is given;
            None and no noise_std: no noise.
        noise_std: standard deviation of the noise, in the units of the volume's
            projections (a dose-like absolute level).
        noise_spectrum: relative radial power of the noise (cycles/pixel); white if None.
        min_distance_px: least distance between particle centres; default D.
        edge_margin_px: least distance of a centre from the edges; default D // 2 + 1.
        invert_contrast: multiply the micrograph by -1 (dark particles).
        micrograph_name: rlnMicrographName of the particles and the CTF row.
        seed: seeds every random choice.
        pad_factor: padding for the projections.
        ctf_box_px: edge of the box in which each particle's CTF is applied; default
            `ctf_box_size` (holds the CTF's delocalisation up to Nyquist).
        batch_size: particles rendered at once (memory).

    Returns:
        Micrograph with image, noiseless image, particle table and CTF row.
    """
    optics = optics or Optics()
    device = volume.device
    box = volume.shape[-1]
    height, width = micrograph_shape
    generator = seeded_generator(seed)
    margin = float(box // 2 + 1) if edge_margin_px is None else float(edge_margin_px)
    if margin < box // 2 + 1:
        raise CryorefineError(
            f"edge margin {margin:g} px is smaller than half the particle box ({box // 2 + 1}).",
            field="edge_margin_px",
            fix="use a margin of at least box // 2 + 1 pixels.",
        )
    if positions_px is None:
        if n_particles is None:
            raise ValueError("give n_particles or positions_px")
        min_distance = float(box) if min_distance_px is None else float(min_distance_px)
        positions = random_positions(n_particles, micrograph_shape, min_distance, margin, generator)
    else:
        positions = torch.as_tensor(positions_px, dtype=torch.float64).reshape(-1, 2)
        low = positions.min(dim=0).values
        high = positions.max(dim=0).values
        if (
            bool((low < margin).any())
            or high[0] > width - 1 - margin
            or high[1] > height - 1 - margin
        ):
            raise CryorefineError(
                f"a particle position is closer than {margin:g} px to the micrograph's edge.",
                field="positions_px",
                fix="move the particles inwards or reduce the box.",
            )
    n = positions.shape[0]
    if orientations_degrees is None:
        orientations = uniform_orientations(n, generator)
    else:
        orientations = torch.as_tensor(orientations_degrees, dtype=torch.float64).reshape(n, 3)
    if defocus_offsets_angstrom is None:
        u = torch.rand((n,), generator=generator, dtype=torch.float64)
        offsets = ice_thickness_angstrom * (u - 0.5)
    else:
        offsets = torch.as_tensor(defocus_offsets_angstrom, dtype=torch.float64).reshape(n)
    defocus_v_angstrom = defocus_u_angstrom if defocus_v_angstrom is None else defocus_v_angstrom
    defocus_u = defocus_u_angstrom + offsets
    defocus_v = defocus_v_angstrom + offsets

    # Each particle is shifted by the sub-pixel part of its position and modulated by
    # its CTF in a box wide enough for the CTF's delocalisation, then added to the
    # micrograph at the integer part of its position.
    prepared = prepare_for_projection(volume, pad_factor=pad_factor)
    rotations = euler_to_matrix(orientations[:, 0], orientations[:, 1], orientations[:, 2])
    spectra = extract_slices(prepared, rotations.to(device=device, dtype=volume.dtype))
    projections = centred_irfftn(spectra, (box, box))
    if ctf_box_px is None:
        deepest = float(torch.maximum(defocus_u, defocus_v).abs().max())
        size = ctf_box_size(box, pixel_size_angstrom, deepest, optics.voltage_kv)
    else:
        size = int(ctf_box_px)
    integer = torch.floor(positions)
    fraction = (positions - integer).to(device=device, dtype=volume.dtype)
    corners = (integer - size // 2).long().tolist()
    start = size // 2 - box // 2
    noiseless = torch.zeros((height, width), dtype=volume.dtype, device=device)
    for first in range(0, n, batch_size):
        part = slice(first, first + batch_size)
        padded = projections.new_zeros((projections[part].shape[0], size, size))
        padded[:, start : start + box, start : start + box] = projections[part]
        ctf = ctf_2d(
            (size, size),
            pixel_size_angstrom,
            defocus_u[part].to(device),
            defocus_v[part].to(device),
            defocus_angle_degrees,
            optics.voltage_kv,
            optics.spherical_aberration_mm,
            optics.amplitude_contrast,
        ).to(volume.dtype)
        spectrum = phase_shift(centred_rfftn(padded, ndim=2) * ctf, fraction[part], (size, size))
        images = centred_irfftn(spectrum, (size, size))
        for offset, image in enumerate(images):
            corner = corners[first + offset]
            _add_clipped(noiseless, image, (corner[0], corner[1]))
    if invert_contrast:
        noiseless = -noiseless

    # The particle SNR's signal: each particle's CTF-modulated projection in its box.
    if noise_std is None and snr is not None:
        box_ctf = ctf_2d(
            (box, box),
            pixel_size_angstrom,
            defocus_u.to(device),
            defocus_v.to(device),
            defocus_angle_degrees,
            optics.voltage_kv,
            optics.spherical_aberration_mm,
            optics.amplitude_contrast,
        ).to(volume.dtype)
        isolated = centred_irfftn(spectra * box_ctf, (box, box))
        noise_std = (float(isolated.var(dim=(-2, -1)).mean()) / snr) ** 0.5
    image = noiseless
    if noise_std is not None:
        if noise_spectrum is None:
            noise = white_noise((height, width), noise_std, generator, device=device)
        else:
            noise = coloured_noise(
                (height, width), noise_std, noise_spectrum, generator, device=device
            )
        image = noiseless + noise.to(noiseless.dtype)

    optics_values = optics_columns(optics, pixel_size_angstrom, box_size=None)
    optics_values["rlnMicrographPixelSize"] = pixel_size_angstrom
    particles = pd.DataFrame(
        {
            "rlnMicrographName": micrograph_name,
            "rlnCoordinateX": positions[:, 0].numpy(),
            "rlnCoordinateY": positions[:, 1].numpy(),
            "rlnAngleRot": orientations[:, 0].numpy(),
            "rlnAngleTilt": orientations[:, 1].numpy(),
            "rlnAnglePsi": orientations[:, 2].numpy(),
            "rlnOriginXAngst": 0.0,
            "rlnOriginYAngst": 0.0,
            "rlnDefocusU": defocus_u.numpy(),
            "rlnDefocusV": defocus_v.numpy(),
            "rlnDefocusAngle": defocus_angle_degrees,
            "rlnPhaseShift": 0.0,
            "rlnCtfBfactor": 0.0,
            RELATIVE_DEFOCUS: offsets.numpy(),
            "rlnRandomSubset": np.arange(n) % 2 + 1,
        }
    )
    ctf_row = pd.DataFrame(
        {
            "rlnMicrographName": [micrograph_name],
            "rlnDefocusU": [float(defocus_u_angstrom)],
            "rlnDefocusV": [float(defocus_v_angstrom)],
            "rlnDefocusAngle": [float(defocus_angle_degrees)],
            "rlnPhaseShift": [0.0],
            "rlnCtfBfactor": [0.0],
        }
    )
    for column, value in optics_values.items():
        particles[column] = value
        ctf_row[column] = value
    return Micrograph(
        image,
        noiseless,
        particles,
        ctf_row,
        0.0 if noise_std is None else noise_std,
        pixel_size_angstrom,
    )
