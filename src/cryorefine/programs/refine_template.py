"""`cryorefine refine-template`: local refinement of 2DTM particles.

For each particle of a table (match-template's or an earlier refine's output), a box
of `extracted_box_size` around it is searched over the particle's orientation
composed with local offsets, over relative defocus and pixel-size offsets, and over
positions where the template fits in the box (engine.template_refine). The refined
z-score normalises the refined correlation by the search's per-pixel mean and
standard deviation at the refined position (the match-template maps; the table's
values at the old position when the maps are gone):

    refined z = (refined score − mean(y, x)) / std(y, x).

The output table keeps the search values and adds refined_* columns (Leopard CSV;
crfRefined* in the STAR); refining it again starts from the refined values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console

from cryorefine.config import save_resolved_config
from cryorefine.engine.ctf import CtfParameters
from cryorefine.engine.projection import prepare_for_projection
from cryorefine.engine.so3 import euler_to_matrix, matrix_to_euler
from cryorefine.engine.template_matching import extract_boxes, normalised_filtered_image
from cryorefine.engine.template_refine import refine_in_box
from cryorefine.errors import CryorefineError
from cryorefine.io import particles as p
from cryorefine.io.atomic import refuse_overwrite
from cryorefine.io.leopard import read_leopard_csv, write_leopard_csv
from cryorefine.io.mrc import read_mrc
from cryorefine.io.particles import require_columns
from cryorefine.io.star import write_star_particles
from cryorefine.programs.match_template import check_pixel_size, read_micrograph_file
from cryorefine.programs.reconstruct import CTF_COLUMNS
from cryorefine.programs.template_config import PreprocessingFilters, RefineTemplateConfig

REQUIRED_COLUMNS = [
    "rlnMicrographName",
    "rlnCoordinateX",
    "rlnCoordinateY",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    *CTF_COLUMNS,
    "rlnMicrographPixelSize",
]


@dataclass
class RefineResult:
    """What a run produced."""

    particles: pd.DataFrame
    csv_path: Path
    star_path: Path
    n_correlations: int
    seconds: float


def start_values(table: pd.DataFrame) -> pd.DataFrame:
    """Where to start: refined values of an earlier refinement when present."""
    start = table.copy()
    pairs = {
        "rlnCoordinateX": p.REFINED_COORDINATE_X,
        "rlnCoordinateY": p.REFINED_COORDINATE_Y,
        "rlnAngleRot": p.REFINED_ANGLE_ROT,
        "rlnAngleTilt": p.REFINED_ANGLE_TILT,
        "rlnAnglePsi": p.REFINED_ANGLE_PSI,
        p.RELATIVE_DEFOCUS: p.REFINED_RELATIVE_DEFOCUS,
        "rlnMicrographPixelSize": p.REFINED_PIXEL_SIZE,
    }
    for column, refined in pairs.items():
        if refined in table.columns:
            start[column] = table[refined].where(table[refined].notna(), table[column])
    return start


def _map(
    table: pd.DataFrame,
    column: str,
    rows: pd.Index,
    image_shape: tuple[int, int],
    template_size: int,
) -> torch.Tensor | None:
    """A search map named in the table, as a full-size map indexed by particle centre.

    cryorefine's maps are already that; Leopard-EM's are "valid"-mode crops of shape
    (H − D + 1, W − D + 1) indexed by the template's top-left corner, so they are
    laid back at offset D // 2 (0 outside). Missing or other-shaped maps give None.
    """
    if column not in table.columns:
        return None
    name = table.loc[rows[0], column]
    if not isinstance(name, str) or not Path(name).exists():
        return None
    values = torch.from_numpy(read_mrc(name)[0])
    height, width = image_shape
    if values.shape == (height, width):
        return values
    if values.shape == (height - template_size + 1, width - template_size + 1):
        full = values.new_zeros(image_shape)
        start = template_size // 2
        full[start : start + values.shape[0], start : start + values.shape[1]] = values
        return full
    return None


def run(
    config: RefineTemplateConfig, output_csv: str | Path, console: Console | None = None
) -> RefineResult:
    """Refine every particle of the config's table; write the CSV, STAR and config."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    csv_path = Path(output_csv)
    star_path = csv_path.with_suffix(".star")
    stack = config.particle_stack
    box_size = int(stack.extracted_box_size[0])
    template_size = int(stack.original_template_size[0])
    table = read_leopard_csv(stack.df_path, template_size=template_size)
    require_columns(table, REQUIRED_COLUMNS, stack.df_path, "refining particles")
    for path in (csv_path, star_path):
        refuse_overwrite(path, False)

    template_path = Path(config.template_volume_path)
    volume_np, voxel_size = read_mrc(template_path)
    if volume_np.ndim != 3 or volume_np.shape[0] != template_size:
        raise CryorefineError(
            f"the template has shape {volume_np.shape}, not a {template_size}³ cube as "
            "particle_stack.original_template_size says.",
            path=template_path,
            field="particle_stack.original_template_size",
            fix="give the template the particles were found with, and its box size.",
        )
    device = config.computational_config.devices()[0]
    if device.type == "cpu":
        torch.set_num_threads(config.computational_config.num_cpus)  # see match_template
    prepared = prepare_for_projection(torch.from_numpy(volume_np).to(device))
    offsets = config.orientation_refinement_config.rotation_offsets().to(device, torch.float32)
    defocus_offsets = config.defocus_refinement_config.defocus_values().double()
    pixel_offsets = config.pixel_size_refinement_config.pixel_size_values().double()
    sign = -1.0 if config.particle_contrast == "dark" else 1.0

    start = start_values(table)
    refined = table.copy()
    n_correlations = 0
    for name, rows in start.groupby("rlnMicrographName", sort=False).groups.items():
        group = start.loc[rows]
        pixel_size = float(group["rlnMicrographPixelSize"].iloc[0])
        check_pixel_size(voxel_size, pixel_size, template_path)
        path = micrograph_path(str(name), stack.df_path)
        filtered, box_filter = filtered_micrograph(
            config.preprocessing_filters, path, box_size, device
        )
        image_shape = (filtered.shape[-2], filtered.shape[-1])
        mean_map = _map(table, "crfCorrelationMeanMapName", rows, image_shape, template_size)
        std_map = _map(table, "crfCorrelationStdMapName", rows, image_shape, template_size)
        centres = pixel_centres(group)
        boxes = extract_boxes(filtered, centres, box_size)
        for i, row_index in enumerate(rows):
            row = group.loc[row_index]
            ctf, relative = particle_ctf(row)
            defoci = relative + defocus_offsets
            pixel_sizes = [pixel_size + float(d) for d in pixel_offsets]
            filters = [
                sign * box_filter * ctf.planes((box_size, box_size), size, defoci, device=device)
                for size in pixel_sizes
            ]
            angles = torch.tensor(
                [row["rlnAngleRot"], row["rlnAngleTilt"], row["rlnAnglePsi"]], dtype=torch.float64
            )
            centre = euler_to_matrix(*angles.unbind(-1)).to(device, torch.float32)
            rotations = centre @ offsets
            best = refine_in_box(
                prepared, boxes[i], rotations, filters, [voxel_size / s for s in pixel_sizes]
            )
            n_correlations += best.n_candidates
            y = int(centres[i, 0]) + best.shift_yx[0]
            x = int(centres[i, 1]) + best.shift_yx[1]
            rot, tilt, psi = (float(a) for a in matrix_to_euler(best.rotation.double().cpu()))
            if mean_map is not None and std_map is not None:
                mean, std = float(mean_map[y, x]), float(std_map[y, x])
            else:
                mean = float(row.get(p.CORRELATION_MEAN, 0.0))
                std = float(row.get(p.CORRELATION_STD, 1.0))
            refined.loc[row_index, p.REFINED_COORDINATE_X] = float(x)
            refined.loc[row_index, p.REFINED_COORDINATE_Y] = float(y)
            refined.loc[row_index, p.REFINED_ANGLE_ROT] = rot
            refined.loc[row_index, p.REFINED_ANGLE_TILT] = tilt
            refined.loc[row_index, p.REFINED_ANGLE_PSI] = psi
            refined.loc[row_index, p.REFINED_RELATIVE_DEFOCUS] = float(defoci[best.plane])
            refined.loc[row_index, p.REFINED_PIXEL_SIZE] = pixel_sizes[best.scale_index]
            refined.loc[row_index, p.REFINED_MIP] = best.score
            refined.loc[row_index, p.REFINED_Z_SCORE] = (
                (best.score - mean) / std if std > 0 else 0.0
            )
        console.print(f"{Path(str(name)).name}: refined {len(rows)} particles")

    write_leopard_csv(
        csv_path, refined, template_size=template_size, template_path=str(template_path)
    )
    write_star_particles(star_path, refined)
    save_resolved_config(config, csv_path.with_suffix(".config.yaml"))
    return RefineResult(
        particles=refined,
        csv_path=csv_path,
        star_path=star_path,
        n_correlations=n_correlations,
        seconds=time.perf_counter() - started,
    )


