"""`cryorefine demo`: simulate a micrograph with known particles, find them, refine them.

The whole 2DTM path on built-in data: the built-in structure (PDB 4JSV) becomes a
template; a micrograph with dark particles in random views (off the search grid)
is simulated; `match-template` and `refine-template` run on Leopard-EM-style YAMLs
written beside the data (so the demo doubles as an example of those configs); the
summary compares what was found with the truth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import Field
from rich.console import Console
from rich.table import Table

from cryorefine.config import Config, save_resolved_config
from cryorefine.engine.so3 import angular_distance, euler_to_matrix
from cryorefine.errors import CryorefineError
from cryorefine.io.mrc import write_mrc
from cryorefine.programs import match_template, refine_template
from cryorefine.programs.template_config import (
    MatchTemplateConfig,
    RefineTemplateConfig,
    load_template_config,
)
from cryorefine.simulate.atoms import (
    builtin_structure_path,
    potential_from_atoms,
    read_atomic_model,
)
from cryorefine.simulate.micrograph import simulate_micrograph


class DemoConfig(Config):
    """What the demo simulates and how it searches."""

    output: Path = Field(Path("demo_output"), description="Folder for data and results.")
    overwrite: bool = Field(False, description="Write into a non-empty folder.")
    seed: int = Field(1, description="Seeds the simulation.")
    micrograph_size: int = Field(512, ge=128, description="Micrograph edge (px, even).")
    n_particles: int = Field(8, ge=1, description="Particles in the micrograph.")
    snr: float = Field(0.4, gt=0, description="Particle SNR (simulate/micrograph.py).")
    pixel_size_angstrom: float = Field(2.5, gt=0, description="Å per pixel.")
    template_size: int = Field(64, ge=16, description="Template box (px, even).")
    defocus_angstrom: float = Field(15000.0, gt=0, description="Micrograph defocus (Å).")
    search_step_degrees: float = Field(15.0, gt=0, description="Global search step (°).")


@dataclass
class DemoResult:
    """The truth, what was found and refined, and the errors."""

    truth: pd.DataFrame
    found: pd.DataFrame
    refined: pd.DataFrame
    summary: pd.DataFrame
    seconds: dict[str, float]


def _check_folder(folder: Path, overwrite: bool) -> None:
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise CryorefineError(
            "the output folder is not empty.",
            path=folder,
            field="output",
            fix="choose another folder or pass --overwrite.",
        )


def leopard_match_yaml(
    pixel_size_angstrom: float,
    defocus_angstrom: float,
    step_degrees: float,
    maps_folder: str = "maps",
    overwrite: bool = False,
) -> dict[str, Any]:
    """A Leopard-EM match_template config (as a dict) for template.mrc and micrograph.mrc.

    300 kV, Cs 2.7 mm, no astigmatism; defocus planes −600, 0, +600 Å; whitening only;
    the eight maps in `maps_folder`.
    """
    maps = {
        field: f"{maps_folder}/{field.removesuffix('_path')}.mrc"
        for field in match_template.MAP_FIELDS
    }
    return {
        "template_volume_path": "template.mrc",
        "micrograph_path": "micrograph.mrc",
        "optics_group": {
            "label": "demo",
            "pixel_size": pixel_size_angstrom,
            "voltage": 300.0,
            "spherical_aberration": 2.7,
            "amplitude_contrast_ratio": 0.07,
            "phase_shift": 0.0,
            "defocus_u": defocus_angstrom,
            "defocus_v": defocus_angstrom,
            "astigmatism_angle": 0.0,
            "ctf_B_factor": 0.0,
        },
        "defocus_search_config": {
            "enabled": True,
            "defocus_min": -600.0,
            "defocus_max": 600.0,
            "defocus_step": 600.0,
        },
        "orientation_search_config": {"psi_step": step_degrees, "theta_step": step_degrees},
        "preprocessing_filters": {"whitening_filter": {"enabled": True}},
        "match_template_result": {"allow_file_overwrite": overwrite, **maps},
        "computational_config": {"gpu_ids": "cpu", "num_cpus": 1},
    }


def leopard_refine_yaml(
    table: str,
    template_size: int,
    box_size: int,
    defocus: dict[str, Any] | None = None,
    pixel_size: dict[str, Any] | None = None,
    orientation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Leopard-EM refine_template config (as a dict) for template.mrc and a particle CSV.

    `defocus`, `pixel_size` and `orientation` are the refinement sections' keys
    (enabled when given, disabled when None); whitening only.
    """

    def section(values: dict[str, Any] | None) -> dict[str, Any]:
        return {"enabled": False} if values is None else {"enabled": True, **values}

    return {
        "template_volume_path": "template.mrc",
        "particle_stack": {
            "df_path": table,
            "extracted_box_size": [box_size, box_size],
            "original_template_size": [template_size, template_size],
        },
        "defocus_refinement_config": section(defocus),
        "pixel_size_refinement_config": section(pixel_size),
        "orientation_refinement_config": section(orientation),
        "preprocessing_filters": {"whitening_filter": {"enabled": True}},
        "computational_config": {"gpu_ids": "cpu", "num_cpus": 1},
    }


def _refine_yaml(config: DemoConfig) -> dict[str, Any]:
    coarse = config.search_step_degrees * 0.6
    return leopard_refine_yaml(
        "particles.csv",
        config.template_size,
        config.template_size + config.template_size // 2,
        defocus={"defocus_min": -600.0, "defocus_max": 600.0, "defocus_step": 100.0},
        orientation={
            "theta_step_coarse": coarse,
            "theta_step_fine": 1.5,
            "psi_step_coarse": coarse,
            "psi_step_fine": 1.5,
        },
    )


