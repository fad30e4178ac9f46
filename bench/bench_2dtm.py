"""cryorefine vs Leopard-EM 1.3.0: match-template and refine-template, side by side.

Usage:
    .venv/bin/python bench/bench_2dtm.py [--sizes 1024 4096] [--device cpu|cuda]
        [--work-dir DIR] [--threads N] [--no-refine] [--leopard-batch 16]

Both programs run the same Leopard-EM YAML (one per micrograph size) on the same
simulated micrograph, template, orientation ranges and defocus planes, each in its own
subprocess: `cryorefine match-template --config match.yaml --output particles.csv` and
bench/leopard_runner.py (Leopard-EM's MatchTemplateManager). Then both refine the
particles Leopard-EM found with one refine YAML (`cryorefine refine-template` and
Leopard-EM's RefineTemplateManager).

Data: cryorefine's simulator (simulate/atoms.py, simulate/micrograph.py) makes a 128³
template of the built-in 4JSV model at 1.5 Å/px and, per size, a micrograph with dark
particles (raw-data contrast) whose views lie inside the searched angle ranges.
The search is cut to a few angle ranges and coarse steps so that each run takes about
a minute on one CPU core; throughput per correlation is what is compared. "found":
true particles with a pick within 4 px. With the few dozen orientations of the 4096²
preset the per-pixel mean and standard deviation are dominated by the particle itself, so
z-scores stay below the pick threshold for both programs (the MIP still stands out).

Measured per run (os.wait4 on the child, which includes the workers it reaped):
wall time, CPU seconds (user + sys), the peak RSS of its largest process (ru_maxrss)
and the peak of the summed RSS of the whole process tree (sampled every 0.1 s; shared
pages count once per process, so an upper bound). Correlations are what each program
searched: orientations × defocus planes (× pixel sizes, × particles for refine),
from Leopard-EM's result (total_projections) and from cryorefine's output CSV or, when
it picked no particle, its config (cryorefine.programs.template_config), since the two
grids for the same steps differ in size.

Each program first runs a small baseline search (the pole's in-plane rotations only;
no orientation refinement) twice: once untimed, so that compiled kernels (Leopard-EM
uses torch.compile) and files are cached, and once timed. "corr/CPU-s beyond baseline"
= (correlations − baseline's) / (CPU s − baseline's): the throughput without the fixed
cost of starting Python, importing and loading, which otherwise counts against the
program that searched fewer correlations.

Both programs get the same thread count: OMP_NUM_THREADS = MKL_NUM_THREADS =
--threads, default 1. On a machine shared with other work, OpenMP threads that wait
at barriers for a descheduled sibling spin and burn CPU time: Leopard-EM's refine
batches took 10 times longer with 2 threads on 2 busy cores than with 1 thread, so
CPU-second figures are only comparable at one thread unless the machine is idle.

Leopard-EM is optional (see bench/requirements-leopard.txt for the install); a
missing program or a failing run is reported and left out of the table. Logs, YAMLs,
maps and CSVs stay in --work-dir; the table is also written there as results.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from rich.console import Console
from rich.table import Table

from cryorefine.io.leopard import read_leopard_csv
from cryorefine.io.mrc import read_mrc, write_mrc
from cryorefine.simulate.atoms import (
    builtin_structure_path,
    potential_from_atoms,
    read_atomic_model,
)
from cryorefine.simulate.micrograph import simulate_micrograph

BENCH = Path(__file__).resolve().parent
LEOPARD_RUNNER = BENCH / "leopard_runner.py"
PIXEL_SIZE_ANGSTROM = 1.5
TEMPLATE_SIZE = 128
EXTRACTED_BOX_SIZE = 144
DEFOCUS_U_ANGSTROM, DEFOCUS_V_ANGSTROM, DEFOCUS_ANGLE_DEGREES = 15000.0, 14500.0, 30.0
ICE_THICKNESS_ANGSTROM = 400.0
PARTICLE_SNR = 0.05
PARTICLES_PER_MEGAPIXEL = 40  # per 1024² pixels; 4096² gets 16 times as many
MATCH_RADIUS_PX = 4.0  # a pick within this of a true centre found it
LEOPARD_H100_4096_CORRELATIONS_PER_SECOND = 1650.8  # Leopard-EM's published figure


@dataclass(frozen=True)
class Search:
    """The orientation and defocus search of one micrograph size (Leopard-EM's keys)."""

    psi_step: float
    theta_step: float
    phi_max: float
    theta_max: float
    defocus_step: float = 200.0
    defocus_half_range: float = 200.0
    refine_fine_step: float = 1.5
    refine_defocus_step: float = 50.0
    refine_defocus_half_range: float = 200.0

    def baseline(self) -> Search:
        """The same search at the pole only: one view's in-plane rotations."""
        return replace(self, theta_max=0.0, phi_max=360.0)


def search_for(size: int, device: str) -> Search:
    """Preset search of a micrograph edge `size` (px): about a minute per run.

    Leopard-EM's grid sizes are multiples of 16 (its orientation batch), so every
    batch has the shape its compiled kernels were built for in the baseline run.
    """
    if device == "cuda":
        return Search(
            psi_step=1.5, theta_step=2.5, phi_max=360.0, theta_max=30.0 if size <= 2048 else 20.0
        )
    if size <= 2048:
        return Search(psi_step=7.5, theta_step=7.5, phi_max=360.0, theta_max=22.5)
    return Search(psi_step=22.5, theta_step=15.0, phi_max=120.0, theta_max=15.0)


# --------------------------------------------------------------------------- data


def make_template(path: Path) -> Path:
    """The built-in 4JSV model's potential, TEMPLATE_SIZE³ at PIXEL_SIZE_ANGSTROM."""
    if not path.exists():
        model = read_atomic_model(builtin_structure_path())
        volume = potential_from_atoms(model, TEMPLATE_SIZE, PIXEL_SIZE_ANGSTROM)
        write_mrc(path, volume, PIXEL_SIZE_ANGSTROM)
    return path


def make_micrograph(
    size: int, search: Search, template: Path, folder: Path, seed: int
) -> tuple[Path, Path]:
    """A size² micrograph with dark particles in the searched view ranges, and its truth CSV."""
    image_path, truth_path = folder / f"micrograph_{size}.mrc", folder / f"truth_{size}.csv"
    recipe_path = folder / f"micrograph_{size}.recipe"
    recipe = f"{search} seed={seed} snr={PARTICLE_SNR} template={template.stat().st_mtime_ns}"
    cached = image_path.exists() and truth_path.exists() and recipe_path.exists()
    if cached and recipe_path.read_text() == recipe:
        return image_path, truth_path
    volume = torch.from_numpy(read_mrc(template)[0])
    n = round(PARTICLES_PER_MEGAPIXEL * (size / 1024) ** 2)
    generator = torch.Generator().manual_seed(seed)

    def uniform(high: float) -> torch.Tensor:
        return high * torch.rand(n, generator=generator, dtype=torch.float64)

    orientations = torch.stack(
        [uniform(search.phi_max), uniform(search.theta_max), uniform(360.0)], 1
    )
    micrograph = simulate_micrograph(
        volume,
        PIXEL_SIZE_ANGSTROM,
        (size, size),
        n_particles=n,
        orientations_degrees=orientations,
        defocus_u_angstrom=DEFOCUS_U_ANGSTROM,
        defocus_v_angstrom=DEFOCUS_V_ANGSTROM,
        defocus_angle_degrees=DEFOCUS_ANGLE_DEGREES,
        ice_thickness_angstrom=ICE_THICKNESS_ANGSTROM,
        snr=PARTICLE_SNR,
        invert_contrast=True,
        micrograph_name=image_path.name,
        seed=seed,
    )
    micrograph.particles.to_csv(truth_path, index=False)
    write_mrc(image_path, micrograph.image, PIXEL_SIZE_ANGSTROM, overwrite=True)
    recipe_path.write_text(recipe)
    return image_path, truth_path


# --------------------------------------------------------------------------- configs


def gpu_ids(device: str) -> str | int:
    return 0 if device == "cuda" else "cpu"


def whitening_only() -> dict[str, Any]:
    return {
        "whitening_filter": {
            "enabled": True,
            "do_power_spectrum": True,
            "max_freq": 0.5,
            "num_freq_bins": None,
        },
        "bandpass_filter": {
            "enabled": False,
            "falloff": None,
            "high_freq_cutoff": None,
            "low_freq_cutoff": None,
        },
    }


def match_config(
    micrograph: Path, template: Path, maps: Path, search: Search, device: str
) -> dict[str, Any]:
    """A Leopard-EM 1.3.0 match_template YAML (as a mapping), absolute paths."""
    names = ["mip", "scaled_mip", "orientation_psi", "orientation_theta", "orientation_phi"]
    names += ["relative_defocus", "correlation_average", "correlation_variance"]
    result: dict[str, Any] = {"allow_file_overwrite": True}
    result |= {f"{name}_path": str(maps / f"{name}.mrc") for name in names}
    return {
        "template_volume_path": str(template),
        "micrograph_path": str(micrograph),
        "match_template_result": result,
        "optics_group": {
            "label": "simulated",
            "voltage": 300.0,
            "pixel_size": PIXEL_SIZE_ANGSTROM,
            "defocus_u": DEFOCUS_U_ANGSTROM,
            "defocus_v": DEFOCUS_V_ANGSTROM,
            "astigmatism_angle": DEFOCUS_ANGLE_DEGREES,
            "spherical_aberration": 2.7,
            "amplitude_contrast_ratio": 0.07,
            "phase_shift": 0.0,
            "ctf_B_factor": 0.0,
        },
        "defocus_search_config": {
            "enabled": True,
            "defocus_min": -search.defocus_half_range,
            "defocus_max": search.defocus_half_range,
            "defocus_step": search.defocus_step,
        },
        "orientation_search_config": {
            "base_grid_method": "uniform",
            "psi_step": search.psi_step,
            "theta_step": search.theta_step,
            "symmetry": None,
            "phi_min": 0.0,
            "phi_max": search.phi_max,
            "theta_min": 0.0,
            "theta_max": search.theta_max,
            "psi_min": 0.0,
            "psi_max": 360.0,
        },
        "preprocessing_filters": whitening_only(),
        "computational_config": {"gpu_ids": gpu_ids(device), "num_cpus": 1},
    }


def refine_config(
    particles: Path, template: Path, search: Search, device: str, refine_orientations: bool = True
) -> dict[str, Any]:
    """A Leopard-EM 1.3.0 refine_template YAML (as a mapping): ± one coarse step around
    each particle's pose at `refine_fine_step`, and the defocus planes of `search`."""
    return {
        "template_volume_path": str(template),
        "particle_stack": {
            "df_path": str(particles),
            "extracted_box_size": [EXTRACTED_BOX_SIZE, EXTRACTED_BOX_SIZE],
            "original_template_size": [TEMPLATE_SIZE, TEMPLATE_SIZE],
        },
        "defocus_refinement_config": {
            "enabled": True,
            "defocus_min": -search.refine_defocus_half_range,
            "defocus_max": search.refine_defocus_half_range,
            "defocus_step": search.refine_defocus_step,
        },
        "orientation_refinement_config": {
            "enabled": refine_orientations,
            "psi_step_coarse": search.psi_step,
            "psi_step_fine": search.refine_fine_step,
            "theta_step_coarse": search.theta_step,
            "theta_step_fine": search.refine_fine_step,
        },
        "pixel_size_refinement_config": {"enabled": False},
        "preprocessing_filters": whitening_only(),
        "computational_config": {"gpu_ids": gpu_ids(device), "num_cpus": 1},
        "apply_global_filtering": True,
        "movie_config": {"enabled": False},
    }


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Usage:
    """What one child process (and the workers it reaped) used."""

    wall_seconds: float
    cpu_seconds: float
    peak_rss_mib: float  # largest single process (ru_maxrss)
    peak_tree_rss_mib: float  # summed over the process tree, sampled
    returncode: int


def _parents() -> dict[int, int]:
    """Parent of every process now running (from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
    return parents


def tree_rss_bytes(root: int) -> int:
    """Summed resident memory of `root` and all its descendants, bytes."""
    parents = _parents()
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as statm:
                total += int(statm.read().split()[1])
        except OSError:
            continue
    return total * resource.getpagesize()


def run_measured(
    command: Sequence[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> Usage:
    """Run `command` (in `cwd`) to the end, its output to `log`; measure it with os.wait4."""
    with log.open("w") as output:
        output.write("$ " + ("" if cwd is None else f"cd {cwd} && ") + " ".join(command) + "\n")
        output.flush()
        start = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )
        peak_tree = 0
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            peak_tree = max(peak_tree, tree_rss_bytes(process.pid))
            time.sleep(0.1)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return Usage(
        wall_seconds=wall,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_rss_mib=usage.ru_maxrss / 1024,  # KiB on Linux
        peak_tree_rss_mib=peak_tree / 2**20,
        returncode=process.returncode,
    )


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


# --------------------------------------------------------------------------- programs


def leopard_available() -> bool:
    return importlib.util.find_spec("leopard_em") is not None


def cryorefine_executable() -> Path:
    return Path(sys.executable).parent / "cryorefine"


def cryorefine_has(program: str) -> bool:
    """Whether `cryorefine <program> --help` works (the command exists)."""
    executable = cryorefine_executable()
    if not executable.exists():
        return False
    done = subprocess.run([str(executable), program, "--help"], capture_output=True, check=False)
    return done.returncode == 0


def leopard_command(
    program: str, config: Path, output: Path, result: Path, batch: int
) -> list[str]:
    command = [sys.executable, str(LEOPARD_RUNNER), program, str(config), "--output", str(output)]
    command += ["--result", str(result)]
    command += ["--orientation-batch-size" if program == "match" else "--batch-size", str(batch)]
    return command


def cryorefine_command(program: str, config: Path, output: Path) -> list[str]:
    return [str(cryorefine_executable()), program, "--config", str(config), "--output", str(output)]


def cryorefine_match_count(config: dict[str, Any], output: Path) -> int:
    """Correlations cryorefine searched: its CSV's total_correlations, else its config's grid."""
    if output.exists():
        table = pd.read_csv(output)
        if len(table) and "total_correlations" in table.columns:
            return int(table["total_correlations"].iloc[0])
    from cryorefine.programs.template_config import DefocusSearchConfig, OrientationSearchConfig

    orientations = OrientationSearchConfig(**config["orientation_search_config"]).orientations()
    planes = DefocusSearchConfig(**config["defocus_search_config"]).defocus_values()
    return int(orientations.shape[0]) * int(planes.numel())


def cryorefine_refine_count(config: dict[str, Any], n_particles: int) -> int:
    """Box correlations of cryorefine's refine: particles × offsets × defoci × pixel sizes."""
    from cryorefine.programs.template_config import (
        DefocusSearchConfig,
        PixelSizeSearchConfig,
        RefineOrientationConfig,
    )

    offsets = RefineOrientationConfig(**config["orientation_refinement_config"]).rotation_offsets()
    defoci = DefocusSearchConfig(**config["defocus_refinement_config"]).defocus_values()
    pixels = PixelSizeSearchConfig(**config["pixel_size_refinement_config"]).pixel_size_values()
    return n_particles * int(offsets.shape[0]) * int(defoci.numel()) * int(pixels.numel())


def found_particles(picks: Path, truth: Path) -> tuple[int, int, int]:
    """(true particles with a pick within MATCH_RADIUS_PX, picks, true particles)."""
    true_table = pd.read_csv(truth)
    centres = torch.tensor(true_table[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy())
    if not picks.exists() or picks.stat().st_size == 0:
        return 0, 0, len(true_table)
    table = pd.read_csv(picks)
    if not len(table):
        return 0, 0, len(true_table)
    canonical = read_leopard_csv(picks, template_size=TEMPLATE_SIZE)
    picked = torch.tensor(canonical[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(dtype=float))
    distance = torch.cdist(centres.double(), picked.double())
    found = int((distance.min(dim=1).values <= MATCH_RADIUS_PX).sum())
    return found, len(canonical), len(true_table)


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Measurement:
    """One program's measured run and its timed baseline."""

    task: str
    program: str
    correlations: int
    usage: Usage
    baseline_correlations: int
    baseline: Usage
    found: str = ""

    def rate(self) -> float:
        return self.correlations / self.usage.cpu_seconds

    def marginal_rate(self) -> float:
        extra_cpu = self.usage.cpu_seconds - self.baseline.cpu_seconds
        extra = self.correlations - self.baseline_correlations
        return extra / extra_cpu if extra_cpu > 0 and extra > 0 else math.nan

    def wall_rate(self) -> float:
        return self.correlations / self.usage.wall_seconds


class RunFailedError(RuntimeError):
    """A measured program exited with an error (its log says why)."""


STEPS = ("warmup", "baseline", "main")


@dataclass(frozen=True)
class StepRun:
    """One run of a program: what it used, its CSV and (Leopard-EM) its JSON counts."""

    usage: Usage
    output: Path
    result: Path


def run_steps(
    console: Console,
    program: str,
    task: str,
    configs: dict[str, Path],
    folder: Path,
    args: argparse.Namespace,
) -> dict[str, StepRun]:
    """Untimed warm-up (baseline config), timed baseline, timed main run of one program.

    Args:
        task: "match" or "refine".
        configs: the YAML of the "baseline" and of the "main" run.

    Raises:
        RunFailedError: a run exited with an error.
    """
    env = child_env(args.threads)
    batch = args.leopard_batch if task == "match" else args.leopard_refine_batch
    runs = {}
    for step in STEPS:
        config = configs["main" if step == "main" else "baseline"]
        output, result = folder / f"{program}_{step}.csv", folder / f"{program}_{step}.json"
        for stale in (output, output.with_suffix(".star"), result):
            stale.unlink(missing_ok=True)
        if program == "cryorefine":
            command = cryorefine_command(f"{task}-template", config, output)
        else:
            command = leopard_command(task, config, output, result, batch)
        label = f"{folder.name}_{program}_{step}"
        log = args.work_dir / "logs" / f"{label}.log"
        console.print(f"  {label} ... ", end="", highlight=False)
        usage = run_measured(command, env, log)
        console.print(
            f"{usage.wall_seconds:.1f} s wall, {usage.cpu_seconds:.1f} CPU-s", highlight=False
        )
        if usage.returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise RunFailedError(f"{label} failed (exit {usage.returncode}), see {log}:\n{tail}")
        runs[step] = StepRun(usage, output, result)
    return runs


def leopard_correlations(path: Path) -> int:
    """The correlations Leopard-EM searched, from bench/leopard_runner.py's JSON."""
    return int(json.loads(path.read_text())["correlations"])


def bench_match(
    console: Console,
    size: int,
    args: argparse.Namespace,
    template: Path,
    programs: list[str],
) -> tuple[list[Measurement], Path | None]:
    """Match one size with each program; returns the measurements and Leopard's CSV."""
    search = search_for(size, args.device)
    micrograph, truth = make_micrograph(size, search, template, args.work_dir / "data", args.seed)
    folder = args.work_dir / f"match_{size}"
    folder.mkdir(exist_ok=True)
    configs = {
        "main": match_config(micrograph, template, folder / "maps", search, args.device),
        "baseline": match_config(
            micrograph, template, folder / "baseline_maps", search.baseline(), args.device
        ),
    }
    paths = {step: write_yaml(folder / f"{step}.yaml", c) for step, c in configs.items()}
    measurements: list[Measurement] = []
    leopard_csv = None
    # cryorefine first: the maps Leopard-EM's particle CSV points at are then its own.
    for program in programs:
        try:
            runs = run_steps(console, program, "match", paths, folder, args)
        except RunFailedError as error:
            console.print(f"[red]{error}[/]")
            continue
        main_run, baseline_run = runs["main"], runs["baseline"]
        if program == "cryorefine":
            correlations = cryorefine_match_count(configs["main"], main_run.output)
            baseline = cryorefine_match_count(configs["baseline"], baseline_run.output)
        else:
            correlations = leopard_correlations(main_run.result)
            baseline = leopard_correlations(baseline_run.result)
            leopard_csv = main_run.output
        found, picks, true = found_particles(main_run.output, truth)
        measurements.append(
            Measurement(
                f"match {size}²",
                program,
                correlations,
                main_run.usage,
                baseline,
                baseline_run.usage,
                found=f"{found}/{true} ({picks} picks)",
            )
        )
    return measurements, leopard_csv


def bench_refine(
    console: Console,
    size: int,
    args: argparse.Namespace,
    template: Path,
    particles: Path,
    programs: list[str],
) -> list[Measurement]:
    """Refine Leopard-EM's picks of the size² micrograph with each program."""
    search = search_for(size, args.device)
    n_particles = len(pd.read_csv(particles))
    if n_particles == 0:
        console.print("[yellow]refine skipped: Leopard-EM picked no particle[/]")
        return []
    folder = args.work_dir / f"refine_{size}"
    folder.mkdir(exist_ok=True)
    configs = {
        "main": refine_config(particles, template, search, args.device),
        "baseline": refine_config(
            particles, template, search, args.device, refine_orientations=False
        ),
    }
    paths = {step: write_yaml(folder / f"{step}.yaml", c) for step, c in configs.items()}
    measurements = []
    for program in programs:
        try:
            runs = run_steps(console, program, "refine", paths, folder, args)
        except RunFailedError as error:
            console.print(f"[red]{error}[/]")
            continue
        if program == "cryorefine":
            correlations = cryorefine_refine_count(configs["main"], n_particles)
            baseline = cryorefine_refine_count(configs["baseline"], n_particles)
        else:
            correlations = leopard_correlations(runs["main"].result)
            baseline = leopard_correlations(runs["baseline"].result)
        measurements.append(
            Measurement(
                f"refine {n_particles} particles",
                program,
                correlations,
                runs["main"].usage,
                baseline,
                runs["baseline"].usage,
            )
        )
    return measurements


# --------------------------------------------------------------------------- table

COLUMNS = (
    "task",
    "program",
    "correlations",
    "wall s",
    "CPU s",
    "corr/CPU-s",
    "corr/CPU-s beyond baseline",
    "corr/s (wall)",
    "peak RSS MiB (largest process)",
    "peak RSS MiB (process tree)",
    "found",
)


def _number(value: float, digits: int = 1) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"


def rows(measurements: list[Measurement]) -> list[list[str]]:
    """Table rows: each program, then the ratio ours / Leopard-EM per task."""
    out: list[list[str]] = []
    tasks = list(dict.fromkeys(m.task for m in measurements))
    for task in tasks:
        by_program = {m.program: m for m in measurements if m.task == task}
        for program, m in by_program.items():
            name = "cryorefine" if program == "cryorefine" else "Leopard-EM 1.3.0"
            out.append(
                [
                    task,
                    name,
                    f"{m.correlations:,}",
                    _number(m.usage.wall_seconds),
                    _number(m.usage.cpu_seconds),
                    _number(m.rate()),
                    _number(m.marginal_rate()),
                    _number(m.wall_rate()),
                    _number(m.usage.peak_rss_mib, 0),
                    _number(m.usage.peak_tree_rss_mib, 0),
                    m.found,
                ]
            )
        if {"cryorefine", "leopard"} <= by_program.keys():
            ours, theirs = by_program["cryorefine"], by_program["leopard"]
            out.append(
                [
                    task,
                    "ratio ours / Leopard",
                    "",
                    "",
                    "",
                    f"{ours.rate() / theirs.rate():.2f}×",
                    f"{ours.marginal_rate() / theirs.marginal_rate():.2f}×",
                    f"{ours.wall_rate() / theirs.wall_rate():.2f}×",
                    f"{ours.usage.peak_rss_mib / theirs.usage.peak_rss_mib:.2f}×",
                    f"{ours.usage.peak_tree_rss_mib / theirs.usage.peak_tree_rss_mib:.2f}×",
                    "",
                ]
            )
    return out


def markdown(columns: Sequence[str], rows: list[list[str]]) -> str:
    """A Markdown table of `rows` under the header `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_table(
    console: Console,
    columns: Sequence[str],
    rows: list[list[str]],
    title: str,
    left: Collection[str] = (),
    emphasise: Callable[[list[str]], bool] = lambda row: False,
) -> None:
    """A rich table: the `left` columns left-aligned, the others right; `emphasise`d rows bold."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    for row in rows:
        table.add_row(*row, style="bold" if emphasise(row) else None)
    console.print(table)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1024, 4096], help="micrograph edges, px"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--work-dir", type=Path, default=Path("bench_2dtm_work"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per program")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-refine", action="store_true", help="skip refine-template")
    parser.add_argument(
        "--refine-size",
        type=int,
        default=None,
        help="refine the picks of this size (default: smallest)",
    )
    parser.add_argument(
        "--leopard-batch", type=int, default=16, help="Leopard-EM's orientation batch"
    )
    parser.add_argument(
        "--leopard-refine-batch", type=int, default=32, help="Leopard-EM's refine batch"
    )
    parser.add_argument(
        "--programs",
        nargs="+",
        choices=["cryorefine", "leopard"],
        default=["cryorefine", "leopard"],
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console() if Console().is_terminal else Console(width=220)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here.")
    args.work_dir = args.work_dir.resolve()
    for sub in ("data", "logs"):
        (args.work_dir / sub).mkdir(parents=True, exist_ok=True)
    match_programs, refine_programs = [], []
    for program in args.programs:
        if program == "leopard" and not leopard_available():
            console.print(
                "[yellow]Leopard-EM is not installed: see bench/requirements-leopard.txt[/]"
            )
            continue
        if program == "cryorefine":
            if cryorefine_has("match-template"):
                match_programs.append(program)
            else:
                console.print("[yellow]cryorefine match-template is not available: skipped[/]")
            if cryorefine_has("refine-template"):
                refine_programs.append(program)
            else:
                console.print("[yellow]cryorefine refine-template is not available: skipped[/]")
            continue
        match_programs.append(program)
        refine_programs.append(program)

    template = make_template(args.work_dir / "data" / "template.mrc")
    console.print(
        f"[bold]2DTM bench[/]: sizes {args.sizes}, device {args.device}, "
        f"{args.threads} threads per program, work dir {args.work_dir}",
        highlight=False,
    )
    measurements: list[Measurement] = []
    leopard_picks: dict[int, Path] = {}
    for size in args.sizes:
        found, picks = bench_match(console, size, args, template, match_programs)
        measurements += found
        if picks is not None:
            leopard_picks[size] = picks
    refine_size = args.refine_size or min(args.sizes)
    if not args.no_refine and refine_programs:
        if refine_size in leopard_picks:
            measurements += bench_refine(
                console, refine_size, args, template, leopard_picks[refine_size], refine_programs
            )
        else:
            console.print(
                f"[yellow]refine skipped: no Leopard-EM picks of the {refine_size}² micrograph[/]"
            )

    table_rows = rows(measurements)
    title = f"cryorefine vs Leopard-EM 1.3.0, {args.device}, {args.threads} threads each"
    print_table(
        console,
        COLUMNS,
        table_rows,
        title,
        left=("task", "program", "found"),
        emphasise=lambda row: row[1].startswith("ratio"),
    )
    command = "$ .venv/bin/python bench/bench_2dtm.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    notes = f"\n{command}\n"
    if args.device == "cuda":
        notes += (
            f"Leopard-EM's published H100 figure at 4096²: "
            f"{LEOPARD_H100_4096_CORRELATIONS_PER_SECOND} correlations/s.\n"
        )
    console.print(notes, highlight=False)
    text = f"### {title}\n\n{markdown(COLUMNS, table_rows)}{notes}"
    (args.work_dir / "results.md").write_text(text)


if __name__ == "__main__":
    main()