def particle_ctf(row: pd.Series) -> tuple[CtfParameters, float]:
    """A particle's micrograph CTF (defocus without its relative defocus) and that offset (Å)."""
    relative = float(row.get(p.RELATIVE_DEFOCUS, 0.0) or 0.0)
    ctf = CtfParameters(
        defocus_u_angstrom=float(row["rlnDefocusU"]) - relative,
        defocus_v_angstrom=float(row["rlnDefocusV"]) - relative,
        astigmatism_angle_degrees=float(row["rlnDefocusAngle"]),
        voltage_kv=float(row["rlnVoltage"]),
        spherical_aberration_mm=float(row["rlnSphericalAberration"]),
        amplitude_contrast=float(row["rlnAmplitudeContrast"]),
        phase_shift_degrees=float(row.get("rlnPhaseShift", 0.0) or 0.0),
        b_factor_angstrom2=float(row.get("rlnCtfBfactor", 0.0) or 0.0),
    )
    return ctf, relative


def filtered_micrograph(
    filters: PreprocessingFilters, path: Path, box_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The filtered, normalised micrograph (H, W) and the image filter on a box's grid."""
    micrograph = read_micrograph_file(path).to(device)
    shape = (micrograph.shape[-2], micrograph.shape[-1])
    filtered = normalised_filtered_image(micrograph, filters.combined_filter(micrograph, shape))
    box_filter = filters.combined_filter(micrograph, (box_size, box_size))
    return filtered, box_filter.to(device=device, dtype=torch.float32)


def pixel_centres(table: pd.DataFrame) -> torch.Tensor:
    """int64 (n, 2) pixel (y, x) nearest to each particle's centre."""
    centres = np.stack([table["rlnCoordinateY"], table["rlnCoordinateX"]], axis=1).round()
    return torch.tensor(centres, dtype=torch.int64)


def micrograph_path(name: str, table_path: Path | str) -> Path:
    """A micrograph named in a table: as given, else relative to the table's folder."""
    path = Path(name)
    return path if path.is_absolute() or path.exists() else Path(table_path).parent / path
