"""`cryorefine refine3d`: gold-standard 3D auto-refinement, as RELION's 3D auto-refine.

The particles are split into two halves (rlnRandomSubset, or a seeded random split)
that are refined against their own references and never mixed until the final map.
Each iteration, for each half:

1. Expectation (engine.alignment). The reference, solvent-flattened by a soft sphere of
   the mask diameter (its 5-px edge outside, as RELION's; and an optional reference
   mask), is projected at the Fourier samples up to the half's current resolution plus
   a margin (RELION's "current size").
   Every particle image (soft-circle masked) is scored against every orientation ×
   offset: a global grid over the asymmetric unit while the angular step is coarse,
   then a ball of orientations around each particle's pose (local searches), with
   offsets on a lattice around its current origin. The first iteration uses
   normalised cross-correlation and the best pose (the first reference is not on the
   data's greyscale, RELION's --firstiter_cc), later ones the Gaussian likelihood with
   the noise power per shell measured from the residuals at the current poses.
2. Maximisation. The unmasked images are back-projected with marginalisation over the
   posterior (global grids: every orientation, weighted; local: each particle's 8 most
   probable orientations, renormalised), into two quarter accumulators per half. The
   quarters' FSC gives the half's own SSNR(s) = 2 FSC_q / (1 − FSC_q), and the half map
   is the Wiener reconstruction with λ(s) = mean weight(s) / SSNR(s): the
   FSC-weighted, resolution-dependent filter of the reference. So a half's reference
   never sees the other half's data.
3. The gold-standard FSC between the two halves' unregularised maps (soft-sphere
   masked) gives the resolution at 0.143. Sampling (shared by both halves, as in
   RELION): when the resolution stops improving and the median pose change is within
   the step, the angular and offset steps halve (local searches from
   `local_searches_from_degrees`). Once the next step would be finer than both the
   particles' posterior spread and an eighth of the resolution at the mask radius (and
   the resolution has stopped improving at this step), one last iteration runs at
   Nyquist and the halves are joined into map.mrc.

Outputs in the output folder: half_map_1.mrc, half_map_2.mrc, map.mrc, fsc.csv,
fsc.png, particles.star (refined angles, origins in Å, rlnRandomSubset,
rlnMaxValueProbDistribution, rlnLogLikeliContribution), summary.yaml, the resolved
config, and iterations/NNN/ for every iteration; checkpoint.pt lets `--continue` resume
after the last finished iteration with identical results.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import Field
from rich.console import Console

from cryorefine.config import Config, SymmetryName, save_resolved_config
from cryorefine.engine.alignment import (
    FourierSamples,
    fourier_samples,
    global_scores,
    local_scores,
    marginal_global_slices,
    marginal_local_slices,
    particle_terms,
    posterior,
    shift_phases,
    translation_grid,
)
from cryorefine.engine.filters import lowpass_volume
from cryorefine.engine.fourier import centred_rfftn
from cryorefine.engine.fsc import (
    fourier_shell_correlation,
    resolution_at_threshold,
    shell_frequencies,
)
from cryorefine.engine.masks import soft_circle_mask, soft_sphere_mask
from cryorefine.engine.projection import extract_samples, prepare_for_projection
from cryorefine.engine.reconstruct import (
    empty_accumulators,
    insert_samples,
    reconstruct_map,
    shell_mean_weights,
)
from cryorefine.engine.so3 import euler_to_matrix, matrix_to_euler
from cryorefine.engine.so3_grid import global_orientation_grid, local_rotation_offsets
from cryorefine.engine.symmetry import (
    symmetric_angular_distance,
    symmetry_operators,
)
from cryorefine.errors import CryorefineError
from cryorefine.io.atomic import atomic_path, atomic_write_text
from cryorefine.io.mrc import (
    check_particle_stacks,
    mrc_info,
    read_mrc,
    read_particle_images,
    write_mrc,
)
from cryorefine.io.star import read_star_particles, write_star_particles
from cryorefine.parallel.device import resolve_device
from cryorefine.programs.reconstruct import CTF_COLUMNS, particle_ctfs
from cryorefine.report.fsc_plot import plot_fsc_curves

#: Shells beyond a half's resolution that still enter the likelihood (RELION's incr_size).
SHELL_MARGIN = 6
#: Soft edge of the particle and reference masks, pixels, outside the mask diameter
#: (RELION's width_mask_edge). An edge inside it would crop an off-centre particle's
#: low-passed reference unevenly and pull the whole refinement off centre.
MASK_EDGE_PIXELS = 5.0
#: Orientations back-projected per particle in local searches.
KEPT_ORIENTATIONS = 8
#: Memory for one batch's scores (particles × offsets × orientations) and projections.
SCORE_BUDGET_BYTES = 32 * 2**20
OUTPUT_NAMES = ("particles.star", "half_map_1.mrc", "half_map_2.mrc", "map.mrc", "fsc.csv")


class Refine3DConfig(Config):
    """What `cryorefine refine3d` does. Lengths in Å unless named pixels, angles in degrees."""

    particles: Path = Field(
        description="RELION particles STAR (CTF, optics groups); image names are read "
        "relative to its folder. Input angles are not used (the first search is global); "
        "input origins are where the offset search starts."
    )
    reference: Path = Field(description="Starting map (MRC), same box and pixel size.")
    output: Path = Field(description="Output folder.")
    initial_lowpass_angstrom: float = Field(
        40.0, gt=0, description="Low-pass of the starting map (Å), as RELION's --ini_high."
    )
    absolute_greyscale: bool = Field(
        False,
        description="The reference is on the particles' greyscale: the first iteration "
        "uses the likelihood instead of cross-correlation.",
    )
    symmetry: SymmetryName = Field(
        "C1", description="Point group (RELION names: C1, C4, D2, T, O, I)."
    )
    mask_diameter_angstrom: float | None = Field(
        None,
        gt=0,
        description="Diameter of the soft spherical mask (Å), where its 5-px raised-cosine "
        "edge starts, as RELION's particle diameter; default 90 % of the box.",
    )
    reference_mask: Path | None = Field(
        None, description="Optional mask (MRC, values in [0, 1]) applied to the references."
    )
    initial_angular_step_degrees: float = Field(
        7.5, gt=0, le=30, description="First (global) angular sampling, as RELION's healpix."
    )
    local_searches_from_degrees: float = Field(
        3.75,
        gt=0,
        description="Angular steps at or below this search locally around each pose "
        "(RELION's --auto_local_healpix_order 4 is 3.75).",
    )
    offset_range_pixels: float = Field(5.0, ge=0, description="First offset search range (px).")
    offset_step_pixels: float = Field(1.0, gt=0, description="First offset step (px).")
    max_iterations: int = Field(25, ge=1, description="Iterations at most, the final one included.")
    pad_factor: float = Field(2.0, ge=1, description="Fourier padding of projection/insertion.")
    seed: int = Field(
        0, description="Seed of the random half split (when rlnRandomSubset is absent)."
    )
    threads: int | None = Field(None, ge=1, description="CPU threads (default: all cores).")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto.")
    overwrite: bool = Field(False, description="Replace the outputs of an earlier run.")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    """Checked inputs: the table, geometry and the starting map."""

    table: pd.DataFrame
    star_folder: Path
    box_size: int
    pixel_size_angstrom: float
    reference: torch.Tensor
    reference_mask: torch.Tensor | None
    halves: np.ndarray  # (n,) 1 or 2


def _fail(problem: str, path: Path | None, fix: str, field_name: str | None = None) -> None:
    raise CryorefineError(problem, path=path, field=field_name, fix=fix)


def read_inputs(config: Refine3DConfig) -> Inputs:
    """Every check that needs the files, before any compute."""
    star = config.particles
    table = read_star_particles(star, require=["rlnImageName", "rlnImagePixelSize", *CTF_COLUMNS])
    pixel_sizes = np.unique(table["rlnImagePixelSize"].to_numpy(dtype=np.float64))
    if not np.allclose(pixel_sizes, pixel_sizes[0], rtol=1e-4):
        _fail(
            "optics groups have different pixel sizes "
            f"({', '.join(f'{p:g}' for p in pixel_sizes)} Å).",
            star,
            "rescale the particles to one pixel size first (e.g. relion_preprocess --rescale).",
            "rlnImagePixelSize",
        )
    pixel_size = float(pixel_sizes[0])
    box_size = check_particle_stacks(table["rlnImageName"].tolist(), star.parent, star)
    if box_size % 2:
        _fail(f"the particle box is {box_size} px, odd.", star, "re-extract with an even box.")
    info = mrc_info(config.reference)
    if info.shape != (box_size,) * 3:
        _fail(
            f"the reference is {info.shape}, the particles are {box_size} px boxes.",
            config.reference,
            f"make a {box_size}³ reference: cryorefine rebox --box {box_size} "
            f"--pixel-size {pixel_size:g}.",
        )
    if info.voxel_size_angstrom > 0 and not math.isclose(
        info.voxel_size_angstrom, pixel_size, rel_tol=1e-3
    ):
        _fail(
            f"the reference's voxel size is {info.voxel_size_angstrom:g} Å, the particles' "
            f"rlnImagePixelSize {pixel_size:g} Å.",
            config.reference,
            f"rescale it: cryorefine rebox --pixel-size {pixel_size:g} --box {box_size}.",
        )
    mask = None
    if config.reference_mask is not None:
        mask_info = mrc_info(config.reference_mask)
        if mask_info.shape != (box_size,) * 3:
            _fail(
                f"the mask is {mask_info.shape}, the reference {box_size}³.",
                config.reference_mask,
                "give a mask of the reference's box (cryorefine rebox / cryorefine mask).",
            )
        mask_array, _ = read_mrc(config.reference_mask)
        if mask_array.min() < -1e-3 or mask_array.max() > 1 + 1e-3:
            _fail(
                f"mask values span [{mask_array.min():.3g}, {mask_array.max():.3g}].",
                config.reference_mask,
                "give a mask with values in [0, 1] (cryorefine mask).",
            )
        mask = torch.from_numpy(mask_array)
    diameter = config.mask_diameter_angstrom
    if diameter is not None and diameter > box_size * pixel_size:
        _fail(
            f"the mask diameter {diameter:g} Å exceeds the box ({box_size * pixel_size:g} Å).",
            None,
            "give a diameter smaller than the box.",
            "mask_diameter_angstrom",
        )
    reference, _ = read_mrc(config.reference)
    return Inputs(
        table,
        star.parent,
        box_size,
        pixel_size,
        torch.from_numpy(reference),
        mask,
        _halves(table, config.seed, star),
    )


def _halves(table: pd.DataFrame, seed: int, star: Path) -> np.ndarray:
    if "rlnRandomSubset" in table.columns:
        halves = table["rlnRandomSubset"].to_numpy().astype(int)
        if not set(np.unique(halves)) <= {1, 2} or len(np.unique(halves)) < 2:
            _fail(
                f"rlnRandomSubset holds {sorted(set(halves.tolist()))[:5]}, not both 1 and 2.",
                star,
                "remove the column for a random split, or set 1 and 2.",
                "rlnRandomSubset",
            )
        return halves
    order = np.random.default_rng(seed).permutation(len(table))
    halves = np.ones(len(table), dtype=int)
    halves[order[len(table) // 2 :]] = 2
    return halves


# --------------------------------------------------------------------------- particles


@dataclass(frozen=True)
class ParticleData:
    """Image transforms and CTFs of a batch of particles on the (D, D//2+1) grid, flattened.

    masked: soft-circle-masked images (for alignment); unmasked: for back-projection;
    ctf: real. All (n, D·(D//2+1)), float32/complex64, on the compute device.
    """

    masked: torch.Tensor
    unmasked: torch.Tensor
    ctf: torch.Tensor


@dataclass(frozen=True)
class ParticleSource:
    """Reads particles batch by batch from their memory-mapped stacks.

    Nothing is kept between batches, so memory does not grow with the number of
    particles; the page cache makes later iterations' re-reads cheap.
    """

    inputs: Inputs
    circle: torch.Tensor  # (D, D) soft circle that the alignment images are masked with

    def load(self, indices: torch.Tensor) -> ParticleData:
        """The particles at `indices` (rows of the particles table)."""
        rows = self.inputs.table.iloc[indices.cpu().numpy()]
        pixels = read_particle_images(
            rows["rlnImageName"].astype(str).tolist(), self.inputs.star_folder
        )
        images = torch.from_numpy(pixels).to(self.circle.device)
        # Normalised particles have a zero-mean background; keep the masked ones so too.
        background = images.mean(dim=(-2, -1), keepdim=True)
        n = len(rows)
        masked = centred_rfftn((images - background) * self.circle, ndim=2).reshape(n, -1)
        unmasked = centred_rfftn(images, ndim=2).reshape(n, -1)
        box, pixel = self.inputs.box_size, self.inputs.pixel_size_angstrom
        ctf = particle_ctfs(rows, box, pixel, self.circle.device).float().reshape(n, -1)
        return ParticleData(masked, unmasked, ctf)


# --------------------------------------------------------------------------- state


@dataclass
class RefinementState:
    """Everything an iteration needs from the ones before (saved in checkpoint.pt)."""

    iteration: int
    angular_step: float
    offset_range: float
    offset_step: float
    rotations: torch.Tensor  # (n, 3, 3) float64
    origins: torch.Tensor  # (n, 2) pixels, float64 (rlnOriginX/YAngst / pixel size)
    references: list[torch.Tensor]  # two (D, D, D) float32 half maps
    max_shells: list[int]
    best_resolution: float = math.inf
    final: bool = False
    done: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- E and M steps


@dataclass
class HalfResult:
    """One half's alignment results and back-projection accumulators."""

    rotations: torch.Tensor
    origins: torch.Tensor
    max_probability: torch.Tensor
    log_evidence: torch.Tensor
    spread: torch.Tensor  # (n_h,) posterior angular spread, degrees
    accumulators: list[tuple[torch.Tensor, torch.Tensor]]  # two quarters (data, weight)


def _noise_power(
    prepared: Any,
    particles: ParticleSource,
    members: torch.Tensor,
    rotations: torch.Tensor,
    origins: torch.Tensor,
    samples: FourierSamples,
    box: int,
) -> torch.Tensor:
    """σ² per sample: mean |X_centred − CTF P|² in each shell at the current poses."""
    n_shells = box // 2 + 1
    totals = torch.zeros(n_shells, dtype=torch.float64, device=members.device)
    counts = torch.zeros(n_shells, dtype=torch.float64, device=members.device)
    for chunk in members.split(1024):
        loaded = particles.load(chunk)
        projections = extract_samples(prepared, rotations[chunk].float(), samples.frequencies)
        phases = shift_phases(samples.frequencies, origins[chunk].float())
        images = loaded.masked[:, samples.index] * phases
        residual = images - loaded.ctf[:, samples.index] * projections
        power = (residual.real.square() + residual.imag.square()) * samples.multiplicity
        totals.index_add_(0, samples.shells, power.sum(0).double())
        counts.index_add_(0, samples.shells, samples.multiplicity.double() * len(chunk))
    per_shell = (totals / counts.clamp_min(1e-12)).float()
    return per_shell[samples.shells]


def _spread(best: torch.Tensor, candidates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """√(Σ w · angle(best, candidate)²) in degrees; best (n,3,3), candidates (n|1, M, 3, 3).

    Args:
        weights: (n, M) posterior probability of each candidate.
    """
    best = best.double().reshape(len(best), 9)
    candidates = candidates.double().reshape(*candidates.shape[:2], 9)
    if candidates.shape[0] == 1:  # one grid for all: a plain product, nothing expanded
        trace = best @ candidates[0].T
    else:
        trace = torch.einsum("nk,nmk->nm", best, candidates)
    angles = torch.rad2deg(torch.acos(((trace - 1) / 2).clamp(-1, 1)))
    return torch.sqrt((weights.double() * angles.square()).sum(-1))


def align_half(
    reference: torch.Tensor,
    particles: ParticleSource,
    members: torch.Tensor,
    state: RefinementState,
    half_index: int,
    config: Refine3DConfig,
    inputs: Inputs,
    solvent_mask: torch.Tensor,
    operators: torch.Tensor,
    cross_correlation: bool,
) -> HalfResult:
    """E-step and back-projection of one half's particles against its reference."""
    device = reference.device
    box = inputs.box_size
    masked_reference = reference * solvent_mask
    if inputs.reference_mask is not None:
        masked_reference = masked_reference * inputs.reference_mask.to(device)
    prepared = prepare_for_projection(masked_reference, config.pad_factor)
    samples = fourier_samples(box, state.max_shells[half_index], device=device)
    noise = (
        torch.ones(1, device=device)
        if cross_correlation
        else _noise_power(
            prepared, particles, members, state.rotations, state.origins, samples, box
        )
    )
    offsets = translation_grid(state.offset_range, state.offset_step, device=device)
    is_local = state.angular_step <= config.local_searches_from_degrees + 1e-9
    if is_local:
        grid = local_rotation_offsets(2.0 * state.angular_step, state.angular_step, device=device)
        grid = grid.float()
    else:
        angles = global_orientation_grid(state.angular_step, config.symmetry, device=device)
        grid = euler_to_matrix(*angles.T).float()
        projections = extract_samples(prepared, grid, samples.frequencies)
    n_orientations = grid.shape[0]
    # Per particle: its scores (float32, a few copies) and, in local searches, its own
    # projections (complex64).
    per_particle = n_orientations * (
        12 * offsets.shape[0] + (8 * samples.frequencies.shape[0] if is_local else 0)
    )
    batch = max(1, SCORE_BUDGET_BYTES // per_particle)

    accumulators = [
        empty_accumulators(box, config.pad_factor, device=device, dtype=torch.float64)
        for _ in range(2)
    ]
    n_members = len(members)
    best_rotations = torch.empty(n_members, 3, 3, dtype=torch.float64, device=device)
    best_origins = torch.empty(n_members, 2, dtype=torch.float64, device=device)
    max_probability = torch.empty(n_members, dtype=torch.float64, device=device)
    log_evidence = torch.empty_like(max_probability)
    spread = torch.empty_like(max_probability)
    frequencies = samples.frequencies
    for quarter in range(2):
        positions = torch.arange(quarter, n_members, 2, device=device)
        data_sum = weight_sum = None
        for start in range(0, len(positions), batch):
            where = positions[start : start + batch]
            chunk = members[where]
            centres = state.origins[chunk].float()
            candidate_origins = centres[:, None, :] + offsets[None]
            phases = shift_phases(frequencies, candidate_origins)
            loaded = particles.load(chunk)
            images = loaded.masked[:, samples.index]
            ctf = loaded.ctf[:, samples.index]
            terms = particle_terms(images, ctf, noise, samples, phases)
            if is_local:
                views = state.rotations[chunk].float()[:, None] @ grid
                scores = local_scores(terms, extract_samples(prepared, views, frequencies))
            else:
                scores = global_scores(terms, projections)
            values = (
                scores.cross_correlations(terms) if cross_correlation else scores.log_likelihoods()
            )
            result = posterior(values, hard=cross_correlation)
            unmasked = loaded.unmasked[:, samples.index]
            rows = torch.arange(len(chunk), device=device)
            candidates = views if is_local else grid[None]
            best = candidates[rows if is_local else 0, result.best_orientation]
            spread[where] = _spread(best, candidates, result.weights.sum(1))
            if is_local:
                which, slice_data, slice_weights = marginal_local_slices(
                    result.weights, unmasked, ctf, phases, KEPT_ORIENTATIONS
                )
                inserted = views[rows[:, None], which].reshape(-1, 3, 3)
                _insert(
                    accumulators[quarter],
                    slice_data.reshape(-1, slice_data.shape[-1]),
                    slice_weights.reshape(-1, slice_weights.shape[-1]),
                    inserted,
                    frequencies,
                    operators,
                )
            else:
                batch_data, batch_weights = marginal_global_slices(
                    result.weights, unmasked, ctf, phases
                )
                data_sum = batch_data if data_sum is None else data_sum + batch_data
                weight_sum = batch_weights if weight_sum is None else weight_sum + batch_weights
            best_rotations[where] = best.double()
            best_origins[where] = candidate_origins[rows, result.best_offset].double()
            max_probability[where] = result.max_probability.double()
            log_evidence[where] = result.log_evidence.double()
        if data_sum is not None and weight_sum is not None:
            used = weight_sum.sum(-1) > 0
            _insert(
                accumulators[quarter],
                data_sum[used],
                weight_sum[used],
                grid[used],
                frequencies,
                operators,
            )
    return HalfResult(
        best_rotations, best_origins, max_probability, log_evidence, spread, accumulators
    )


def _insert(
    accumulator: tuple[torch.Tensor, torch.Tensor],
    values: torch.Tensor,
    weights: torch.Tensor,
    rotations: torch.Tensor,
    frequencies: torch.Tensor,
    operators: torch.Tensor,
) -> None:
    """Insert samples in every symmetry-equivalent view A · R."""
    views = (rotations.double()[:, None] @ operators[None]).reshape(-1, 3, 3)
    count = operators.shape[0]
    insert_samples(
        accumulator[0],
        accumulator[1],
        values.repeat_interleave(count, dim=0),
        views,
        frequencies,
        weights.repeat_interleave(count, dim=0),
    )


def _sum(
    accumulators: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        sum((a[0] for a in accumulators[1:]), accumulators[0][0].clone()),
        sum((a[1] for a in accumulators[1:]), accumulators[0][1].clone()),
    )


def _masked_fsc(map_a: torch.Tensor, map_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return fourier_shell_correlation(map_a * mask, map_b * mask)


def _ssnr_from_fsc(fsc: torch.Tensor, factor: float) -> torch.Tensor:
    """SSNR of a map from the FSC of two maps with 1/factor of its data each."""
    clamped = fsc.clamp(1e-4, 0.9999)
    return factor * clamped / (1 - clamped)


def _wiener_map(
    accumulator: tuple[torch.Tensor, torch.Tensor], ssnr: torch.Tensor, box: int
) -> torch.Tensor:
    regularisation = shell_mean_weights(accumulator[1], box) / ssnr
    return reconstruct_map(accumulator[0], accumulator[1], box, regularisation)


def _resolution_shell(fsc: torch.Tensor, threshold: float = 0.143) -> int:
    """Last shell (≥ 1) before the FSC first falls below threshold."""
    below = torch.nonzero(fsc[1:] < threshold)
    return int(below[0]) if len(below) else fsc.shape[0] - 1


# --------------------------------------------------------------------------- outputs


def _particles_table(
    inputs: Inputs, state: RefinementState, scores: dict[str, np.ndarray]
) -> pd.DataFrame:
    table = inputs.table.copy()
    rot, tilt, psi = matrix_to_euler(state.rotations.cpu())
    table["rlnAngleRot"] = rot.numpy()
    table["rlnAngleTilt"] = tilt.numpy()
    table["rlnAnglePsi"] = psi.numpy()
    origins = state.origins.cpu().numpy() * inputs.pixel_size_angstrom
    table["rlnOriginXAngst"] = origins[:, 0]
    table["rlnOriginYAngst"] = origins[:, 1]
    table["rlnRandomSubset"] = inputs.halves
    for column, values in scores.items():
        table[column] = values
    return table


def _fsc_table(fsc: torch.Tensor, box: int, pixel_size: float) -> pd.DataFrame:
    frequency = shell_frequencies(box, dtype=torch.float64).numpy() / pixel_size
    with np.errstate(divide="ignore"):
        resolution = np.where(frequency > 0, 1.0 / np.maximum(frequency, 1e-12), np.inf)
    return pd.DataFrame(
        {
            "shell": np.arange(len(frequency)),
            "frequency_per_angstrom": frequency,
            "resolution_angstrom": resolution,
            "fsc": fsc.double().cpu().numpy(),
        }
    )


def _write_csv(path: Path, table: pd.DataFrame) -> None:
    atomic_write_text(path, table.to_csv(index=False, float_format="%.6g"), overwrite=True)


def _write_iteration(
    folder: Path,
    inputs: Inputs,
    state: RefinementState,
    half_maps: list[torch.Tensor],
    fsc: torch.Tensor,
    scores: dict[str, np.ndarray],
    summary: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Half maps, particles.star, fsc.csv and summary.yaml (default: the last record)."""
    folder.mkdir(parents=True, exist_ok=True)
    pixel = inputs.pixel_size_angstrom
    for index, half_map in enumerate(half_maps, start=1):
        write_mrc(folder / f"half_map_{index}.mrc", half_map.float().cpu(), pixel, overwrite=True)
    write_star_particles(
        folder / "particles.star", _particles_table(inputs, state, scores), overwrite=True
    )
    table = _fsc_table(fsc, inputs.box_size, pixel)
    _write_csv(folder / "fsc.csv", table)
    text = yaml.safe_dump(state.history[-1] if summary is None else summary, sort_keys=False)
    atomic_write_text(folder / "summary.yaml", text, overwrite=True)
    return table


# --------------------------------------------------------------------------- schedule


def _next_sampling(
    state: RefinementState, record: dict[str, Any], config: Refine3DConfig, mask_radius: float
) -> None:
    """RELION-style auto-sampling: finer steps when resolution and poses stop improving."""
    resolution = record["resolution_angstrom"]
    gained = resolution < 0.99 * state.best_resolution
    state.best_resolution = min(state.best_resolution, resolution)
    settled = record["median_angular_change_degrees"] <= 1.05 * state.angular_step
    same_sampling = sum(1 for h in state.history if h["angular_step_degrees"] == state.angular_step)
    improving = gained and same_sampling < 3
    if improving and not settled:
        return
    next_step = state.angular_step / 2
    # An angle that moves the mask's edge by an eighth of the resolution is the finest
    # worth searching (the posterior needs about two samples across a resolvable
    # change); the posterior spread says how well the data pin the pose down.
    resolvable = math.degrees(resolution / (8 * mask_radius))
    if next_step < max(resolvable, record["median_posterior_spread_degrees"]):
        # The spread was measured against the previous, blurrier reference: while the
        # resolution still improves, look again at this step before stopping.
        state.final = not improving
        return
    state.angular_step = next_step
    state.offset_step = max(state.offset_step / 2, 0.25)
    state.offset_range = 2.0 * state.offset_step


# --------------------------------------------------------------------------- run


@dataclass(frozen=True)
class Refine3DResult:
    """What `run` wrote."""

    output: Path
    resolution_angstrom: float
    iterations: int
    n_particles: int


def _check_output(config: Refine3DConfig, resume: bool) -> None:
    checkpoint = config.output / "checkpoint.pt"
    if resume:
        if not checkpoint.is_file():
            _fail(
                "nothing to continue: no checkpoint.pt.",
                config.output,
                "run without --continue to start.",
            )
        return
    existing = [
        name for name in (*OUTPUT_NAMES, "checkpoint.pt") if (config.output / name).exists()
    ]
    if existing and not config.overwrite:
        _fail(
            f"holds the results of an earlier run ({', '.join(existing)}).",
            config.output,
            "choose another --output, add --continue to resume, or --overwrite.",
        )


def run(
    config: Refine3DConfig, resume: bool = False, console: Console | None = None
) -> Refine3DResult:
    """Refine the particles' poses and the map (see the module docstring)."""
    console = console or Console()
    _check_output(config, resume)
    device = resolve_device(config.device)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    inputs = read_inputs(config)
    box, pixel = inputs.box_size, inputs.pixel_size_angstrom
    diameter = config.mask_diameter_angstrom or 0.9 * box * pixel
    mask_radius_pixels = diameter / 2 / pixel
    n = len(inputs.table)
    console.print(
        f"[bold]cryorefine refine3d[/]: {n} particles ({int((inputs.halves == 1).sum())} + "
        f"{int((inputs.halves == 2).sum())} in the halves), box {box} px at {pixel:g} Å/px, "
        f"symmetry {config.symmetry}, mask {diameter:g} Å, start "
        f"{config.initial_angular_step_degrees:g}° global -> {config.output}",
        highlight=False,
    )
    config.output.mkdir(parents=True, exist_ok=True)
    save_resolved_config(config, config.output / "refine3d.config.yaml")
    circle = soft_circle_mask(box, mask_radius_pixels, MASK_EDGE_PIXELS, device=device)
    particles = ParticleSource(inputs, circle)
    solvent_mask = soft_sphere_mask(box, mask_radius_pixels, MASK_EDGE_PIXELS, device=device)
    operators = symmetry_operators(config.symmetry, dtype=torch.float64, device=device)
    members = [torch.from_numpy(np.nonzero(inputs.halves == h)[0]).to(device) for h in (1, 2)]
    state = _start_state(config, inputs, device) if not resume else _load_state(config, device)

    while not state.done:
        state.iteration += 1
        first_cc = state.iteration == 1 and not config.absolute_greyscale
        if state.final:
            state.max_shells = [box // 2, box // 2]
        results = [
            align_half(
                state.references[h].to(device),
                particles,
                members[h],
                state,
                h,
                config,
                inputs,
                solvent_mask,
                operators,
                first_cc,
            )
            for h in (0, 1)
        ]
        previous = state.rotations.clone()
        for h, result in enumerate(results):
            state.rotations[members[h]] = result.rotations
            state.origins[members[h]] = result.origins
        changes = symmetric_angular_distance(state.rotations, previous, operators)

        half_maps, half_unregularised = [], []
        for h, result in enumerate(results):
            quarter_maps = [reconstruct_map(a[0], a[1], box) for a in result.accumulators]
            half_ssnr = _ssnr_from_fsc(
                _masked_fsc(quarter_maps[0], quarter_maps[1], solvent_mask), factor=2.0
            )
            joined = _sum(result.accumulators)
            half_maps.append(_wiener_map(joined, half_ssnr, box).float())
            half_unregularised.append(reconstruct_map(joined[0], joined[1], box))
            own_fsc = half_ssnr / (1 + half_ssnr)
            state.max_shells[h] = min(box // 2, _resolution_shell(own_fsc) + SHELL_MARGIN)
        fsc = _masked_fsc(half_unregularised[0], half_unregularised[1], solvent_mask)
        resolution = float(
            resolution_at_threshold(fsc, shell_frequencies(box, dtype=fsc.dtype), pixel)
        )
        spread = torch.cat([r.spread for r in results])
        record = {
            "iteration": state.iteration,
            "angular_step_degrees": state.angular_step,
            "search": "local"
            if state.angular_step <= config.local_searches_from_degrees + 1e-9
            else "global",
            "offset_range_pixels": state.offset_range,
            "offset_step_pixels": state.offset_step,
            "score": "cross-correlation" if first_cc else "likelihood",
            "max_shells": list(state.max_shells),
            "resolution_angstrom": resolution,
            "median_angular_change_degrees": float(changes.median()),
            "median_posterior_spread_degrees": float(spread.median()),
        }
        state.history.append(record)
        scores = _score_columns(results, members, n)
        state.references = [m.cpu() for m in half_maps]
        folder = config.output / "iterations" / f"{state.iteration:03d}"
        _write_iteration(folder, inputs, state, half_maps, fsc, scores)
        console.print(
            f"iteration {state.iteration}: {record['search']} {state.angular_step:g}°, "
            f"offsets ±{state.offset_range:g}/{state.offset_step:g} px, resolution "
            f"{resolution:.2f} Å, median change {record['median_angular_change_degrees']:.2f}°, "
            f"posterior spread {record['median_posterior_spread_degrees']:.2f}°",
            highlight=False,
        )
        if state.final:
            full_ssnr = _ssnr_from_fsc(fsc, factor=2.0)
            joined = _sum(results[0].accumulators + results[1].accumulators)
            full_map = _wiener_map(joined, full_ssnr, box).float()
            _write_final(config, inputs, state, half_maps, full_map, fsc, scores, resolution)
            state.done = True
        else:
            _next_sampling(state, record, config, mask_radius_pixels * pixel)
            if state.iteration + 1 >= config.max_iterations:
                state.final = True
        _save_state(config, state)
    final_resolution = state.history[-1]["resolution_angstrom"]
    console.print(f"final resolution {final_resolution:.2f} Å", highlight=False)
    return Refine3DResult(config.output, final_resolution, state.iteration, n)


def _score_columns(
    results: list[HalfResult], members: list[torch.Tensor], n: int
) -> dict[str, np.ndarray]:
    probability = np.zeros(n)
    evidence = np.zeros(n)
    for h, result in enumerate(results):
        index = members[h].cpu().numpy()
        probability[index] = result.max_probability.cpu().numpy()
        evidence[index] = result.log_evidence.cpu().numpy()
    return {"rlnMaxValueProbDistribution": probability, "rlnLogLikeliContribution": evidence}


def _write_final(
    config: Refine3DConfig,
    inputs: Inputs,
    state: RefinementState,
    half_maps: list[torch.Tensor],
    full_map: torch.Tensor,
    fsc: torch.Tensor,
    scores: dict[str, np.ndarray],
    resolution: float,
) -> None:
    out, pixel = config.output, inputs.pixel_size_angstrom
    summary = {
        "final_resolution_angstrom": resolution,
        "iterations": state.iteration,
        "particles": len(inputs.table),
        "pixel_size_angstrom": pixel,
        "box_size": inputs.box_size,
        "symmetry": config.symmetry,
        "history": state.history,
    }
    table = _write_iteration(out, inputs, state, half_maps, fsc, scores, summary)
    write_mrc(out / "map.mrc", full_map.cpu(), pixel, overwrite=True)
    plot_fsc_curves(
        out / "fsc.png",
        table["frequency_per_angstrom"].to_numpy(),
        {"gold-standard FSC (soft sphere)": table["fsc"].to_numpy()},
        resolution_angstrom=resolution,
        title="refine3d: half 1 vs half 2",
        overwrite=True,
    )


def _start_state(config: Refine3DConfig, inputs: Inputs, device: torch.device) -> RefinementState:
    box, pixel = inputs.box_size, inputs.pixel_size_angstrom
    n = len(inputs.table)
    table = inputs.table
    origins = np.zeros((n, 2))
    for axis, name in enumerate(("rlnOriginXAngst", "rlnOriginYAngst")):
        if name in table.columns:
            origins[:, axis] = table[name].to_numpy(dtype=np.float64) / pixel
    start = lowpass_volume(inputs.reference.to(device), config.initial_lowpass_angstrom, pixel)
    first_shell = min(
        box // 2, math.ceil(box * pixel / config.initial_lowpass_angstrom) + SHELL_MARGIN
    )
    return RefinementState(
        iteration=0,
        angular_step=config.initial_angular_step_degrees,
        offset_range=config.offset_range_pixels,
        offset_step=config.offset_step_pixels,
        rotations=torch.eye(3, dtype=torch.float64, device=device).repeat(n, 1, 1),
        origins=torch.from_numpy(origins).to(device),
        references=[start.cpu(), start.cpu()],
        max_shells=[first_shell, first_shell],
    )


def _save_state(config: Refine3DConfig, state: RefinementState) -> None:
    with atomic_path(config.output / "checkpoint.pt", overwrite=True) as temporary:
        torch.save(state.to_dict(), temporary)


def _load_state(config: Refine3DConfig, device: torch.device) -> RefinementState:
    values = torch.load(config.output / "checkpoint.pt", map_location=device, weights_only=False)
    return RefinementState(**values)
