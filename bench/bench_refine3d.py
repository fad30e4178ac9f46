"""cryorefine refine3d vs RELION 3.1 auto-refine: one simulated dataset, both programs, one table.

Usage:
    .venv/bin/python bench/bench_refine3d.py [--particles 2000] [--box 64] [--snr 0.05]
        [--work-dir DIR] [--seed 0] [--initial-lowpass 40] [--skip-relion] [--skip-ours]

Data (cryorefine's simulator, written to WORK/data): the built-in structure (PDB 4JSV,
simulate.atoms.potential_from_atoms) on a --box³ grid at 2 Å/px is the truth; particles
are its projections in uniform random views with a CTF (300 kV, defocus 1–2.5 µm, up to
500 Å astigmatism), origin offsets up to 3 px and white noise at --snr (signal variance
over the box / noise variance, simulate.particles), in random balanced halves
(rlnRandomSubset). Images and truth are divided by the noise standard deviation, so the
background has unit variance as RELION expects (and relion_reconstruct with the true
poses gives back 0.9× the truth). The starting map is the truth low-pass
filtered to --initial-lowpass Å (raised-cosine edge two Fourier shells wide, centred
there); both programs get the same file. The input STAR holds zero angles and origins
(the truth is in truth_particles.star, used only for scoring): RELION's first
auto-refine iteration searches globally, and ours must too.

Programs, on this machine's 2 cores, each under the bench's own niceness (run the bench
with `nice -n 19` on a shared machine):
    RELION: mpirun --allow-run-as-root --oversubscribe -n 3 relion_refine_mpi --auto_refine
        --split_random_halves ... --j 1 (a leader and two workers, one thread each), run in
        WORK/data because RELION reads image names relative to its working directory.
    ours:   cryorefine refine3d --particles ... --threads 2 (OMP/MKL threads 2).
Both get the same STAR, reference, 40 Å initial low-pass, 120 Å mask diameter, C1 and
sampling: global searches from 15° (RELION's healpix order 2), local ones from 7.5°
(--auto_local_healpix_order 3), offsets ±5 px in 2 px steps. Both score the first
iteration by cross-correlation (RELION's --firstiter_cc, ours by default): without it
RELION 3.1 does not find the poses on this data even at SNR 1 (300 particles: median
angle error 54°, 16 Å; with it 2.7°, 4.9 Å), although the reference is on the
particles' grey scale.

Measured per program: wall time; CPU seconds (user + sys from os.wait4, which includes
the MPI ranks mpirun reaped); peak RSS of the largest process (ru_maxrss) and of the
whole process tree summed (sampled every 0.1 s from /proc: shared pages count once per
process, and a peak shorter than 0.1 s can be missed); iterations, the final joined one
included (RELION's last "Auto-refine: Iteration=" line, ours from summary.yaml).

Scored against the truth, the same way for both:
- reported: the gold-standard resolution the program prints (RELION's "Final resolution
  (without masking)", ours the last "final resolution X Å" line);
- half maps: FSC = 0.143 between the two half maps, computed here (engine.fsc) after the
  same soft spherical mask (--mask-diameter, 3 px edge) on both;
- vs truth: FSC = 0.5 between the final map and the truth, both under that mask, no
  alignment (refinement starts from the low-passed truth, so the frames agree to a few
  degrees: see the frame rotation below);
- median angular error (engine.symmetry.symmetric_angular_distance) and median origin
  error (Å) of the refined poses against the true ones, matched on rlnImageName;
- frame rotation: starting from a 40 Å map, a refinement may settle in a frame turned
  by a few degrees from the truth's (every refined pose = true pose · G). G is the
  chordal mean of the relative rotations (the particles within 20° of it), and the
  angle error is also given after it is taken out: what the poses' precision is.

Each program's run lives in WORK/relion or WORK/cryorefine with its log and usage.json;
--skip-relion / --skip-ours reuse that previous run (if it was made on the same data:
the dataset is regenerated only when its parameters change) instead of running again.
The table is printed and written to WORK/results.md (and results.json).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

# bench/ is sys.path[0] when this script runs: the process-tree measurement is shared.
from bench_2dtm import Usage, child_env, markdown, print_table, run_measured
from rich.console import Console

from cryorefine.engine.filters import lowpass_volume
from cryorefine.engine.fsc import (
    fourier_shell_correlation,
    resolution_at_threshold,
    shell_frequencies,
)
from cryorefine.engine.masks import soft_sphere_mask
from cryorefine.engine.so3 import angular_distance, euler_to_matrix
from cryorefine.engine.symmetry import symmetric_angular_distance, symmetry_operators
from cryorefine.io.mrc import read_mrc, write_mrc
from cryorefine.io.star import read_star_particles, write_star_particles
from cryorefine.simulate.atoms import (
    builtin_structure_path,
    potential_from_atoms,
    read_atomic_model,
)
from cryorefine.simulate.particles import simulate_particle_stack, write_particle_stack

PIXEL_SIZE_ANGSTROM = 2.0
SYMMETRY = "C1"  # the built-in structure has no symmetry
DEFOCUS_RANGE_ANGSTROM = (10000.0, 25000.0)
MAX_ASTIGMATISM_ANGSTROM = 500.0
MAX_ORIGIN_PX = 3.0
# RELION's search, in its units (pixels; healpix order 2 = 15°, local from order 3 = 7.5°).
RELION_OFFSET_RANGE_PX = 5
RELION_OFFSET_STEP_PX = 2
RELION_HEALPIX_ORDER = 2
RELION_AUTO_LOCAL_HEALPIX_ORDER = 3
HEALPIX_STEP_DEGREES = {order: 60.0 / 2**order for order in range(8)}  # 2: 15°, 3: 7.5°
MASK_SOFT_EDGE_PX = 3.0
GOLD_STANDARD_THRESHOLD = 0.143
TRUTH_THRESHOLD = 0.5
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")

DATA_FILES = ("truth.mrc", "reference.mrc", "particles.mrcs", "particles.star")
TRUTH_STAR = "truth_particles.star"
PARAMS_JSON = "params.json"
USAGE_JSON = "usage.json"

COLUMNS = (
    "program",
    "particles",
    "iterations",
    "wall s",
    "CPU s",
    "peak RSS MiB (tree)",
    "peak RSS MiB (largest process)",
    "reported resolution Å",
    "half-map FSC 0.143 Å (masked, bench)",
    "map vs truth FSC 0.5 Å (masked)",
    "median angle error °",
    "frame rotation °",
    "median angle error in that frame °",
    "median origin error Å",
)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DatasetParams:
    """Everything that decides the simulated dataset (a change means new data)."""

    particles: int
    box: int
    snr: float
    seed: int
    initial_lowpass_angstrom: float
    pixel_size_angstrom: float = PIXEL_SIZE_ANGSTROM


def truth_volume(box: int, pixel_size: float) -> torch.Tensor:
    """(box, box, box) potential of the built-in structure, centred on its centroid (V)."""
    model = read_atomic_model(builtin_structure_path())
    return potential_from_atoms(model, box, pixel_size)


def make_dataset(params: DatasetParams, folder: Path, console: Console) -> Path:
    """Simulate (or reuse, when made with the same params) the dataset in `folder`.

    Writes truth.mrc, reference.mrc (the low-passed truth), particles.mrcs,
    particles.star (angles and origins zero) and truth_particles.star; returns `folder`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    params_path = folder / PARAMS_JSON
    complete = all((folder / name).exists() for name in (*DATA_FILES, TRUTH_STAR))
    if complete and params_path.exists() and json.loads(params_path.read_text()) == asdict(params):
        console.print(f"dataset: reusing {folder}", highlight=False)
        return folder
    params_path.unlink(missing_ok=True)
    start = time.perf_counter()
    volume = truth_volume(params.box, params.pixel_size_angstrom)
    stack = simulate_particle_stack(
        volume,
        params.pixel_size_angstrom,
        params.particles,
        snr=params.snr,
        seed=params.seed,
        defocus_range_angstrom=DEFOCUS_RANGE_ANGSTROM,
        max_astigmatism_angstrom=MAX_ASTIGMATISM_ANGSTROM,
        max_origin_angstrom=MAX_ORIGIN_PX * params.pixel_size_angstrom,
        random_subset="random",
    )
    # Unit noise: RELION checks that the background has mean 0 and standard deviation 1,
    # and the same factor on the truth keeps the reference on the particles' grey scale.
    scale = 1.0 / stack.noise_std
    truth = volume * scale
    write_mrc(folder / "truth.mrc", truth, params.pixel_size_angstrom, overwrite=True)
    reference = lowpass_volume(truth, params.initial_lowpass_angstrom, params.pixel_size_angstrom)
    write_mrc(folder / "reference.mrc", reference, params.pixel_size_angstrom, overwrite=True)
    write_star_particles(folder / TRUTH_STAR, stack.table, overwrite=True)
    blind = stack.table.copy()
    blind[list(POSE_COLUMNS)] = 0.0
    write_particle_stack(
        replace(stack, images=stack.images * scale, table=blind), folder, overwrite=True
    )
    params_path.write_text(json.dumps(asdict(params), indent=1))
    console.print(
        f"dataset: {params.particles} particles, {params.box} px, SNR {params.snr}, "
        f"written to {folder} in {time.perf_counter() - start:.1f} s",
        highlight=False,
    )
    return folder


