"""The `cryorefine` command: one typer sub-command per program in cryorefine.programs.

Each command only parses flags into the program's config model and calls its
`run(config)`; a `CryorefineError` becomes one red line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console

from cryorefine import __version__
from cryorefine.errors import CryorefineError

app = typer.Typer(
    name="cryorefine",
    help="Template-based cryo-EM particle finding and refinement (PyTorch, CPU or CUDA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
error_console = Console(stderr=True)
ResultT = TypeVar("ResultT")


def run_guarded(job: Callable[[], ResultT]) -> ResultT:
    """Run a program, turning a user-facing error into one line and exit code 2."""
    try:
        return job()
    except CryorefineError as error:
        error_console.print(f"[bold red]error:[/] {error.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryorefine {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Template-based cryo-EM particle finding and refinement."""


@app.command("simulate")
def simulate(
    config: Annotated[Path | None, typer.Option("--config", help="YAML config.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Write into a non-empty folder.")
    ] = False,
    structure: Annotated[
        Path | None, typer.Option("--structure", help="PDB/mmCIF model (default: built-in).")
    ] = None,
    pixel_size: Annotated[float | None, typer.Option("--pixel-size", help="Å/px.")] = None,
    box_size: Annotated[int | None, typer.Option("--box-size", help="Template box, px.")] = None,
    n_particles: Annotated[int | None, typer.Option("--n-particles", help="Stack size.")] = None,
    n_micrographs: Annotated[
        int | None, typer.Option("--n-micrographs", help="Number of micrographs.")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or auto.")] = None,
) -> None:
    """Write a synthetic dataset with known truth: template, particle stack, micrographs.

    Example: cryorefine simulate --output sim --seed 1 --n-particles 100
    """
    from cryorefine.config import load_config
    from cryorefine.programs import simulate as program

    overrides = {
        "output": output,
        "seed": seed,
        "overwrite": overwrite or None,
        "structure": structure,
        "pixel_size_angstrom": pixel_size,
        "box_size": box_size,
        "n_particles": n_particles,
        "n_micrographs": n_micrographs,
        "device": device,
    }
    run_guarded(lambda: program.run(load_config(program.SimulateConfig, config, overrides)))


@app.command("reconstruct")
def reconstruct(
    particles: Annotated[
        Path | None,
        typer.Option(
            "--particles",
            "-i",
            help="RELION particles STAR file with poses, origins and CTF. Image names "
            "(rlnImageName) are read relative to the STAR file's folder.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output map (MRC); map.config.yaml goes beside it."),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config.")] = None,
    symmetry: Annotated[
        str | None, typer.Option("--symmetry", help="Point group, RELION names (C1, D2, O, I).")
    ] = None,
    pad_factor: Annotated[
        float | None, typer.Option("--pad-factor", help="Fourier padding (≥ 1; default 2).")
    ] = None,
    ctf: Annotated[
        bool | None,
        typer.Option("--ctf/--no-ctf", help="CTF-weighted (default), as relion_reconstruct --ctf."),
    ] = None,
    subset: Annotated[
        int | None, typer.Option("--subset", help="Only particles with this rlnRandomSubset (1|2).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Images per batch (memory).")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or auto.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output map.")
    ] = False,
) -> None:
    """Reconstruct a 3D map from particles with known poses (Fourier insertion, CTF²-weighted).

    The pixel size is the STAR file's rlnImagePixelSize (data_optics); stack headers
    are not trusted (relion_preprocess writes 1.0 there).

    Example: cryorefine reconstruct --particles run_data.star --output map.mrc --symmetry D2
    """
    from cryorefine.config import load_config
    from cryorefine.programs import reconstruct as program

    overrides = {
        "particles": particles,
        "output": output,
        "symmetry": symmetry,
        "pad_factor": pad_factor,
        "ctf": ctf,
        "subset": subset,
        "batch_size": batch_size,
        "device": device,
        "overwrite": overwrite or None,
    }
    run_guarded(lambda: program.run(load_config(program.ReconstructConfig, config, overrides)))


_TEMPLATE_CONFIG_HELP = (
    "YAML config: Leopard-EM's schema (its YAML runs unchanged) plus cryorefine's "
    "optional keys. Relative paths are read from the config file's folder."
)


@app.command("match-template")
def match_template(
    config: Annotated[Path, typer.Option("--config", help=_TEMPLATE_CONFIG_HELP)],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Particle table (Leopard-EM CSV); the RELION STAR and the resolved "
            "config go beside it. The maps go where match_template_result says.",
        ),
    ] = Path("particles.csv"),
    resume: Annotated[
        bool,
        typer.Option("--continue", help="Resume an interrupted search from its checkpoints."),
    ] = False,
) -> None:
    """2D template matching: search a 3D template over orientations and defocus planes.

    Example: cryorefine match-template --config match.yaml --output particles.csv
    """
    from cryorefine.programs import match_template as program
    from cryorefine.programs.template_config import MatchTemplateConfig, load_template_config

    def job() -> object:
        settings = load_template_config(MatchTemplateConfig, config)
        result = program.run(settings, output, resume=resume)
        typer.echo(
            f"{len(result.particles)} particles in {len(result.jobs)} micrograph(s), "
            f"z > {result.threshold:.2f}, {result.seconds:.1f} s -> {result.csv_path}"
        )
        return result

    run_guarded(job)


