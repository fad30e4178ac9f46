"""`cryorefine match-template`: search a 3D template over orientations and defocus planes.

For each micrograph: the micrograph is whitened (and band-passed as configured),
every (orientation, defocus plane) projection of the template is CTF-filtered and
normalised, and the normalised cross-correlation (engine.template_matching) folds
into per-pixel statistics (engine.search_statistics). The maps (MIP, z-score, mean,
standard deviation, best angles, best relative defocus) are written as MRC, and the
peaks above the false-alarm threshold (engine.peaks) as a Leopard-EM CSV and a
RELION 3.1 STAR.

Maps are full-size and indexed by the particle centre; pixels where the template
would hang over the micrograph's edge are 0 in every map and never picked.
Micrographs are assumed to show dark particles (as recorded), like Leopard-EM's
default; `particle_contrast: bright` is for inverted or simulated white particles.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cryorefine.config import save_resolved_config
from cryorefine.engine.ctf import CtfParameters
from cryorefine.engine.peaks import false_alarm_threshold, find_peaks, valid_region
from cryorefine.engine.projection import PreparedVolume, prepare_for_projection
from cryorefine.engine.search_statistics import FOLD_GROUP, SearchStatistics
from cryorefine.engine.so3 import euler_to_matrix
from cryorefine.engine.template_matching import prepare_planes
from cryorefine.engine.template_search import SearchMaps, decode_maps, search
from cryorefine.errors import CryorefineError
from cryorefine.io import particles as p
from cryorefine.io.atomic import atomic_write, refuse_overwrite
from cryorefine.io.leopard import write_leopard_csv
from cryorefine.io.mrc import mrc_info, read_mrc, write_mrc
from cryorefine.io.star import read_star_micrographs, write_star_particles
from cryorefine.parallel.memory import batch_size_for
from cryorefine.programs.template_config import MatchTemplateConfig, OpticsGroup

#: The maps of a search, by the name of their path in match_template_result.
MAP_FIELDS = (
    "mip_path",
    "scaled_mip_path",
    "correlation_average_path",
    "correlation_variance_path",
    "orientation_phi_path",
    "orientation_theta_path",
    "orientation_psi_path",
    "relative_defocus_path",
)
#: Canonical table column naming each map's file.
_MAP_COLUMNS = {
    "mip_path": "crfMipMapName",
    "scaled_mip_path": "crfZScoreMapName",
    "correlation_average_path": "crfCorrelationMeanMapName",
    "correlation_variance_path": "crfCorrelationStdMapName",
    "orientation_phi_path": "crfAngleRotMapName",
    "orientation_theta_path": "crfAngleTiltMapName",
    "orientation_psi_path": "crfAnglePsiMapName",
    "relative_defocus_path": "crfRelativeDefocusMapName",
}


@dataclass(frozen=True)
class MicrographJob:
    """One micrograph to search: where it is, its CTF, where its maps go."""

    name: str
    path: Path
    pixel_size_angstrom: float
    ctf: CtfParameters
    map_paths: dict[str, Path]

    @property
    def checkpoint_path(self) -> Path:
        mip = self.map_paths["mip_path"]
        return mip.with_name(mip.name + ".checkpoint.pt")


@dataclass
class MatchResult:
    """What a run produced."""

    particles: pd.DataFrame
    csv_path: Path
    star_path: Path
    jobs: list[MicrographJob]
    threshold: float
    n_orientations: int
    n_planes: int
    seconds: float


# --------------------------------------------------------------------------- inputs


def _per_micrograph_paths(config: MatchTemplateConfig, stem: str | None) -> dict[str, Path]:
    """The result paths; with several micrographs each gets `<stem>_` before the file name."""
    result = config.match_template_result
    paths = {field: Path(getattr(result, field)) for field in MAP_FIELDS}
    if stem is None:
        return paths
    return {field: path.with_name(f"{stem}_{path.name}") for field, path in paths.items()}


def _optics_ctf(optics: OpticsGroup) -> CtfParameters:
    return CtfParameters(
        defocus_u_angstrom=optics.defocus_u,
        defocus_v_angstrom=optics.defocus_v,
        astigmatism_angle_degrees=optics.astigmatism_angle,
        voltage_kv=optics.voltage,
        spherical_aberration_mm=optics.spherical_aberration,
        amplitude_contrast=optics.amplitude_contrast_ratio,
        phase_shift_degrees=optics.phase_shift,
        b_factor_angstrom2=optics.ctf_B_factor,
    )


def _star_jobs(config: MatchTemplateConfig, star_path: Path) -> list[MicrographJob]:
    needed = ["rlnMicrographName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
    needed += ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
    table = read_star_micrographs(star_path, require=needed)
    pixel_column = next(
        (c for c in ("rlnMicrographPixelSize", "rlnImagePixelSize") if c in table.columns), None
    )
    if pixel_column is None:
        raise CryorefineError(
            "the micrographs have no pixel size.",
            path=star_path,
            field="rlnMicrographPixelSize",
            fix="add rlnMicrographPixelSize to the optics table.",
        )
    jobs = []
    stems: set[str] = set()
    for row_values in table.to_dict("records"):
        name = str(row_values["rlnMicrographName"])
        path = Path(name) if Path(name).is_absolute() else star_path.parent / name
        stem = Path(name).stem
        if stem in stems:
            raise CryorefineError(
                f"two micrographs share the file stem {stem!r}, so their maps would collide.",
                path=star_path,
                field="rlnMicrographName",
                fix="give every micrograph a distinct file name.",
            )
        stems.add(stem)
        ctf = CtfParameters(
            defocus_u_angstrom=float(row_values["rlnDefocusU"]),
            defocus_v_angstrom=float(row_values["rlnDefocusV"]),
            astigmatism_angle_degrees=float(row_values["rlnDefocusAngle"]),
            voltage_kv=float(row_values["rlnVoltage"]),
            spherical_aberration_mm=float(row_values["rlnSphericalAberration"]),
            amplitude_contrast=float(row_values["rlnAmplitudeContrast"]),
            phase_shift_degrees=float(row_values.get("rlnPhaseShift", 0.0)),
            b_factor_angstrom2=float(row_values.get("rlnCtfBfactor", 0.0)),
        )
        jobs.append(
            MicrographJob(
                name=name,
                path=path,
                pixel_size_angstrom=float(row_values[pixel_column]),
                ctf=ctf,
                map_paths=_per_micrograph_paths(config, stem),
            )
        )
    return jobs


def micrograph_jobs(config: MatchTemplateConfig) -> list[MicrographJob]:
    """The micrographs a config asks to search, with their CTFs and map paths."""
    if config.micrographs_star is not None:
        return _star_jobs(config, Path(config.micrographs_star))
    optics = config.optics_group
    if config.micrograph_path is None or optics is None:
        raise CryorefineError(
            "the config names no micrograph with its optics.",
            field="micrograph_path",
            fix="give micrograph_path and optics_group, or micrographs_star.",
        )
    path = Path(config.micrograph_path)
    return [
        MicrographJob(
            name=str(config.micrograph_path),
            path=path,
            pixel_size_angstrom=optics.pixel_size,
            ctf=_optics_ctf(optics),
            map_paths=_per_micrograph_paths(config, None),
        )
    ]


def read_template(config: MatchTemplateConfig) -> tuple[torch.Tensor, float]:
    """The template volume (D, D, D), checked to be a finite cube, and its voxel size (Å)."""
    path = Path(config.template_volume_path)
    info = mrc_info(path)
    if len(info.shape) != 3 or len(set(info.shape)) != 1:
        raise CryorefineError(
            f"the template must be a cubic volume, got shape {info.shape}.",
            path=path,
            field="template_volume_path",
            fix="pad or crop the template to a cube (e.g. cryorefine rebox).",
        )
    volume, voxel_size = read_mrc(path)
    if not np.isfinite(volume).all():
        raise CryorefineError(
            "the template has NaN or infinite voxels.",
            path=path,
            field="template_volume_path",
            fix="give a finite template map.",
        )
    return torch.from_numpy(volume), voxel_size


def check_pixel_size(template_voxel: float, pixel_size: float, path: Path) -> None:
    """The template must be sampled like the micrograph (within 0.1 %)."""
    if template_voxel <= 0 or abs(template_voxel - pixel_size) > 1e-3 * pixel_size:
        raise CryorefineError(
            f"the template's voxel size is {template_voxel:g} Å but the micrograph's pixel "
            f"size is {pixel_size:g} Å.",
            path=path,
            field="optics_group.pixel_size",
            fix="resample the template to the micrograph's pixel size (cryorefine rebox), "
            "or correct the pixel size in the config / the template's header.",
        )


def check_micrograph(job: MicrographJob, template_size: int) -> tuple[int, int]:
    """Shape of a micrograph, checked without reading its data: 2D, larger than the template."""
    info = mrc_info(job.path)
    shape = info.shape[-2:]
    if (len(info.shape) == 3 and info.shape[0] != 1) or len(info.shape) < 2:
        raise CryorefineError(
            f"expected a single 2D micrograph, got shape {info.shape}.",
            path=job.path,
            field="micrograph_path",
            fix="give one micrograph per file (a motion-corrected sum).",
        )
    if min(shape) < template_size:
        raise CryorefineError(
            f"the micrograph ({shape[0]} × {shape[1]} px) is smaller than the template "
            f"({template_size} px).",
            path=job.path,
            field="micrograph_path",
            fix="use a smaller template box or a whole micrograph.",
        )
    return int(shape[0]), int(shape[1])


def read_micrograph_file(path: Path) -> torch.Tensor:
    """A micrograph (H, W) cut to even sides, checked for NaNs."""
    data, _ = read_mrc(path)
    height, width = (int(n) for n in data.shape[-2:])
    data = data.reshape(height, width)
    if not np.isfinite(data).all():
        raise CryorefineError(
            f"the micrograph has {int((~np.isfinite(data)).sum())} NaN or infinite pixels.",
            path=path,
            field="micrograph_path",
            fix="re-run motion correction, or replace the bad pixels before matching.",
        )
    # The FFT correlation needs even sides; the dropped edge row/column can hold no
    # whole particle centre anyway.
    return torch.from_numpy(np.ascontiguousarray(data[: height - height % 2, : width - width % 2]))


# --------------------------------------------------------------------------- search


def plane_filters(
    config: MatchTemplateConfig,
    micrograph: torch.Tensor,
    job: MicrographJob,
    relative_defoci: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-side filter (H, W // 2 + 1) and template-side filters (P, H, W // 2 + 1)."""
    shape = (micrograph.shape[-2], micrograph.shape[-1])
    image_filter = config.preprocessing_filters.combined_filter(micrograph, shape)
    image_filter = image_filter.to(device=micrograph.device, dtype=torch.float32)
    ctfs = job.ctf.planes(shape, job.pixel_size_angstrom, relative_defoci, device=micrograph.device)
    sign = -1.0 if config.particle_contrast == "dark" else 1.0
    return image_filter, sign * image_filter * ctfs