# --------------------------------------------------------------------------- running


def relion_command(args: argparse.Namespace, output: Path) -> list[str]:
    """relion_refine_mpi with 3 ranks (leader + 2 workers, 1 thread each), run in data/."""
    return [
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        "3",
        "relion_refine_mpi",
        "--o",
        str(output / "run"),
        "--auto_refine",
        "--split_random_halves",
        "--i",
        "particles.star",
        "--ref",
        "reference.mrc",
        "--ini_high",
        f"{args.initial_lowpass:g}",
        "--dont_combine_weights_via_disc",
        "--pool",
        "30",
        "--pad",
        "2",
        "--ctf",
        "--particle_diameter",
        f"{args.mask_diameter:g}",
        "--flatten_solvent",
        "--zero_mask",
        "--oversampling",
        "1",
        "--healpix_order",
        str(RELION_HEALPIX_ORDER),
        "--auto_local_healpix_order",
        str(RELION_AUTO_LOCAL_HEALPIX_ORDER),
        "--offset_range",
        str(RELION_OFFSET_RANGE_PX),
        "--offset_step",
        str(RELION_OFFSET_STEP_PX),
        "--sym",
        SYMMETRY,
        "--low_resol_join_halves",
        "40",
        "--norm",
        "--scale",
        "--j",
        "1",
        # Cross-correlation in the first iteration, as ours does by default (see the top).
        "--firstiter_cc",
        # RELION reads a seed of 0 as "do not shuffle the particle order".
        "--random_seed",
        str(args.seed + 1),
    ]