@app.command("refine-template")
def refine_template(
    config: Annotated[Path, typer.Option("--config", help=_TEMPLATE_CONFIG_HELP)],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Refined table (Leopard-EM CSV); STAR and config beside it."
        ),
    ] = Path("refined.csv"),
) -> None:
    """Refine each particle's orientation, defocus, pixel size and position locally.

    Example: cryorefine refine-template --config refine.yaml --output refined.csv
    """
    from cryorefine.programs import refine_template as program
    from cryorefine.programs.template_config import RefineTemplateConfig, load_template_config

    def job() -> object:
        settings = load_template_config(RefineTemplateConfig, config)
        result = program.run(settings, output)
        typer.echo(
            f"refined {len(result.particles)} particles, {result.seconds:.1f} s -> "
            f"{result.csv_path}"
        )
        return result

    run_guarded(job)


@app.command("optimize-template")
def optimize_template(
    config: Annotated[Path, typer.Option("--config", help=_TEMPLATE_CONFIG_HELP)],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Pixel size vs mean SNR (CSV); .report.yaml beside it."
        ),
    ] = Path("optimize.csv"),
) -> None:
    """Find the template pixel size that maximises the particles' mean SNR (coarse, then fine).

    Example: cryorefine optimize-template --config optimize.yaml --output optimize.csv
    """
    from cryorefine.programs import optimize_template as program
    from cryorefine.programs.template_config import OptimizeTemplateConfig, load_template_config

    def job() -> object:
        settings = load_template_config(OptimizeTemplateConfig, config)
        result = program.run(settings, output)
        typer.echo(f"best template pixel size {result.best_pixel_size:.4f} Å -> {result.csv_path}")
        return result

    run_guarded(job)


@app.command("demo")
def demo(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Write into a non-empty folder.")
    ] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    n_particles: Annotated[
        int | None, typer.Option("--n-particles", help="Particles in the micrograph.")
    ] = None,
    snr: Annotated[float | None, typer.Option("--snr", help="Particle SNR.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config.")] = None,
) -> None:
    """Simulate a micrograph of a real structure, match and refine it, compare with the truth.

    Example: cryorefine demo --output demo_output
    """
    from cryorefine.config import load_config
    from cryorefine.programs import demo as program

    overrides = {
        "output": output,
        "overwrite": overwrite or None,
        "seed": seed,
        "n_particles": n_particles,
        "snr": snr,
    }
    run_guarded(lambda: program.run(load_config(program.DemoConfig, config, overrides)))


def main() -> None:
    app(args=sys.argv[1:], prog_name="cryorefine")