def _bytes_per_orientation(template_size: int) -> int:
    # A projection, its slice and the sampling points, and its autocorrelation (2D)².
    return 4 * template_size**2 * 16


def memory_estimate_bytes(
    image_shape: tuple[int, int], template_size: int, n_planes: int, batch_size: int
) -> int:
    """Working memory of one micrograph's search (`template_search.search`)."""
    height, width = image_shape
    half = height * (width // 2 + 1)
    planes = 8 * half * n_planes
    # mip, best index, float32 partial squares; float64 sum and sum of squares.
    statistics = (4 + 4 + 4 + 8 + 8) * height * width
    # The padded projection, its transform, the product, the column pass, the maps
    # of one fold group.
    buffers = 4 * height * width + 3 * 8 * half + FOLD_GROUP * 4 * height * width
    volume = 8 * (2 * template_size) ** 2 * (template_size + 1)
    return (
        planes + statistics + buffers + volume + batch_size * _bytes_per_orientation(template_size)
    )


def _fingerprint(config: MatchTemplateConfig, job: MicrographJob, batch_size: int) -> str:
    """What a checkpoint must agree with to be continued."""
    settings = config.model_dump(mode="json", exclude={"computational_config"})
    settings.pop("micrographs_star", None)
    settings.pop("micrograph_path", None)
    text = json.dumps([settings, job.name, str(job.ctf), batch_size], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _load_checkpoint(
    job: MicrographJob, fingerprint: str, device: torch.device
) -> tuple[SearchStatistics, int] | None:
    path = job.checkpoint_path
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        raise CryorefineError(
            "the checkpoint was written by a search with other settings.",
            path=path,
            field="--continue",
            fix="run with the config that wrote it, or delete the checkpoint to start over.",
        )
    return SearchStatistics.from_state_dict(state["statistics"], device), int(state["next_batch"])


def _save_checkpoint(
    job: MicrographJob, fingerprint: str, statistics: SearchStatistics, next_batch: int
) -> None:
    state = {
        "fingerprint": fingerprint,
        "statistics": statistics.state_dict(),
        "next_batch": next_batch,
    }
    atomic_write(job.checkpoint_path, lambda temporary: torch.save(state, temporary), True)


def pick_particles(
    maps: SearchMaps,
    threshold: float,
    exclusion_radius_px: float,
    job: MicrographJob,
    n_correlations: int,
) -> pd.DataFrame:
    """The canonical particle table of the peaks of a z-score map above the threshold."""
    scores = torch.where(maps.valid, maps.z_score, -torch.inf)
    peaks = find_peaks(scores, threshold, exclusion_radius_px).cpu()
    y, x = peaks[:, 0], peaks[:, 1]

    def at(values: torch.Tensor) -> np.ndarray:
        return values.cpu()[y, x].double().numpy()

    relative = at(maps.relative_defocus)
    ctf = job.ctf
    table = pd.DataFrame(
        {
            "rlnMicrographName": job.name,
            "rlnCoordinateX": x.double().numpy(),
            "rlnCoordinateY": y.double().numpy(),
            "rlnAngleRot": at(maps.rot),
            "rlnAngleTilt": at(maps.tilt),
            "rlnAnglePsi": at(maps.psi),
            "rlnDefocusU": ctf.defocus_u_angstrom + relative,
            "rlnDefocusV": ctf.defocus_v_angstrom + relative,
            "rlnDefocusAngle": ctf.astigmatism_angle_degrees,
            "rlnPhaseShift": ctf.phase_shift_degrees,
            "rlnCtfBfactor": ctf.b_factor_angstrom2,
            "rlnVoltage": ctf.voltage_kv,
            "rlnSphericalAberration": ctf.spherical_aberration_mm,
            "rlnAmplitudeContrast": ctf.amplitude_contrast,
            "rlnMicrographPixelSize": job.pixel_size_angstrom,
            "rlnImagePixelSize": job.pixel_size_angstrom,
            p.RELATIVE_DEFOCUS: relative,
            p.MIP: at(maps.mip),
            p.Z_SCORE: at(maps.z_score),
            p.CORRELATION_MEAN: at(maps.mean),
            p.CORRELATION_STD: at(maps.std),
            p.TOTAL_CORRELATIONS: n_correlations,
        }
    )
    for field, column in _MAP_COLUMNS.items():
        table[column] = str(job.map_paths[field])
    return table


def write_maps(job: MicrographJob, maps: SearchMaps, overwrite: bool) -> None:
    """The eight maps as MRC files at the micrograph's pixel size."""
    values = {
        "mip_path": maps.mip,
        "scaled_mip_path": maps.z_score,
        "correlation_average_path": maps.mean,
        "correlation_variance_path": maps.std,
        "orientation_phi_path": maps.rot,
        "orientation_theta_path": maps.tilt,
        "orientation_psi_path": maps.psi,
        "relative_defocus_path": maps.relative_defocus,
    }
    for field, data in values.items():
        write_mrc(job.map_paths[field], data.cpu(), job.pixel_size_angstrom, overwrite=overwrite)


def read_maps(job: MicrographJob, template_size: int) -> SearchMaps:
    """Maps written by an earlier run (for --continue over finished micrographs)."""
    data = {field: torch.from_numpy(read_mrc(job.map_paths[field])[0]) for field in MAP_FIELDS}
    shape = (data["mip_path"].shape[-2], data["mip_path"].shape[-1])
    valid = torch.zeros(shape, dtype=torch.bool)
    rows, columns = valid_region(shape, template_size)
    valid[rows, columns] = True
    return SearchMaps(
        mip=data["mip_path"],
        z_score=data["scaled_mip_path"],
        mean=data["correlation_average_path"],
        std=data["correlation_variance_path"],
        rot=data["orientation_phi_path"],
        tilt=data["orientation_theta_path"],
        psi=data["orientation_psi_path"],
        relative_defocus=data["relative_defocus_path"],
        valid=valid,
    )


# --------------------------------------------------------------------------- run


def _check_outputs(
    jobs: list[MicrographJob], csv_path: Path, star_path: Path, overwrite: bool, resume: bool
) -> None:
    """Refuse before compute to replace results (unless allowed); a continued run may."""
    if resume:
        return
    maps = [path for job in jobs for path in job.map_paths.values()]
    for path in [csv_path, star_path, *maps]:
        refuse_overwrite(path, overwrite)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def run(
    config: MatchTemplateConfig,
    output_csv: str | Path,
    resume: bool = False,
    console: Console | None = None,
) -> MatchResult:
    """Search every micrograph, write the maps, the particle CSV and STAR, the config."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    csv_path = Path(output_csv)
    star_path = csv_path.with_suffix(".star")
    overwrite = bool(config.match_template_result.allow_file_overwrite)
    jobs = micrograph_jobs(config)
    template, voxel_size = read_template(config)
    template_size = int(template.shape[-1])
    shapes = []
    for job in jobs:
        check_pixel_size(voxel_size, job.pixel_size_angstrom, Path(config.template_volume_path))
        shapes.append(check_micrograph(job, template_size))
    for job in jobs:
        # Every micrograph's pixels before any search: reading one costs far less than
        # searching one, and a bad file fails the run before hours of compute.
        read_micrograph_file(job.path)
    _check_outputs(jobs, csv_path, star_path, overwrite, resume)

    device = config.computational_config.devices()[0]
    if device.type == "cpu":
        # Torch's and the FFT library's thread pools contend on a CPU: one thread
        # per process (num_cpus = 1, Leopard-EM's default) is the most efficient.
        torch.set_num_threads(config.computational_config.num_cpus)
    orientations = config.orientations()
    relative_defoci = config.defocus_search_config.defocus_values().double()
    rotations = euler_to_matrix(*orientations.unbind(-1)).float().to(device)
    n_orientations, n_planes = int(orientations.shape[0]), int(relative_defoci.shape[0])
    n_correlations = n_orientations * n_planes
    prepared = prepare_for_projection(template.to(device))
    exclusion_radius = config.peak_exclusion_radius(template_size)

    tables = []
    threshold = float("nan")
    with _progress(console) as progress:
        for job, shape in zip(jobs, shapes, strict=True):
            height, width = shape[0] - shape[0] % 2, shape[1] - shape[1] % 2
            valid_pixels = (height - template_size + 1) * (width - template_size + 1)
            threshold = false_alarm_threshold(
                valid_pixels * n_correlations, config.false_alarms_per_micrograph
            )
            finished = (
                resume
                and not job.checkpoint_path.exists()
                and all(path.exists() for path in job.map_paths.values())
            )
            if finished:
                maps = read_maps(job, template_size)
            else:
                maps = _search_one(
                    config, job, prepared, rotations, orientations, relative_defoci,
                    device, resume, overwrite, progress, console,
                )  # fmt: skip
            tables.append(pick_particles(maps, threshold, exclusion_radius, job, n_correlations))
            console.print(
                f"{job.path.name}: {len(tables[-1])} particles above z = {threshold:.2f} "
                f"({n_orientations} orientations × {n_planes} defocus planes)"
            )

    particles = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    particles[p.TEMPLATE_NAME] = str(config.template_volume_path)
    particles = particles.sort_values(p.Z_SCORE, ascending=False, kind="stable").reset_index(
        drop=True
    )
    write_leopard_csv(
        csv_path, particles, overwrite=overwrite or resume, template_size=template_size
    )
    if len(particles):
        write_star_particles(star_path, particles, overwrite=overwrite or resume)
    save_resolved_config(config, csv_path.with_suffix(".config.yaml"))
    return MatchResult(
        particles=particles,
        csv_path=csv_path,
        star_path=star_path,
        jobs=jobs,
        threshold=threshold,
        n_orientations=n_orientations,
        n_planes=n_planes,
        seconds=time.perf_counter() - started,
    )


def _search_one(
    config: MatchTemplateConfig,
    job: MicrographJob,
    prepared: PreparedVolume,
    rotations: torch.Tensor,
    orientations: torch.Tensor,
    relative_defoci: torch.Tensor,
    device: torch.device,
    resume: bool,
    overwrite: bool,
    progress: Progress,
    console: Console,
) -> SearchMaps:
    micrograph = read_micrograph_file(job.path).to(device)
    template_size = prepared.box_size
    image_filter, template_filters = plane_filters(config, micrograph, job, relative_defoci)
    planes = prepare_planes(micrograph, image_filter, template_filters, template_size)
    shape = planes.image_shape
    n_orientations = int(rotations.shape[0])
    fixed = memory_estimate_bytes(shape, template_size, planes.n_planes, 0)
    batch_size = config.orientation_batch_size or batch_size_for(
        _bytes_per_orientation(template_size), fixed, device, n_orientations
    )
    estimate = memory_estimate_bytes(shape, template_size, planes.n_planes, batch_size)
    console.print(
        f"{job.path.name}: {shape[0]} × {shape[1]} px, batches of {batch_size} orientations, "
        f"about {estimate / 2**30:.2f} GiB on {device}"
    )
    fingerprint = _fingerprint(config, job, batch_size)
    loaded = _load_checkpoint(job, fingerprint, device) if resume else None
    statistics, first_batch = loaded if loaded is not None else (None, 0)
    n_batches = -(-n_orientations // batch_size)
    task = progress.add_task(job.path.name, total=n_batches, completed=first_batch)
    last_save = time.monotonic()
    interval = config.checkpoint_every_seconds

    def on_batch(next_batch: int, current: SearchStatistics) -> None:
        nonlocal last_save
        progress.update(task, completed=next_batch)
        if next_batch < n_batches and time.monotonic() - last_save >= interval:
            _save_checkpoint(job, fingerprint, current, next_batch)
            last_save = time.monotonic()

    statistics = search(
        prepared, planes, rotations, batch_size,
        statistics=statistics, first_batch=first_batch, on_batch=on_batch,
    )  # fmt: skip
    progress.remove_task(task)
    maps = decode_maps(statistics, orientations, relative_defoci, template_size)
    write_maps(job, maps, overwrite=overwrite or resume)
    job.checkpoint_path.unlink(missing_ok=True)
    return maps