def cryorefine_executable() -> Path:
    return Path(sys.executable).parent / "cryorefine"


def cryorefine_has_refine3d() -> bool:
    executable = cryorefine_executable()
    if not executable.exists():
        return False
    done = subprocess.run([str(executable), "refine3d", "--help"], capture_output=True, check=False)
    return done.returncode == 0


def cryorefine_command(args: argparse.Namespace, data: Path, output: Path) -> list[str]:
    return [
        str(cryorefine_executable()),
        "refine3d",
        "--particles",
        str(data / "particles.star"),
        "--reference",
        str(data / "reference.mrc"),
        "--output",
        str(output),
        "--initial-lowpass",
        f"{args.initial_lowpass:g}",
        "--symmetry",
        SYMMETRY,
        "--mask-diameter",
        f"{args.mask_diameter:g}",
        # RELION's sampling: healpix order 2 = 15°, local searches from order 3 = 7.5°.
        "--angular-step",
        f"{HEALPIX_STEP_DEGREES[RELION_HEALPIX_ORDER]:g}",
        "--local-searches-from",
        f"{HEALPIX_STEP_DEGREES[RELION_AUTO_LOCAL_HEALPIX_ORDER]:g}",
        "--offset-range",
        str(RELION_OFFSET_RANGE_PX),
        "--offset-step",
        str(RELION_OFFSET_STEP_PX),
        "--seed",
        str(args.seed),
        "--threads",
        "2",
    ]


