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


@app.command("refine3d")
def refine3d(
    particles: Annotated[
        Path | None,
        typer.Option(
            "--particles",
            "-i",
            help="RELION particles STAR with CTF parameters. Image names (rlnImageName) are "
            "read relative to the STAR file's folder (RELION reads them relative to where it "
            "runs: run from the STAR's folder or give it there).",
        ),
    ] = None,
    reference: Annotated[
        Path | None, typer.Option("--reference", "--ref", help="Starting map (MRC).")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config.")] = None,
    initial_lowpass: Annotated[
        float | None,
        typer.Option("--initial-lowpass", help="Low-pass of the starting map, Å (default 40)."),
    ] = None,
    absolute_greyscale: Annotated[
        bool | None,
        typer.Option(
            "--absolute-greyscale/--no-absolute-greyscale",
            help="The reference is on the particles' greyscale (no first CC iteration).",
        ),
    ] = None,
    symmetry: Annotated[
        str | None, typer.Option("--symmetry", "--sym", help="Point group (C1, C4, D2, T, O, I).")
    ] = None,
    mask_diameter: Annotated[
        float | None,
        typer.Option("--mask-diameter", help="Soft spherical mask diameter, Å (default 90 % box)."),
    ] = None,
    reference_mask: Annotated[
        Path | None, typer.Option("--reference-mask", help="Mask (MRC) for the references.")
    ] = None,
    angular_step: Annotated[
        float | None,
        typer.Option("--angular-step", help="First (global) angular step, degrees (default 7.5)."),
    ] = None,
    local_searches_from: Annotated[
        float | None,
        typer.Option(
            "--local-searches-from", help="Steps ≤ this search locally, degrees (default 3.75)."
        ),
    ] = None,
    offset_range: Annotated[
        float | None, typer.Option("--offset-range", help="Offset search range, px (default 5).")
    ] = None,
    offset_step: Annotated[
        float | None, typer.Option("--offset-step", help="Offset step, px (default 1).")
    ] = None,
    max_iterations: Annotated[
        int | None, typer.Option("--max-iterations", help="Iterations at most (default 25).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the half split.")] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", "--j", help="CPU threads (default: all).")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or auto.")] = None,
    resume: Annotated[
        bool, typer.Option("--continue", help="Resume after the last finished iteration.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the outputs of an earlier run.")
    ] = False,
) -> None:
    """Gold-standard 3D auto-refinement (RELION's 3D auto-refine): two independent halves,
    global then local searches with automatic sampling, FSC-weighted references.

    Writes particles.star, half_map_1.mrc, half_map_2.mrc, map.mrc, fsc.csv, fsc.png and
    summary.yaml into the output folder and prints the final resolution last.

    Example: cryorefine refine3d --particles particles.star --reference ref.mrc --output
    Refine3D/job001 --initial-lowpass 40 --symmetry C1 --mask-diameter 120
    """
    from cryorefine.config import load_config
    from cryorefine.programs import refine3d as program

    overrides = {
        "particles": particles,
        "reference": reference,
        "output": output,
        "initial_lowpass_angstrom": initial_lowpass,
        "absolute_greyscale": absolute_greyscale,
        "symmetry": symmetry,
        "mask_diameter_angstrom": mask_diameter,
        "reference_mask": reference_mask,
        "initial_angular_step_degrees": angular_step,
        "local_searches_from_degrees": local_searches_from,
        "offset_range_pixels": offset_range,
        "offset_step_pixels": offset_step,
        "max_iterations": max_iterations,
        "seed": seed,
        "threads": threads,
        "device": device,
        "overwrite": overwrite or None,
    }
    run_guarded(
        lambda: program.run(load_config(program.Refine3DConfig, config, overrides), resume=resume)
    )


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


