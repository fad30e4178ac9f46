"""`cryorefine reconstruct`: a 3D map from particle images with known poses (Fourier insertion).

What `relion_reconstruct --ctf` does: every particle image is transformed, re-centred
by its origin offset (rlnOriginX/YAngst), multiplied by its CTF and inserted as a
central slice with weight CTF² (engine.reconstruct), once for every symmetry operator;
the map is the weighted average data / (weight + λ), back in real space with the
gridding correction. Without CTF correction (--no-ctf) slices are the images and the
weights 1.

Every input is checked before any compute: the STAR columns, each particle stack
(exists, is complete, boxes square and equal) and the output (not overwritten unless
asked). Image names in the STAR file are read relative to the STAR file's folder; the
pixel size is the STAR's rlnImagePixelSize (stack headers are not trusted:
relion_preprocess writes 1.0 there).

The accumulators are float64, so the result does not depend on the batch size beyond
float64 rounding, and the same input gives the same map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cryorefine.config import Config, SymmetryName, save_resolved_config
from cryorefine.engine.ctf import ctf_2d
from cryorefine.engine.fourier import centred_rfftn, phase_shift
from cryorefine.engine.projection import padded_box_size, shift_for_origin
from cryorefine.engine.reconstruct import empty_accumulators, insert_slices, reconstruct_map
from cryorefine.engine.so3 import euler_to_matrix
from cryorefine.engine.symmetry import (
    symmetry_operators,
)
from cryorefine.errors import CryorefineError
from cryorefine.io.atomic import refuse_overwrite
from cryorefine.io.mrc import check_particle_stacks, read_particle_images, write_mrc
from cryorefine.io.particles import require_columns
from cryorefine.io.star import read_star_particles
from cryorefine.parallel.device import resolve_device

ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
#: Columns the CTF needs (rlnPhaseShift and rlnCtfBfactor default to 0 when absent).
CTF_COLUMNS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
)
_DTYPE = torch.float64


class ReconstructConfig(Config):
    """What `cryorefine reconstruct` does. Lengths in Å, angles in degrees."""

    particles: Path = Field(
        description="RELION particles STAR file (poses, origins, CTF); image names in it "
        "are read relative to its folder."
    )
    output: Path = Field(description="Output map (MRC); the resolved config goes beside it.")
    symmetry: SymmetryName = Field(
        "C1", description="Point group of the map (RELION names: C1, D2, O, I)."
    )
    pad_factor: float = Field(
        2.0, ge=1, description="Padded Fourier box edge / image box (interpolation accuracy)."
    )
    ctf: bool = Field(
        True, description="Multiply each image by its CTF and weight by CTF² (RELION --ctf)."
    )
    subset: int | None = Field(
        None, ge=1, le=2, description="Use only particles with this rlnRandomSubset (1 or 2)."
    )
    wiener_regularisation: float = Field(
        0.0,
        ge=0,
        description="λ added to the summed weights before dividing, V̂ = Σ CTF·X̂ / (Σ CTF² + λ), "
        "in units of one image's weight (CTF² ≤ 1) per Fourier voxel of the map: RELION's "
        "σ²/τ². 0: the plain CTF-weighted average; larger damps noise where few or "
        "small weights were inserted (near CTF zeros).",
    )
    batch_size: int = Field(256, gt=0, description="Images read and inserted at once.")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto.")
    overwrite: bool = Field(False, description="Replace an existing output map and config.")


@dataclass(frozen=True)
class ReconstructResult:
    """What `run` wrote and from what."""

    output: Path
    config: Path
    n_particles: int
    box_size: int
    pixel_size_angstrom: float
    symmetry: str


@dataclass(frozen=True)
class _Inputs:
    table: pd.DataFrame
    star_folder: Path
    box_size: int
    pixel_size_angstrom: float
    ctf_premultiplied: bool


def config_path_for(output: Path) -> Path:
    """Where the resolved config of a map goes: map.mrc -> map.config.yaml."""
    return output.with_name(f"{output.stem}.config.yaml")


def claim_map_output(output: Path, overwrite: bool) -> Path:
    """Refuse (before any compute) to replace a map or its config unless `overwrite`.

    Returns:
        `config_path_for(output)`, where the resolved config is to be saved.
    """
    config_path = config_path_for(output)
    refuse_overwrite(output, overwrite)
    refuse_overwrite(config_path, overwrite)
    return config_path


def _single_value(table: pd.DataFrame, column: str, path: Path, fix: str) -> float:
    values = np.unique(table[column].to_numpy(dtype=np.float64))
    if not np.allclose(values, values[0], rtol=1e-6, atol=0.0):
        raise CryorefineError(
            f"{column} differs between particles ({', '.join(f'{v:g}' for v in values[:5])}).",
            path=path,
            field=column,
            fix=fix,
        )
    return float(values[0])


def _read_inputs(config: ReconstructConfig) -> _Inputs:
    """Every check that needs the files, before any compute."""
    star_path = config.particles
    required = ["rlnImageName", *ANGLE_COLUMNS, "rlnImagePixelSize"]
    if config.ctf:
        required += CTF_COLUMNS
    table = read_star_particles(star_path, require=required)
    if config.subset is not None:
        require_columns(table, ["rlnRandomSubset"], star_path, f"--subset {config.subset}")
        table = table[table["rlnRandomSubset"].astype(int) == config.subset]
        table = table.reset_index(drop=True)
    if len(table) == 0:
        which = "" if config.subset is None else f" with rlnRandomSubset {config.subset}"
        raise CryorefineError(
            f"no particles{which}.", path=star_path, fix="give a STAR file with particles."
        )
    pixel_size = _single_value(
        table, "rlnImagePixelSize", star_path, "reconstruct one pixel size at a time."
    )
    if not pixel_size > 0:
        raise CryorefineError(
            f"rlnImagePixelSize is {pixel_size}.",
            path=star_path,
            field="rlnImagePixelSize",
            fix="set the image pixel size (Å) in the data_optics block.",
        )
    star_folder = star_path.parent
    box_size = check_particle_stacks(table["rlnImageName"].tolist(), star_folder, star_path)
    if "rlnImageSize" in table.columns:
        sizes = set(table["rlnImageSize"].astype(int))
        if sizes != {box_size}:
            raise CryorefineError(
                f"rlnImageSize {sorted(sizes)} does not match the stacks' {box_size} px boxes.",
                path=star_path,
                field="rlnImageSize",
                fix="use the STAR file written with these stacks.",
            )
    premultiplied = False
    if config.ctf and "rlnCtfDataAreCtfPremultiplied" in table.columns:
        flags = set(table["rlnCtfDataAreCtfPremultiplied"].astype(int))
        if len(flags) > 1:
            raise CryorefineError(
                "rlnCtfDataAreCtfPremultiplied differs between optics groups.",
                path=star_path,
                field="rlnCtfDataAreCtfPremultiplied",
                fix="reconstruct the groups separately.",
            )
        premultiplied = flags == {1}
    return _Inputs(table, star_folder, box_size, pixel_size, premultiplied)


def _column(table: pd.DataFrame, name: str, default: float = 0.0) -> torch.Tensor:
    if name in table.columns:
        return torch.tensor(table[name].to_numpy(dtype=np.float64), dtype=_DTYPE)
    return torch.full((len(table),), default, dtype=_DTYPE)


def prepare_slices(
    images: torch.Tensor,
    table: pd.DataFrame,
    pixel_size_angstrom: float,
    ctf: bool = True,
    ctf_premultiplied: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Central slices and weights of a batch of particle images, ready for insertion.

    Args:
        images: real (n, D, D) particle images, float64, on the compute device.
        table: the n particles' rows (origins in Å, CTF parameters as in io/particles).
        pixel_size_angstrom: Å per pixel.
        ctf: CTF-correct (slices CTF · X̂, weights CTF²); else slices X̂, weights None (1).
        ctf_premultiplied: the images are already CTF · X (slices X̂, weights CTF²).

    Returns:
        slices: complex (n, D, D//2+1) centred half transforms, re-centred by +origin;
        weights: real (n, D, D//2+1) or None.
    """
    device = images.device
    box_size = images.shape[-1]
    origins = torch.stack(
        [_column(table, "rlnOriginXAngst"), _column(table, "rlnOriginYAngst")], dim=-1
    )
    # The particle's centre lies at box//2 − origin: translating by +origin re-centres it.
    shift = -shift_for_origin(origins, pixel_size_angstrom).to(device)
    slices = phase_shift(centred_rfftn(images, ndim=2), shift, (box_size, box_size))
    if not ctf:
        return slices, None
    transfer = particle_ctfs(table, box_size, pixel_size_angstrom, device)
    if not ctf_premultiplied:
        slices = slices * transfer
    return slices, transfer.square()