def run_program(
    console: Console,
    name: str,
    command: list[str],
    env: dict[str, str],
    cwd: Path,
    folder: Path,
    params: DatasetParams,
) -> Usage | None:
    """Run one program into a fresh `folder`; its usage, or None (reported) if it failed."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    log = folder / "run.log"
    console.print(f"{name}: running (log {log}) ... ", end="", highlight=False)
    usage = run_measured(command, env, log, cwd)
    console.print(
        f"{usage.wall_seconds:.1f} s wall, {usage.cpu_seconds:.1f} CPU-s, exit {usage.returncode}",
        highlight=False,
    )
    if usage.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        console.print(f"[red]{name} failed[/]:\n{tail}", highlight=False)
        return None
    record = {"usage": asdict(usage), "dataset": asdict(params), "command": command}
    (folder / USAGE_JSON).write_text(json.dumps(record, indent=1))
    return usage


def previous_usage(
    console: Console, name: str, folder: Path, params: DatasetParams
) -> Usage | None:
    """The usage of an earlier run in `folder` on the same dataset, or None (reported)."""
    path = folder / USAGE_JSON
    if not path.exists():
        console.print(f"[yellow]{name}: skipped, and no earlier run in {folder}[/]")
        return None
    record = json.loads(path.read_text())
    if record["dataset"] != asdict(params):
        console.print(
            f"[yellow]{name}: the earlier run in {folder} used other data "
            f"({record['dataset']}): left out[/]",
            highlight=False,
        )
        return None
    console.print(f"{name}: reusing the earlier run in {folder}", highlight=False)
    return Usage(**record["usage"])


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Outputs:
    """What a finished refinement left behind, in the bench's terms."""

    particles: Path
    final_map: Path
    half_maps: tuple[Path, Path]
    reported_resolution: float  # Å, as the program printed it
    iterations: int | None


def _last_float(pattern: str, text: str) -> float:
    found = re.findall(pattern, text, flags=re.IGNORECASE)
    return float(found[-1]) if found else math.nan


def relion_outputs(folder: Path) -> Outputs:
    """RELION's final files; its resolution from the log, else run_model.star."""
    log = (folder / "run.log").read_text()
    resolution = _last_float(r"Final resolution \(without masking\) is:\s*([0-9.]+)", log)
    if math.isnan(resolution):
        resolution = _last_float(r"_rlnCurrentResolution\s+([0-9.eE+-]+)", _model_text(folder))
    # The final (joined, Nyquist) iteration writes run_* files without a number.
    iterations = _last_float(r"Auto-refine: Iteration=\s*(\d+)", log)
    return Outputs(
        particles=folder / "run_data.star",
        final_map=folder / "run_class001.mrc",
        half_maps=(
            folder / "run_half1_class001_unfil.mrc",
            folder / "run_half2_class001_unfil.mrc",
        ),
        reported_resolution=resolution,
        iterations=None if math.isnan(iterations) else int(iterations),
    )


def _model_text(folder: Path) -> str:
    path = folder / "run_model.star"
    return path.read_text() if path.exists() else ""


