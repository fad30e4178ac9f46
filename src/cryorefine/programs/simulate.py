"""`cryorefine simulate`: a small synthetic dataset with known truth.

From an atomic model (the built-in PDB 4JSV mTOR-mLST8 by default) it writes, into
one output folder:

* template.mrc: the model's electrostatic potential (simulate/atoms.py);
* particles.mrcs + particles.star: a particle stack and its true poses, origins,
  CTFs and random halves (RELION 3.1);
* micrographs/micrograph_NNN.mrc + micrographs.star: micrographs and their CTFs;
* truth/micrograph_NNN_particles.star: the true particles of each micrograph
  (centres in micrograph pixels, poses, absolute defoci);
* config.yaml: the resolved configuration.

Paths inside the STAR files are relative to the output folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator
from rich.console import Console
from rich.table import Table

from cryorefine.config import Config, save_resolved_config
from cryorefine.errors import CryorefineError
from cryorefine.io.atomic import refuse_nonempty_folder
from cryorefine.io.mrc import write_mrc
from cryorefine.io.star import write_star_micrographs, write_star_particles
from cryorefine.parallel.device import resolve_device
from cryorefine.simulate.atoms import (
    builtin_structure_path,
    potential_from_atoms,
    read_atomic_model,
    total_scattering,
)
from cryorefine.simulate.micrograph import simulate_micrograph
from cryorefine.simulate.noise import PowerSpectrum, power_law_spectrum
from cryorefine.simulate.particles import Optics, simulate_particle_stack, write_particle_stack
from cryorefine.simulate.scattering import POTENTIAL_PREFACTOR_VOLT_ANGSTROM2

# Below this fraction of the model's scattering inside the box, the template is cut.
_MIN_FRACTION_INSIDE = 0.99


class SimulateConfig(Config):
    """What `cryorefine simulate` makes. Lengths in Å unless the name says px."""

    output: Path = Field(Path("simulated"), description="Output folder (created).")
    overwrite: bool = Field(False, description="Write into an existing non-empty folder.")
    seed: int = Field(0, ge=0, description="Seed of every random choice.")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto.")
    structure: Path | None = Field(
        None, description="PDB/mmCIF atomic model; the built-in 4JSV (mTOR-mLST8) if empty."
    )
    pixel_size_angstrom: float = Field(2.5, gt=0, description="Pixel size of everything, Å.")
    box_size: int = Field(64, ge=16, description="Template and particle box edge, px (even).")
    b_factor_offset_angstrom2: float = Field(
        0.0, ge=0, description="Added to every atom's B-factor (extra blur), Å²."
    )
    voltage_kv: float = Field(300.0, gt=0, description="Acceleration voltage, kV.")
    spherical_aberration_mm: float = Field(2.7, ge=0, description="Cs, mm.")
    amplitude_contrast: float = Field(0.07, ge=0, lt=1, description="Amplitude contrast Q0.")
    defocus_min_angstrom: float = Field(10000.0, gt=0, description="Least defocus U, Å.")
    defocus_max_angstrom: float = Field(25000.0, gt=0, description="Largest defocus U, Å.")
    max_astigmatism_angstrom: float = Field(
        500.0, ge=0, description="Defocus U - V drawn in [0, this], Å."
    )
    n_particles: int = Field(200, ge=0, description="Images in the particle stack (0: none).")
    particle_snr: float = Field(
        0.1, gt=0, description="Signal variance / noise variance of the particle images."
    )
    max_origin_angstrom: float = Field(
        5.0, ge=0, description="Particle origin offsets drawn within this radius, Å."
    )
    n_micrographs: int = Field(2, ge=0, description="Number of micrographs (0: none).")
    micrograph_size_px: int = Field(1024, ge=32, description="Micrograph edge, px (even).")
    particles_per_micrograph: int = Field(40, ge=1, description="Particles per micrograph.")
    micrograph_snr: float = Field(
        0.1, gt=0, description="Per-particle SNR in the micrographs (as particle_snr)."
    )
    ice_thickness_angstrom: float = Field(
        300.0, ge=0, description="Particle heights (defocus offsets) drawn in ±this/2, Å."
    )
    min_distance_px: float | None = Field(
        None, gt=0, description="Least distance between particle centres, px (default: box)."
    )
    noise: Literal["white", "power_law"] = Field(
        "white", description="Noise spectrum: white, or 1/(k + k0)^exponent."
    )
    noise_exponent: float = Field(1.0, ge=0, description="Exponent of the power-law noise.")
    invert_contrast: bool = Field(
        False, description="Dark particles in the micrographs (as raw data); stack unchanged."
    )

    @field_validator("box_size", "micrograph_size_px")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("must be even")
        return value

    @model_validator(mode="after")
    def _check(self) -> SimulateConfig:
        if self.defocus_min_angstrom > self.defocus_max_angstrom:
            raise ValueError(
                f"defocus_min_angstrom ({self.defocus_min_angstrom}) is larger than "
                f"defocus_max_angstrom ({self.defocus_max_angstrom})"
            )
        if self.n_micrographs and self.micrograph_size_px < 2 * self.box_size + 2:
            raise ValueError(
                f"micrograph_size_px ({self.micrograph_size_px}) must be at least "
                f"2 * box_size + 2 ({2 * self.box_size + 2})"
            )
        return self


@dataclass(frozen=True)
class SimulationResult:
    """Paths and counts of what `run` wrote."""

    output: Path
    template: Path
    config: Path
    particle_stack: Path | None = None
    particles_star: Path | None = None
    micrographs_star: Path | None = None
    micrographs: list[Path] = field(default_factory=list)
    truth: list[Path] = field(default_factory=list)
    n_particles: int = 0
    n_micrograph_particles: int = 0


def _noise_spectrum(config: SimulateConfig) -> PowerSpectrum | None:
    return None if config.noise == "white" else power_law_spectrum(config.noise_exponent)


def _template(config: SimulateConfig, device: torch.device) -> torch.Tensor:
    structure = config.structure or builtin_structure_path()
    model = read_atomic_model(structure)
    volume = potential_from_atoms(
        model,
        config.box_size,
        config.pixel_size_angstrom,
        b_factor_offset_angstrom2=config.b_factor_offset_angstrom2,
        device=device,
    )
    inside = float(volume.sum()) * config.pixel_size_angstrom**3
    expected = total_scattering(model) * POTENTIAL_PREFACTOR_VOLT_ANGSTROM2
    if inside < _MIN_FRACTION_INSIDE * expected:
        raise CryorefineError(
            f"only {100 * inside / expected:.1f}% of the model's scattering falls inside a "
            f"{config.box_size}-pixel box at {config.pixel_size_angstrom} Å/px.",
            path=structure,
            field="box_size",
            fix="use a larger box_size or pixel_size_angstrom.",
        )
    return volume


def run(config: SimulateConfig, console: Console | None = None) -> SimulationResult:
    """Write the synthetic dataset described by `config` (see the module docstring)."""
    console = console or Console()
    output = config.output
    refuse_nonempty_folder(output, config.overwrite)
    device = resolve_device(config.device)
    structure = config.structure or builtin_structure_path()
    console.print(
        f"[bold]cryorefine simulate[/]: template from {structure} "
        f"({config.box_size}³ px at {config.pixel_size_angstrom} Å/px); "
        f"{config.n_particles} particles (SNR {config.particle_snr:g}); "
        f"{config.n_micrographs} micrograph(s) of {config.micrograph_size_px}² px with "
        f"{config.particles_per_micrograph} particles (SNR {config.micrograph_snr:g}); "
        f"seed {config.seed}, device {device} -> {output}",
        highlight=False,
    )
    volume = _template(config, device)
    output.mkdir(parents=True, exist_ok=True)
    overwrite = config.overwrite
    pixel = config.pixel_size_angstrom
    template_path = write_mrc(output / "template.mrc", volume, pixel, overwrite=overwrite)
    optics = Optics(config.voltage_kv, config.spherical_aberration_mm, config.amplitude_contrast)
    defocus_range = (config.defocus_min_angstrom, config.defocus_max_angstrom)
    spectrum = _noise_spectrum(config)

    stack_path = star_path = None
    if config.n_particles:
        stack = simulate_particle_stack(
            volume,
            pixel,
            config.n_particles,
            snr=config.particle_snr,
            seed=config.seed,
            defocus_range_angstrom=defocus_range,
            max_astigmatism_angstrom=config.max_astigmatism_angstrom,
            max_origin_angstrom=config.max_origin_angstrom,
            optics=optics,
            noise_spectrum=spectrum,
        )
        stack_path, star_path = write_particle_stack(stack, output, overwrite=overwrite)

    micrograph_paths: list[Path] = []
    truth_paths: list[Path] = []
    ctf_rows: list[pd.DataFrame] = []
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.micrograph_size_px, config.micrograph_size_px)
    for index in range(config.n_micrographs):
        u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        micrograph_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        defocus_u = config.defocus_min_angstrom + u[0] * (
            config.defocus_max_angstrom - config.defocus_min_angstrom
        )
        name = f"micrographs/micrograph_{index + 1:03d}.mrc"
        micrograph = simulate_micrograph(
            volume,
            pixel,
            shape,
            n_particles=config.particles_per_micrograph,
            defocus_u_angstrom=defocus_u,
            defocus_v_angstrom=defocus_u - u[1] * config.max_astigmatism_angstrom,
            defocus_angle_degrees=180.0 * u[2] - 90.0,
            ice_thickness_angstrom=config.ice_thickness_angstrom,
            optics=optics,
            snr=config.micrograph_snr,
            noise_spectrum=spectrum,
            min_distance_px=config.min_distance_px,
            invert_contrast=config.invert_contrast,
            micrograph_name=name,
            seed=micrograph_seed,
        )
        micrograph_paths.append(
            write_mrc(output / name, micrograph.image, pixel, overwrite=overwrite)
        )
        truth = output / "truth" / f"micrograph_{index + 1:03d}_particles.star"
        truth_paths.append(write_star_particles(truth, micrograph.particles, overwrite=overwrite))
        ctf_rows.append(micrograph.ctf)
    micrographs_star = None
    if ctf_rows:
        micrographs_star = write_star_micrographs(
            output / "micrographs.star", pd.concat(ctf_rows, ignore_index=True), overwrite=overwrite
        )
    config_path = save_resolved_config(config, output / "config.yaml")

    result = SimulationResult(
        output=output,
        template=template_path,
        config=config_path,
        particle_stack=stack_path,
        particles_star=star_path,
        micrographs_star=micrographs_star,
        micrographs=micrograph_paths,
        truth=truth_paths,
        n_particles=config.n_particles,
        n_micrograph_particles=config.n_micrographs * config.particles_per_micrograph,
    )
    _print_summary(result, config, console)
    return result


def _print_summary(result: SimulationResult, config: SimulateConfig, console: Console) -> None:
    table = Table(title=f"wrote {result.output}", show_lines=False)
    table.add_column("file", no_wrap=True)
    table.add_column("content")
    table.add_column("size", justify="right")
    box, mic = config.box_size, config.micrograph_size_px
    rows: list[tuple[Path | None, str]] = [
        (result.template, f"template {box}³ px, {config.pixel_size_angstrom} Å/px"),
        (result.particle_stack, f"{result.n_particles} particle images {box}² px"),
        (result.particles_star, f"{result.n_particles} particles (true poses, CTF)"),
        (result.micrographs_star, f"{len(result.micrographs)} micrographs with CTF"),
    ]
    rows += [(path, f"micrograph {mic}² px") for path in result.micrographs]
    rows += [(path, f"{config.particles_per_micrograph} true particles") for path in result.truth]
    rows.append((result.config, "resolved config"))
    for path, content in rows:
        if path is not None:
            size = path.stat().st_size
            table.add_row(str(path.relative_to(result.output)), content, f"{size / 1e6:.2f} MB")
    console.print(table)