def particle_ctfs(
    table: pd.DataFrame, box_size: int, pixel_size_angstrom: float, device: torch.device
) -> torch.Tensor:
    """Each particle's CTF on the half transform of its D × D image.

    Args:
        table: the n particles' rows (CTF_COLUMNS; rlnPhaseShift, rlnCtfBfactor 0 if absent).
        box_size: D (pixels); pixel_size_angstrom: Å per pixel.

    Returns:
        real float64 (n, D, D//2+1), FFT order (engine.ctf.ctf_2d).
    """
    defocus_u, defocus_v, angle, voltage, cs, q0 = (
        _column(table, name).to(device) for name in CTF_COLUMNS
    )
    return ctf_2d(
        (box_size, box_size),
        pixel_size_angstrom,
        defocus_u,
        defocus_v,
        angle,
        voltage,
        cs,
        q0,
        phase_shift_degrees=_column(table, "rlnPhaseShift").to(device),
        b_factor_angstrom2=_column(table, "rlnCtfBfactor").to(device),
    )


def _describe(config: ReconstructConfig, inputs: _Inputs, device: torch.device) -> str:
    n = len(inputs.table)
    half = "" if config.subset is None else f" (rlnRandomSubset {config.subset})"
    weighting = "no CTF correction"
    if config.ctf:
        weighting = "CTF-weighted" + (
            " (images CTF-premultiplied)" if inputs.ctf_premultiplied else ""
        )
    padded = padded_box_size(inputs.box_size, config.pad_factor)
    return (
        f"[bold]cryorefine reconstruct[/]: {n} particles{half} from {config.particles}, "
        f"box {inputs.box_size} px at {inputs.pixel_size_angstrom:g} Å/px (STAR optics), "
        f"symmetry {config.symmetry}, {weighting}, padded to {padded} px, "
        f"λ = {config.wiener_regularisation:g}, batches of {config.batch_size}, "
        f"device {device} -> {config.output}"
    )