def cryorefine_outputs(folder: Path) -> Outputs:
    """Our refine3d's files; its resolution from the last 'final resolution X Å' line."""
    log = (folder / "run.log").read_text()
    summary_path = folder / "summary.yaml"
    summary = yaml.safe_load(summary_path.read_text()) if summary_path.exists() else {}
    return Outputs(
        particles=folder / "particles.star",
        final_map=folder / "map.mrc",
        half_maps=(folder / "half_map_1.mrc", folder / "half_map_2.mrc"),
        reported_resolution=_last_float(r"final resolution\s+([0-9.]+)", log),
        iterations=summary.get("iterations"),
    )


# --------------------------------------------------------------------------- scoring


def read_volume(path: Path) -> torch.Tensor:
    return torch.from_numpy(read_mrc(path, np.float64)[0])


def masked_resolution(
    map_a: torch.Tensor, map_b: torch.Tensor, mask: torch.Tensor, pixel: float, threshold: float
) -> float:
    """Resolution (Å) where the FSC of the two masked maps first falls below `threshold`."""
    fsc = fourier_shell_correlation(map_a * mask, map_b * mask)
    frequencies = shell_frequencies(map_a.shape[-1], dtype=torch.float64)
    return float(resolution_at_threshold(fsc, frequencies, pixel, threshold))


def nearest_rotation(matrix: torch.Tensor) -> torch.Tensor:
    """The rotation closest (Frobenius) to a (3, 3) matrix: U diag(1, 1, det) Vᵀ of its SVD."""
    u, _, vt = torch.linalg.svd(matrix)
    sign = torch.sign(torch.linalg.det(u @ vt))
    return u @ torch.diag(torch.stack([sign.new_ones(()), sign.new_ones(()), sign])) @ vt


def frame_rotation(relative: torch.Tensor, inlier_degrees: float = 20.0) -> torch.Tensor:
    """(3, 3) common rotation G of (n, 3, 3) relative rotations (chordal mean of inliers).

    Starts from the mean of all; then, a few times, the mean of those within
    `inlier_degrees` of the current G, so that lost particles do not pull it.
    """
    g = nearest_rotation(relative.mean(dim=0))
    for _ in range(3):
        close = angular_distance(relative, g) < inlier_degrees
        if int(close.sum()) < 3:
            break
        g = nearest_rotation(relative[close].mean(dim=0))
    return g


@dataclass(frozen=True)
class PoseErrors:
    particles: int  # matched to the truth by image name
    median_angle: float  # degrees
    frame_rotation: float  # degrees, the angle of G
    median_angle_in_frame: float  # degrees, against true pose · G
    median_origin: float  # Å


@dataclass(frozen=True)
class Scores:
    """One refinement scored against the truth."""

    half_map_resolution: float  # Å, FSC 0.143 of the masked half maps
    truth_resolution: float  # Å, FSC 0.5 of the masked final map against the truth
    poses: PoseErrors


def pose_errors(refined: pd.DataFrame, truth: pd.DataFrame) -> PoseErrors:
    """Refined poses against the true ones, matched on rlnImageName (C1 only for G)."""
    both = truth.merge(refined, on="rlnImageName", suffixes=("_true", "_refined"))

    def matrices(suffix: str) -> torch.Tensor:
        angles = [
            torch.tensor(both[f"{name}{suffix}"].to_numpy(np.float64))
            for name in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
        ]
        return euler_to_matrix(*angles)

    true, refined_matrices = matrices("_true"), matrices("_refined")
    operators = symmetry_operators(SYMMETRY)
    angle = symmetric_angular_distance(refined_matrices, true, operators)
    # Refined = true · G when the refined map is the truth turned by G.
    g = frame_rotation(true.transpose(-1, -2) @ refined_matrices)
    in_frame = symmetric_angular_distance(refined_matrices, true @ g, operators)
    origin = np.hypot(
        both["rlnOriginXAngst_refined"] - both["rlnOriginXAngst_true"],
        both["rlnOriginYAngst_refined"] - both["rlnOriginYAngst_true"],
    )
    return PoseErrors(
        particles=len(both),
        median_angle=float(angle.median()),
        frame_rotation=float(angular_distance(torch.eye(3, dtype=g.dtype), g)),
        median_angle_in_frame=float(in_frame.median()),
        median_origin=float(np.median(origin)),
    )


