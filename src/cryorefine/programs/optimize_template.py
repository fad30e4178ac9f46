"""`cryorefine optimize-template`: the template pixel size that maximises the particles' SNR.

For each candidate voxel size p_t the template is simulated from the atomic model
(simulator.pdb_filepath, our simulate/atoms.py) at p_t, projected onto the
micrograph grid (slice scale p_t / micrograph pixel size) at each particle's pose
and defocus, and scored against the particle's box (best over the box's positions,
the 2DTM score of engine.template_matching). The mean score over the particles is
the SNR of that p_t. Coarse offsets from simulator.pixel_spacing first, then fine
offsets around the best coarse value, as Leopard-EM's optimize_template. A wrong
voxel size scales the template against the particles, so the SNR peaks at the
size that matches the micrograph's true sampling.

The template is the potential of the atoms (their B-factors plus
simulator.additional_b_factor); simulator_config's dose weighting, DQE and MTF
(ttsim3d's) are not applied: they change the template's envelope, not its scale,
which is what the pixel size is found from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from rich.console import Console

from cryorefine.config import save_resolved_config
from cryorefine.engine.projection import prepare_for_projection
from cryorefine.engine.so3 import euler_to_matrix
from cryorefine.engine.template_matching import extract_boxes
from cryorefine.engine.template_refine import refine_in_box
from cryorefine.io.atomic import atomic_write, atomic_write_text, refuse_overwrite
from cryorefine.io.leopard import read_leopard_csv
from cryorefine.io.particles import require_columns
from cryorefine.programs.refine_template import (
    REQUIRED_COLUMNS,
    filtered_micrograph,
    micrograph_path,
    particle_ctf,
    pixel_centres,
    start_values,
)
from cryorefine.programs.template_config import OptimizeTemplateConfig
from cryorefine.simulate.atoms import AtomicModel, potential_from_atoms, read_atomic_model


@dataclass(frozen=True)
class _Particle:
    box: torch.Tensor
    rotation: torch.Tensor
    filters: torch.Tensor
    pixel_size: float


@dataclass
class OptimizeResult:
    """Every candidate's mean SNR and the best voxel size."""

    table: pd.DataFrame
    best_pixel_size: float
    csv_path: Path
    seconds: float


def _particles(config: OptimizeTemplateConfig, device: torch.device) -> list[_Particle]:
    """Each particle's box, pose and template-side filter (one defocus plane)."""
    stack = config.particle_stack
    box_size = int(stack.extracted_box_size[0])
    table = read_leopard_csv(stack.df_path, template_size=int(stack.original_template_size[0]))
    require_columns(table, REQUIRED_COLUMNS, stack.df_path, "optimising the template pixel size")
    table = start_values(table)
    sign = -1.0 if config.particle_contrast == "dark" else 1.0
    particles = []
    for name, rows in table.groupby("rlnMicrographName", sort=False).groups.items():
        group = table.loc[rows]
        path = micrograph_path(str(name), stack.df_path)
        filtered, box_filter = filtered_micrograph(
            config.preprocessing_filters, path, box_size, device
        )
        boxes = extract_boxes(filtered, pixel_centres(group), box_size)
        for box, (_, row) in zip(boxes, group.iterrows(), strict=True):
            ctf, relative = particle_ctf(row)
            pixel_size = float(row["rlnMicrographPixelSize"])
            planes = ctf.planes(
                (box_size, box_size), pixel_size, torch.tensor([relative]), device=device
            )
            angles = torch.tensor(
                [row["rlnAngleRot"], row["rlnAngleTilt"], row["rlnAnglePsi"]], dtype=torch.float64
            )
            rotation = euler_to_matrix(*angles.unbind(-1)).to(device, torch.float32)
            particles.append(_Particle(box, rotation[None], sign * box_filter * planes, pixel_size))
    return particles


def mean_snr(
    config: OptimizeTemplateConfig,
    model: AtomicModel,
    particles: list[_Particle],
    voxel_size: float,
    device: torch.device,
) -> float:
    """Mean best score over the particles of the template simulated at `voxel_size` Å."""
    simulator = config.simulator
    volume = potential_from_atoms(
        model,
        int(config.particle_stack.original_template_size[0]),
        voxel_size,
        b_factor_offset_angstrom2=simulator.additional_b_factor,
        device=device,
    )
    prepared = prepare_for_projection(volume)
    scores = [
        refine_in_box(prepared, p.box, p.rotation, [p.filters], [voxel_size / p.pixel_size]).score
        for p in particles
    ]
    return float(np.mean(scores))


def run(
    config: OptimizeTemplateConfig, output_csv: str | Path, console: Console | None = None
) -> OptimizeResult:
    """Coarse then fine search of the template voxel size; writes the table and a report."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    csv_path = Path(output_csv)
    report_path = csv_path.with_suffix(".report.yaml")
    for path in (csv_path, report_path):
        refuse_overwrite(path, False)
    device = config.computational_config.devices()[0]
    if device.type == "cpu":
        torch.set_num_threads(config.computational_config.num_cpus)  # see match_template
    particles = _particles(config, device)
    model = read_atomic_model(config.simulator.pdb_filepath)  # once, for every candidate
    rows: list[dict[str, float | str]] = []
    nominal = float(config.simulator.pixel_spacing)
    best = nominal
    for stage, search in (
        ("coarse", config.pixel_size_coarse_search),
        ("fine", config.pixel_size_fine_search),
    ):
        centre = best
        for offset in search.pixel_size_values().tolist():
            voxel = centre + float(offset)
            snr = mean_snr(config, model, particles, voxel, device)
            rows.append({"stage": stage, "pixel_size": voxel, "mean_snr": snr})
            console.print(f"{stage}: {voxel:.4f} Å → mean SNR {snr:.3f}")
        stage_rows = [r for r in rows if r["stage"] == stage]
        best = float(max(stage_rows, key=lambda r: float(r["mean_snr"]))["pixel_size"])
    table = pd.DataFrame(rows)
    atomic_write(csv_path, lambda temporary: table.to_csv(temporary, index=False))
    report = {
        "best_pixel_size_angstrom": best,
        "nominal_pixel_size_angstrom": nominal,
        "n_particles": len(particles),
        "best_mean_snr": float(table["mean_snr"].max()),
    }
    atomic_write_text(report_path, yaml.safe_dump(report, sort_keys=False))
    save_resolved_config(config, csv_path.with_suffix(".config.yaml"))
    return OptimizeResult(table, best, csv_path, time.perf_counter() - started)