def _angles(table: pd.DataFrame, columns: list[str]) -> torch.Tensor:
    angles = torch.tensor(table[columns].to_numpy(dtype=float))
    return euler_to_matrix(*angles.unbind(-1))


def summarise(truth: pd.DataFrame, refined: pd.DataFrame, radius_px: float) -> pd.DataFrame:
    """Per true particle: found or not, and its position, orientation and defocus errors."""
    rows = []
    for _, particle in truth.iterrows():
        distance = np.hypot(
            refined["rlnCoordinateX"] - particle["rlnCoordinateX"],
            refined["rlnCoordinateY"] - particle["rlnCoordinateY"],
        )
        nearest = int(np.argmin(distance)) if len(refined) else -1
        found = nearest >= 0 and float(distance.iloc[nearest]) <= radius_px
        row: dict[str, Any] = {"found": found}
        if found:
            pick = refined.iloc[[nearest]]
            true = _angles(
                truth.loc[[particle.name]], ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
            )
            search = _angles(pick, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
            best = _angles(
                pick, ["crfRefinedAngleRot", "crfRefinedAngleTilt", "crfRefinedAnglePsi"]
            )
            row |= {
                "z_score": float(pick["crfZScore"].iloc[0]),
                "refined_z_score": float(pick["crfRefinedZScore"].iloc[0]),
                "position_error_px": float(
                    np.hypot(
                        pick["crfRefinedCoordinateX"].iloc[0] - particle["rlnCoordinateX"],
                        pick["crfRefinedCoordinateY"].iloc[0] - particle["rlnCoordinateY"],
                    )
                ),
                "search_angle_error_deg": float(angular_distance(true, search)[0]),
                "refined_angle_error_deg": float(angular_distance(true, best)[0]),
                "defocus_error_angstrom": float(
                    pick["crfRefinedRelativeDefocus"].iloc[0] - particle["crfRelativeDefocus"]
                ),
            }
        rows.append(row)
    return pd.DataFrame(rows)


def run(config: DemoConfig, console: Console | None = None) -> DemoResult:
    """Simulate, match, refine and summarise (see the module docstring)."""
    console = console or Console()
    folder = config.output
    _check_folder(folder, config.overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "maps").mkdir(exist_ok=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    volume = potential_from_atoms(
        read_atomic_model(builtin_structure_path()),
        config.template_size,
        config.pixel_size_angstrom,
    )
    size = config.micrograph_size
    micrograph = simulate_micrograph(
        volume,
        config.pixel_size_angstrom,
        (size, size),
        n_particles=config.n_particles,
        snr=config.snr,
        defocus_u_angstrom=config.defocus_angstrom,
        invert_contrast=True,
        min_distance_px=1.2 * config.template_size,
        seed=config.seed,
    )
    write_mrc(folder / "template.mrc", volume, config.pixel_size_angstrom, overwrite=True)
    write_mrc(
        folder / "micrograph.mrc", micrograph.image, config.pixel_size_angstrom, overwrite=True
    )
    truth = micrograph.particles
    truth.to_csv(folder / "truth.csv", index=False)
    match = leopard_match_yaml(
        config.pixel_size_angstrom,
        config.defocus_angstrom,
        config.search_step_degrees,
        overwrite=config.overwrite,
    )
    for name, values in (("match.yaml", match), ("refine.yaml", _refine_yaml(config))):
        (folder / name).write_text(yaml.safe_dump(values, sort_keys=False))
    seconds["simulate"] = time.perf_counter() - started

    for stale in ("particles.csv", "particles.star", "refined.csv", "refined.star"):
        if config.overwrite:
            (folder / stale).unlink(missing_ok=True)
    match_settings = load_template_config(MatchTemplateConfig, folder / "match.yaml")
    found = match_template.run(match_settings, folder / "particles.csv", console=console)
    seconds["match-template"] = found.seconds
    if len(found.particles) == 0:
        raise CryorefineError(
            "match-template found no particle; nothing to refine.",
            path=folder / "particles.csv",
            fix="raise --snr or lower the search step.",
        )
    refine_settings = load_template_config(RefineTemplateConfig, folder / "refine.yaml")
    refined = refine_template.run(refine_settings, folder / "refined.csv", console=console)
    seconds["refine-template"] = refined.seconds

    summary = summarise(truth, refined.particles, config.template_size / 4)
    summary.to_csv(folder / "summary.csv", index=False)
    save_resolved_config(config, folder / "demo.config.yaml")
    _print_summary(summary, len(found.particles), found.threshold, seconds, console)
    return DemoResult(truth, found.particles, refined.particles, summary, seconds)


def _print_summary(
    summary: pd.DataFrame,
    n_picked: int,
    threshold: float,
    seconds: dict[str, float],
    console: Console,
) -> None:
    table = Table(title="cryorefine demo: 2DTM against the truth")
    table.add_column("measure")
    table.add_column("value", justify="right")
    found = summary[summary["found"]]
    table.add_row("particles found / true", f"{len(found)} / {len(summary)}")
    table.add_row("picks (z > threshold)", f"{n_picked} (z > {threshold:.2f})")
    if len(found):
        table.add_row(
            "median z-score → refined",
            f"{found['z_score'].median():.2f} → {found['refined_z_score'].median():.2f}",
        )
        table.add_row("max position error (px)", f"{found['position_error_px'].max():.2f}")
        search = found["search_angle_error_deg"].median()
        refined = found["refined_angle_error_deg"].median()
        table.add_row("median angle error search → refined (°)", f"{search:.2f} → {refined:.2f}")
        table.add_row(
            "max |defocus error| (Å)", f"{found['defocus_error_angstrom'].abs().max():.0f}"
        )
    for step, value in seconds.items():
        table.add_row(f"time {step} (s)", f"{value:.1f}")
    console.print(table)