def score(
    outputs: Outputs, truth: torch.Tensor, truth_table: pd.DataFrame, mask_diameter: float
) -> Scores:
    box = truth.shape[-1]
    mask = soft_sphere_mask(
        box, mask_diameter / (2 * PIXEL_SIZE_ANGSTROM), MASK_SOFT_EDGE_PX, dtype=torch.float64
    )
    half_1, half_2 = (read_volume(path) for path in outputs.half_maps)
    final = read_volume(outputs.final_map)
    refined = read_star_particles(outputs.particles, require=("rlnImageName", *POSE_COLUMNS))
    return Scores(
        half_map_resolution=masked_resolution(
            half_1, half_2, mask, PIXEL_SIZE_ANGSTROM, GOLD_STANDARD_THRESHOLD
        ),
        truth_resolution=masked_resolution(
            final, truth, mask, PIXEL_SIZE_ANGSTROM, TRUTH_THRESHOLD
        ),
        poses=pose_errors(refined, truth_table),
    )


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Result:
    program: str
    usage: Usage
    outputs: Outputs
    scores: Scores


def _number(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}×" if theirs > 0 and not math.isnan(ours / theirs) else "—"


def _difference(ours: float | None, theirs: float | None, digits: int = 2) -> str:
    if ours is None or theirs is None or math.isnan(ours - theirs):
        return "—"
    return f"{ours - theirs:+.{digits}f}"


def result_row(result: Result) -> list[str]:
    u, o, s, p = result.usage, result.outputs, result.scores, result.scores.poses
    return [
        result.program,
        f"{p.particles:,}",
        "—" if o.iterations is None else str(o.iterations),
        _number(u.wall_seconds),
        _number(u.cpu_seconds),
        _number(u.peak_tree_rss_mib, 0),
        _number(u.peak_rss_mib, 0),
        _number(o.reported_resolution, 2),
        _number(s.half_map_resolution, 2),
        _number(s.truth_resolution, 2),
        _number(p.median_angle, 2),
        _number(p.frame_rotation, 2),
        _number(p.median_angle_in_frame, 2),
        _number(p.median_origin, 2),
    ]


def comparison_row(ours: Result, relion: Result) -> list[str]:
    """Ours / RELION for time and memory, ours − RELION for iterations and accuracy."""
    iterations = (
        _difference(float(ours.outputs.iterations), float(relion.outputs.iterations), 0)
        if ours.outputs.iterations is not None and relion.outputs.iterations is not None
        else "—"
    )
    return [
        "ours / RELION (time, memory); ours − RELION (rest)",
        "",
        iterations,
        _ratio(ours.usage.wall_seconds, relion.usage.wall_seconds),
        _ratio(ours.usage.cpu_seconds, relion.usage.cpu_seconds),
        _ratio(ours.usage.peak_tree_rss_mib, relion.usage.peak_tree_rss_mib),
        _ratio(ours.usage.peak_rss_mib, relion.usage.peak_rss_mib),
        _difference(ours.outputs.reported_resolution, relion.outputs.reported_resolution),
        _difference(ours.scores.half_map_resolution, relion.scores.half_map_resolution),
        _difference(ours.scores.truth_resolution, relion.scores.truth_resolution),
        *(
            _difference(getattr(ours.scores.poses, name), getattr(relion.scores.poses, name))
            for name in ("median_angle", "frame_rotation", "median_angle_in_frame", "median_origin")
        ),
    ]