@app.command("postprocess")
def postprocess(
    half_maps: Annotated[
        tuple[Path, Path] | None,
        typer.Option("--half-maps", help="The two half maps (MRC): --half-maps H1 H2."),
    ] = None,
    mask: Annotated[
        Path | None, typer.Option("--mask", help="Soft mask (MRC, values in [0, 1]).")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config.")] = None,
    pixel_size: Annotated[
        float | None, typer.Option("--pixel-size", help="Å/px (default: the maps' header).")
    ] = None,
    randomise_beyond: Annotated[
        float | None,
        typer.Option(
            "--randomise-beyond",
            help="Randomise phases from this resolution (Å) on; default: where the "
            "unmasked FSC first falls below 0.8.",
        ),
    ] = None,
    bfactor: Annotated[
        str | None,
        typer.Option(
            "--bfactor", help="B-factor in Å² (negative sharpens), or 'auto' (Guinier fit)."
        ),
    ] = None,
    autob_lowres: Annotated[
        float | None,
        typer.Option(
            "--autob-lowres",
            "--low-resolution-guinier",
            help="Lowest resolution (Å) in the Guinier fit (default 10).",
        ),
    ] = None,
    autob_highres: Annotated[
        float | None,
        typer.Option(
            "--autob-highres", help="Highest resolution (Å) in the fit (default: the final one)."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Phase randomisation seed.")] = None,
    float16: Annotated[
        bool, typer.Option("--float16", help="Write the maps as float16 (MRC mode 12).")
    ] = False,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or auto.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Write into a non-empty folder.")
    ] = False,
) -> None:
    """FSC (unmasked, masked, phase-randomised, corrected), B-factor and sharpened map.

    As relion_postprocess. Final resolution: the corrected FSC at 0.143.
    B-factor: RELION's sign (negative sharpens), by default from a Guinier fit.

    Example: cryorefine postprocess --half-maps h1.mrc h2.mrc --mask mask.mrc -o postprocess
    """
    from cryorefine.config import load_config
    from cryorefine.programs import postprocess as program

    overrides = {
        "half_maps": half_maps,
        "mask": mask,
        "output": output,
        "pixel_size_angstrom": pixel_size,
        "randomise_beyond_angstrom": randomise_beyond,
        "bfactor": bfactor,
        "autob_lowres_angstrom": autob_lowres,
        "autob_highres_angstrom": autob_highres,
        "seed": seed,
        "float16": float16 or None,
        "device": device,
        "overwrite": overwrite or None,
    }
    run_guarded(lambda: program.run(load_config(program.PostprocessConfig, config, overrides)))


@app.command("mask")
def mask(
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output mask (MRC); its config goes beside it."),
    ] = None,
    map_path: Annotated[
        Path | None,
        typer.Option("--map", help="Map to threshold (or to take box and pixel size from)."),
    ] = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Density at or above which it is 1.")
    ] = None,
    extend: Annotated[
        float | None,
        typer.Option("--extend", help="Grow the thresholded mask by this many px (< 0 shrinks)."),
    ] = None,
    soft_edge: Annotated[
        float | None, typer.Option("--soft-edge", help="Raised-cosine edge width, px.")
    ] = None,
    sphere_diameter: Annotated[
        float | None,
        typer.Option("--sphere-diameter", help="A spherical mask of this diameter, Å."),
    ] = None,
    box: Annotated[int | None, typer.Option("--box", help="Box edge of a sphere, px.")] = None,
    pixel_size: Annotated[float | None, typer.Option("--pixel-size", help="Å/px.")] = None,
    float16: Annotated[
        bool, typer.Option("--float16", help="Write the mask as float16 (MRC mode 12).")
    ] = False,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or auto.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output mask.")
    ] = False,
) -> None:
    """A soft mask from a map (threshold, extend, soft edge) or a soft sphere.

    As relion_mask_create (--ini_threshold, --extend_inimask, --width_soft_edge; --denovo).

    Example: cryorefine mask --map map.mrc --threshold 0.02 --extend 3 --soft-edge 6 -o mask.mrc

    Example: cryorefine mask --sphere-diameter 180 --box 128 --pixel-size 1.5 -o sphere.mrc
    """
    from cryorefine.config import load_config
    from cryorefine.programs import mask as program

    overrides = {
        "output": output,
        "map": map_path,
        "threshold": threshold,
        "extend_px": extend,
        "soft_edge_px": soft_edge,
        "sphere_diameter_angstrom": sphere_diameter,
        "box_size": box,
        "pixel_size_angstrom": pixel_size,
        "float16": float16 or None,
        "device": device,
        "overwrite": overwrite or None,
    }
    run_guarded(lambda: program.run(load_config(program.MaskConfig, config, overrides)))


@app.command("rebox")
def rebox(
    map_path: Annotated[Path | None, typer.Option("--map", help="Input map (MRC).")] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output map (MRC); its config goes beside it."),
    ] = None,
    box: Annotated[
        int | None, typer.Option("--box", help="New box edge, px (real-space crop/pad).")
    ] = None,
    pixel_size: Annotated[
        float | None,
        typer.Option("--pixel-size", help="New pixel size, Å (Fourier crop/pad)."),
    ] = None,
    input_pixel_size: Annotated[
        float | None,
        typer.Option("--input-pixel-size", help="The input's pixel size, Å (default: header)."),
    ] = None,
    float16: Annotated[
        bool, typer.Option("--float16", help="Write the map as float16 (MRC mode 12).")
    ] = False,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or auto.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output map.")
    ] = False,
) -> None:
    """A map in a new box and/or at a new pixel size (origin kept at N // 2).

    As relion_image_handler --rescale_angpix / --new_box: Fourier crop/pad to
    round(N p_old / p_new) voxels, then real-space crop/pad to --box.

    Example: cryorefine rebox --map map.mrc --pixel-size 2.0 --box 96 --output small.mrc
    """
    from cryorefine.config import load_config
    from cryorefine.programs import rebox as program

    overrides = {
        "map": map_path,
        "output": output,
        "box_size": box,
        "pixel_size_angstrom": pixel_size,
        "input_pixel_size_angstrom": input_pixel_size,
        "float16": float16 or None,
        "device": device,
        "overwrite": overwrite or None,
    }
    run_guarded(lambda: program.run(load_config(program.ReboxConfig, config, overrides)))


def main() -> None:
    app(args=sys.argv[1:], prog_name="cryorefine")