def run(config: ReconstructConfig, console: Console | None = None) -> ReconstructResult:
    """Reconstruct the map described by `config` (see the module docstring) and write it."""
    console = console or Console()
    output = config.output
    config_path = claim_map_output(output, config.overwrite)
    device = resolve_device(config.device)
    inputs = _read_inputs(config)
    console.print(_describe(config, inputs, device), highlight=False)

    operators = symmetry_operators(config.symmetry, dtype=_DTYPE, device=device)
    data, weight = empty_accumulators(
        inputs.box_size, config.pad_factor, device=device, dtype=_DTYPE
    )
    table = inputs.table
    names = table["rlnImageName"].astype(str).tolist()
    n = len(table)
    progress = Progress(
        TextColumn("inserting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    with progress:
        task = progress.add_task("insert", total=n)
        for start in range(0, n, config.batch_size):
            batch = table.iloc[start : start + config.batch_size]
            pixels = read_particle_images(
                names[start : start + config.batch_size], inputs.star_folder
            )
            images = torch.from_numpy(pixels).to(device=device, dtype=_DTYPE)
            slices, weights = prepare_slices(
                images, batch, inputs.pixel_size_angstrom, config.ctf, inputs.ctf_premultiplied
            )
            rotations = euler_to_matrix(*(_column(batch, name) for name in ANGLE_COLUMNS))
            insert_slices(data, weight, slices, rotations.to(device), weights, operators)
            progress.advance(task, len(batch))

    volume = reconstruct_map(data, weight, inputs.box_size, config.wiener_regularisation)
    write_mrc(output, volume.float(), inputs.pixel_size_angstrom, overwrite=config.overwrite)
    written_config = save_resolved_config(config, config_path)
    result = ReconstructResult(
        output, written_config, n, inputs.box_size, inputs.pixel_size_angstrom, config.symmetry
    )
    console.print(
        f"wrote {output} ({inputs.box_size}³ px, {inputs.pixel_size_angstrom:g} Å/px, "
        f"{n} particles × {len(operators)} symmetry operator(s); map mean "
        f"{float(volume.mean()):.4g}, std {float(volume.std()):.4g}) and {written_config}",
        highlight=False,
    )
    return result