def table_rows(results: dict[str, Result]) -> list[list[str]]:
    rows = [result_row(result) for result in results.values()]
    if {"RELION 3.1", "cryorefine"} <= results.keys():
        rows.append(comparison_row(results["cryorefine"], results["RELION 3.1"]))
    return rows


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--particles", type=int, default=2000, help="number of particles")
    parser.add_argument("--box", type=int, default=64, help="box size, px (2 Å/px)")
    parser.add_argument("--snr", type=float, default=0.05, help="signal / noise variance")
    parser.add_argument("--seed", type=int, default=0, help="data seed (RELION gets seed + 1)")
    parser.add_argument("--work-dir", type=Path, default=Path("bench_refine3d_work"))
    parser.add_argument(
        "--initial-lowpass", type=float, default=40.0, help="starting map's resolution, Å"
    )
    parser.add_argument(
        "--mask-diameter", type=float, default=120.0, help="particle mask diameter, Å"
    )
    parser.add_argument(
        "--skip-relion", action="store_true", help="reuse the RELION run in the work dir"
    )
    parser.add_argument(
        "--skip-ours", action="store_true", help="reuse our refine3d run in the work dir"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console() if Console().is_terminal else Console(width=240)
    work = args.work_dir.resolve()
    params = DatasetParams(args.particles, args.box, args.snr, args.seed, args.initial_lowpass)
    data = make_dataset(params, work / "data", console)
    truth = read_volume(data / "truth.mrc")
    truth_table = read_star_particles(data / TRUTH_STAR)

    programs: dict[str, tuple[Path, Any, bool]] = {
        "RELION 3.1": (work / "relion", relion_outputs, args.skip_relion),
        "cryorefine": (work / "cryorefine", cryorefine_outputs, args.skip_ours),
    }
    results: dict[str, Result] = {}
    for name, (folder, outputs_of, skip) in programs.items():
        if skip:
            usage = previous_usage(console, name, folder, params)
        elif name == "RELION 3.1" and shutil.which("relion_refine_mpi") is None:
            console.print("[yellow]relion_refine_mpi is not installed (apt-get install relion)[/]")
            usage = None
        elif name == "cryorefine" and not cryorefine_has_refine3d():
            console.print("[yellow]cryorefine refine3d is not available: skipped[/]")
            usage = None
        elif name == "RELION 3.1":
            command = relion_command(args, folder)
            usage = run_program(console, name, command, child_env(1), data, folder, params)
        else:
            command = cryorefine_command(args, data, folder)
            usage = run_program(console, name, command, child_env(2), data, folder, params)
        if usage is None:
            continue
        outputs = outputs_of(folder)
        results[name] = Result(
            name, usage, outputs, score(outputs, truth, truth_table, args.mask_diameter)
        )

    title = (
        f"refine3d: {args.particles:,} particles, {args.box} px at {PIXEL_SIZE_ANGSTROM:g} Å/px, "
        f"SNR {args.snr:g}, start {args.initial_lowpass:g} Å, mask {args.mask_diameter:g} Å, "
        "2 cores"
    )
    rows = table_rows(results)
    print_table(
        console,
        COLUMNS,
        rows,
        title,
        left=("program",),
        emphasise=lambda row: row[0].startswith("ours /"),
    )
    (work / "results.md").write_text(f"{title}\n\n{markdown(COLUMNS, rows)}")
    record = {
        "dataset": asdict(params),
        "results": {
            name: {
                "usage": asdict(r.usage),
                "reported_resolution": r.outputs.reported_resolution,
                "iterations": r.outputs.iterations,
                "scores": asdict(r.scores),
            }
            for name, r in results.items()
        },
    }
    (work / "results.json").write_text(json.dumps(record, indent=1))
    console.print(f"table written to {work / 'results.md'}", highlight=False)


if __name__ == "__main__":
    main()
