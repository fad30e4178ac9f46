"""`cryorefine postprocess`: resolution and sharpened map from two half maps and a mask.

What RELION 3.1's relion_postprocess does (engine.postprocess has the math):

1. FSC of the unmasked half maps, of the masked ones (FSC_t), and of the masked
   half maps with their phases randomised (FSC_n) from the first shell where the
   unmasked FSC is below 0.8 (or from --randomise-beyond Å), seeded.
2. FSC_true = (FSC_t − FSC_n) / (1 − FSC_n) (Chen et al. 2013), from two shells
   beyond the first randomised one on, as RELION 3.1 does (the shells right after
   it carry correlation leaked from the kept ones; checked on its output); the
   final resolution is where FSC_true falls below 0.143 (interpolated between
   shells; RELION reports the last shell above).
3. The B-factor: given (--bfactor, Å²), or fitted (--bfactor auto) as 4 × the slope
   of ln(mean |F|) against s² between --autob-lowres (10 Å) and the final
   resolution (Rosenthal & Henderson 2003), on the masked average of the half maps.
   By default the amplitudes are FSC-weighted first, as RELION does: the weight
   √(2 FSC / (1 + FSC)) turns the expected power of the noisy average into that of
   the signal, so the noise floor does not flatten the fit.
4. The sharpened map = average × exp(−B s² / 4) × √(2 FSC_true / (1 + FSC_true)),
   low-pass filtered at the final resolution with a raised-cosine edge 2 shells
   wide. RELION's sign: B < 0 sharpens (a fit gives B ≈ −B_blur for a map blurred
   by exp(−B_blur s² / 4)).

Outputs in the output folder: postprocess.mrc (sharpened), postprocess_masked.mrc
(× mask), fsc.csv, fsc.png, guinier.csv, summary.yaml and config.yaml. Every input
is checked before any compute: both half maps cubic, of one shape and voxel size; the
mask of that shape, its values within [0, 1]; the output folder empty (or
--overwrite). The final resolution is printed as the last line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import Field, model_validator
from rich.console import Console

from cryorefine.config import Config, save_resolved_config
from cryorefine.engine.fsc import (
    fourier_shell_correlation,
    resolution_at_threshold,
    shell_frequencies,
)
from cryorefine.engine.postprocess import (
    GuinierFit,
    corrected_fsc,
    fsc_weighting,
    guinier_fit,
    randomisation_shell,
    randomise_phases,
    sharpen,
    shell_at_resolution,
    shell_mean_amplitude,
)
from cryorefine.errors import CryorefineError
from cryorefine.io.atomic import atomic_write_text, refuse_nonempty_folder
from cryorefine.io.mrc import MrcInfo, write_mrc
from cryorefine.io.volumes import cubic_map_info, map_pixel_size, read_map
from cryorefine.parallel.device import resolve_device
from cryorefine.report.fsc_plot import plot_fsc_curves

#: RELION 3.1 corrects the FSC from this many shells beyond the first randomised one.
CORRECTION_OFFSET_SHELLS = 2
#: Mask values may stray this far outside [0, 1] (float16 files, interpolation).
MASK_TOLERANCE = 1e-3
#: Relative difference between voxel sizes taken as a mismatch.
VOXEL_SIZE_TOLERANCE = 1e-3


class PostprocessConfig(Config):
    """What `cryorefine postprocess` does. Lengths in Å, B-factors in Å²."""

    half_maps: tuple[Path, Path] = Field(
        description="The two independent half maps (MRC), e.g. run_half1_class001_unfil.mrc "
        "and run_half2_class001_unfil.mrc."
    )
    mask: Path = Field(description="Soft mask (MRC, values in [0, 1]) of the half maps' box.")
    output: Path = Field(Path("postprocess"), description="Output folder (created).")
    pixel_size_angstrom: float | None = Field(
        None, gt=0, description="Pixel size, Å; the half maps' header by default."
    )
    randomise_beyond_angstrom: float | None = Field(
        None,
        gt=0,
        description="Randomise phases from this resolution on, Å; by default from where "
        "the unmasked FSC first falls below randomise_at_fsc.",
    )
    randomise_at_fsc: float = Field(
        0.8, gt=0, lt=1, description="Unmasked FSC below which phases are randomised."
    )
    bfactor: float | Literal["auto"] = Field(
        "auto",
        description="B-factor to apply, Å² (negative sharpens, RELION's sign), or 'auto' "
        "for a Guinier fit.",
    )
    autob_lowres_angstrom: float = Field(
        10.0, gt=0, description="Lowest resolution in the Guinier fit, Å."
    )
    autob_highres_angstrom: float | None = Field(
        None,
        gt=0,
        description="Highest resolution in the Guinier fit, Å; the final one by default.",
    )
    guinier_fsc_weighted: bool = Field(
        True,
        description="Fit FSC-weighted amplitudes (as RELION), not raw ones (which the noise "
        "floor flattens).",
    )
    guinier_masked: bool = Field(
        True,
        description="Fit the masked average; false: the unmasked one, as RELION 3.1 does "
        "(its solvent noise flattens the fall-off: a smaller |B|).",
    )
    fsc_threshold: float = Field(
        0.143, gt=0, lt=1, description="FSC_true value that defines the final resolution."
    )
    filter_edge_width_shells: float = Field(
        2.0, ge=0, description="Width of the low-pass raised-cosine edge, Fourier shells."
    )
    seed: int = Field(0, ge=0, description="Seed of the phase randomisation.")
    float16: bool = Field(False, description="Write the maps as float16 (MRC mode 12).")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto.")
    overwrite: bool = Field(False, description="Write into an existing non-empty folder.")

    @model_validator(mode="after")
    def _fit_range(self) -> PostprocessConfig:
        high = self.autob_highres_angstrom
        if high is not None and high >= self.autob_lowres_angstrom:
            raise ValueError(
                f"autob_highres_angstrom ({high}) must be a finer resolution (smaller) than "
                f"autob_lowres_angstrom ({self.autob_lowres_angstrom})"
            )
        return self


@dataclass(frozen=True)
class PostprocessResult:
    """What `run` found and wrote."""

    output: Path
    final_resolution_angstrom: float
    bfactor_angstrom2: float
    randomised_from_shell: int
    fsc: pd.DataFrame
    guinier: GuinierFit | None
    files: dict[str, Path]


@dataclass(frozen=True)
class _Inputs:
    half1: MrcInfo
    half2: MrcInfo
    mask: MrcInfo
    mask_values: torch.Tensor
    pixel_size_angstrom: float


def _same_voxel_size(a: float, b: float) -> bool:
    return abs(a - b) <= VOXEL_SIZE_TOLERANCE * max(abs(a), abs(b))


def _read_inputs(config: PostprocessConfig, device: torch.device) -> _Inputs:
    """Every check that needs the files, before any compute."""
    half1 = cubic_map_info(config.half_maps[0], "half map 1")
    half2 = cubic_map_info(config.half_maps[1], "half map 2")
    if half1.shape != half2.shape:
        raise CryorefineError(
            f"the half maps differ in size: {half1.shape[0]}³ in {half1.path}, "
            f"{half2.shape[0]}³ here.",
            path=half2.path,
            fix="give the two half maps of one refinement.",
        )
    if not _same_voxel_size(half1.voxel_size_angstrom, half2.voxel_size_angstrom):
        raise CryorefineError(
            f"the half maps differ in voxel size: {half1.voxel_size_angstrom:g} Å in "
            f"{half1.path}, {half2.voxel_size_angstrom:g} Å here.",
            path=half2.path,
            fix="give the two half maps of one refinement (or rescale one: cryorefine rebox).",
        )
    pixel = map_pixel_size(half1, config.pixel_size_angstrom, "half map 1")
    mask = cubic_map_info(config.mask, "mask")
    if mask.shape != half1.shape:
        raise CryorefineError(
            f"the mask is {mask.shape[0]}³ voxels, the half maps {half1.shape[0]}³.",
            path=mask.path,
            fix="make the mask on the half maps' box (cryorefine mask, or cryorefine rebox).",
        )
    headers = (mask.voxel_size_angstrom, half1.voxel_size_angstrom)
    if all(v > 0 for v in headers) and not _same_voxel_size(*headers):
        raise CryorefineError(
            f"the mask's voxel size is {headers[0]:g} Å, the half maps' {headers[1]:g} Å.",
            path=mask.path,
            fix="make the mask at the half maps' pixel size (cryorefine rebox --pixel-size).",
        )
    values = read_map(mask, device)
    low, high = float(values.min()), float(values.max())
    if low < -MASK_TOLERANCE or high > 1.0 + MASK_TOLERANCE:
        raise CryorefineError(
            f"mask values must lie in [0, 1] (1 protein, 0 solvent); they span "
            f"{low:.4g} .. {high:.4g}.",
            path=mask.path,
            fix="give a soft mask, e.g. from cryorefine mask --threshold.",
        )
    if high <= 0:
        raise CryorefineError(
            "the mask is empty (all 0).",
            path=mask.path,
            fix="give a mask that covers the particle.",
        )
    return _Inputs(half1, half2, mask, values.clamp(0.0, 1.0), pixel)


def _describe(config: PostprocessConfig, inputs: _Inputs, device: torch.device) -> str:
    size = inputs.half1.shape[0]
    randomise = (
        f"from {config.randomise_beyond_angstrom:g} Å"
        if config.randomise_beyond_angstrom is not None
        else f"where the unmasked FSC < {config.randomise_at_fsc:g}"
    )
    bfactor = (
        f"Guinier fit from {config.autob_lowres_angstrom:g} Å"
        if config.bfactor == "auto"
        else f"B = {config.bfactor:g} Å²"
    )
    return (
        f"[bold]cryorefine postprocess[/]: {inputs.half1.path} + {inputs.half2.path} "
        f"({size}³ at {inputs.pixel_size_angstrom:g} Å/px), mask {inputs.mask.path}; "
        f"phases randomised {randomise} (seed {config.seed}); {bfactor}; "
        f"device {device} -> {config.output}"
    )


def _fsc(map_a: torch.Tensor, map_b: torch.Tensor) -> torch.Tensor:
    return fourier_shell_correlation(map_a, map_b, ndim=3)


def _resolution(
    fsc: torch.Tensor, frequencies: torch.Tensor, pixel: float, threshold: float
) -> float:
    return float(resolution_at_threshold(fsc, frequencies, pixel, threshold))


def _shell_resolutions(frequency_per_angstrom: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(frequency_per_angstrom > 0, 1.0 / frequency_per_angstrom, np.inf)


def _log(values: torch.Tensor) -> np.ndarray:
    array = values.double().cpu().numpy()
    with np.errstate(divide="ignore"):
        return np.where(array > 0, np.log(np.where(array > 0, array, 1.0)), np.nan)


def _fit_bfactor(
    config: PostprocessConfig, amplitude: torch.Tensor, s: torch.Tensor, final: float
) -> GuinierFit:
    high = config.autob_highres_angstrom or final
    try:
        return guinier_fit(amplitude, s, config.autob_lowres_angstrom, high)
    except ValueError as error:
        raise CryorefineError(
            f"cannot fit a B-factor: {error}.",
            path=config.half_maps[0],
            field="bfactor",
            fix="give a B-factor (--bfactor, e.g. -100), or widen the fit range "
            "(--autob-lowres, --autob-highres).",
        ) from None


def _fsc_curves(
    config: PostprocessConfig,
    half1: torch.Tensor,
    half2: torch.Tensor,
    mask: torch.Tensor,
    pixel: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Unmasked, masked, phase-randomised masked and corrected FSC; first randomised shell."""
    size = half1.shape[-1]
    fsc_unmasked = _fsc(half1, half2)
    fsc_masked = _fsc(half1 * mask, half2 * mask)
    if config.randomise_beyond_angstrom is not None:
        from_shell = shell_at_resolution(config.randomise_beyond_angstrom, size, pixel)
    else:
        from_shell = randomisation_shell(fsc_unmasked, config.randomise_at_fsc)
    # A CPU generator: the same random phases on CPU and CUDA.
    generator = torch.Generator().manual_seed(config.seed)
    random1 = randomise_phases(half1, from_shell, generator)
    random2 = randomise_phases(half2, from_shell, generator)
    fsc_randomised = _fsc(random1 * mask, random2 * mask)
    fsc_true = corrected_fsc(fsc_masked, fsc_randomised, from_shell + CORRECTION_OFFSET_SHELLS)
    return fsc_unmasked, fsc_masked, fsc_randomised, fsc_true, from_shell


def run(config: PostprocessConfig, console: Console | None = None) -> PostprocessResult:
    """Post-process the half maps as `config` says (module docstring) and write the results."""
    console = console or Console()
    output = config.output
    refuse_nonempty_folder(output, config.overwrite)
    device = resolve_device(config.device)
    inputs = _read_inputs(config, device)
    console.print(_describe(config, inputs, device), highlight=False)

    pixel = inputs.pixel_size_angstrom
    half1 = read_map(inputs.half1, device)
    half2 = read_map(inputs.half2, device)
    mask = inputs.mask_values
    size = half1.shape[-1]
    frequencies = shell_frequencies(size, device=device, dtype=torch.float64)
    s = frequencies / pixel

    fsc_unmasked, fsc_masked, fsc_randomised, fsc_true, from_shell = _fsc_curves(
        config, half1, half2, mask, pixel
    )
    threshold = config.fsc_threshold
    final = _resolution(fsc_true, frequencies, pixel, threshold)
    if not math.isfinite(final):
        raise CryorefineError(
            f"the corrected FSC is below {threshold:g} from the first shell on: the half "
            "maps do not agree.",
            path=config.half_maps[1],
            fix="check that these are the two half maps of one refinement, on one grid.",
        )

    average = 0.5 * (half1 + half2)
    amplitude = shell_mean_amplitude(average * mask if config.guinier_masked else average)
    weighted_amplitude = amplitude * fsc_weighting(fsc_true)
    fit: GuinierFit | None = None
    if config.bfactor == "auto":
        fitted = weighted_amplitude if config.guinier_fsc_weighted else amplitude
        fit = _fit_bfactor(config, fitted, s, final)
        bfactor = fit.bfactor_angstrom2
    else:
        bfactor = float(config.bfactor)
    sharpened = sharpen(average, pixel, bfactor, fsc_true, final, config.filter_edge_width_shells)
    sharpened_masked = sharpened * mask
    sharpened_amplitude = shell_mean_amplitude(sharpened_masked)

    s_np = s.cpu().numpy()
    fsc_table = pd.DataFrame(
        {
            "shell": np.arange(len(s_np)),
            "resolution_angstrom": _shell_resolutions(s_np),
            "frequency_per_angstrom": s_np,
            "fsc_unmasked": fsc_unmasked.cpu().numpy(),
            "fsc_masked": fsc_masked.cpu().numpy(),
            "fsc_phase_randomised": fsc_randomised.cpu().numpy(),
            "fsc_corrected": fsc_true.cpu().numpy(),
        }
    )
    guinier_table = pd.DataFrame(
        {
            "shell": np.arange(len(s_np)),
            "resolution_angstrom": _shell_resolutions(s_np),
            "frequency_squared_per_angstrom2": s_np**2,
            "ln_amplitude": _log(amplitude),
            "ln_amplitude_weighted": _log(weighted_amplitude),
            "ln_amplitude_sharpened": _log(sharpened_amplitude),
            "ln_amplitude_fit": (fit.intercept + fit.slope * s_np**2)
            if fit is not None
            else np.full(len(s_np), np.nan),
            "in_fit": fit.used.cpu().numpy() if fit is not None else np.zeros(len(s_np), bool),
        }
    )
    resolutions = {
        "unmasked": _resolution(fsc_unmasked, frequencies, pixel, threshold),
        "masked": _resolution(fsc_masked, frequencies, pixel, threshold),
    }
    files = _write_outputs(
        config, sharpened, sharpened_masked, pixel, fsc_table, guinier_table, final
    )
    summary = _summary(
        config, inputs, size, final, resolutions, from_shell, s_np, bfactor, fit, mask, files
    )
    files["summary"] = atomic_write_text(
        output / "summary.yaml", yaml.safe_dump(summary, sort_keys=False), overwrite=True
    )
    files["config"] = save_resolved_config(config, output / "config.yaml")
    console.print(
        f"FSC {threshold:g}: unmasked {resolutions['unmasked']:.3f} Å, masked "
        f"{resolutions['masked']:.3f} Å, corrected {final:.3f} Å (phases randomised from "
        f"shell {from_shell}); B-factor {bfactor:.1f} Å² "
        f"({'Guinier fit' if fit is not None else 'given'}); wrote {output}",
        highlight=False,
    )
    console.print(f"final resolution: {final:.3f} Å", highlight=False)
    return PostprocessResult(output, final, bfactor, from_shell, fsc_table, fit, files)


def _write_outputs(
    config: PostprocessConfig,
    sharpened: torch.Tensor,
    sharpened_masked: torch.Tensor,
    pixel: float,
    fsc_table: pd.DataFrame,
    guinier_table: pd.DataFrame,
    final: float,
) -> dict[str, Path]:
    output = config.output
    output.mkdir(parents=True, exist_ok=True)
    dtype = np.float16 if config.float16 else np.float32
    files = {
        "map": write_mrc(
            output / "postprocess.mrc", sharpened.float(), pixel, overwrite=True, dtype=dtype
        ),
        "masked_map": write_mrc(
            output / "postprocess_masked.mrc",
            sharpened_masked.float(),
            pixel,
            overwrite=True,
            dtype=dtype,
        ),
        "fsc_table": atomic_write_text(
            output / "fsc.csv", fsc_table.to_csv(index=False), overwrite=True
        ),
        "guinier_table": atomic_write_text(
            output / "guinier.csv", guinier_table.to_csv(index=False), overwrite=True
        ),
    }
    frequency = fsc_table["frequency_per_angstrom"].to_numpy()
    files["fsc_plot"] = plot_fsc_curves(
        output / "fsc.png",
        frequency,
        {
            "corrected": fsc_table["fsc_corrected"].to_numpy(),
            "masked": fsc_table["fsc_masked"].to_numpy(),
            "unmasked": fsc_table["fsc_unmasked"].to_numpy(),
            "phase-randomised, masked": fsc_table["fsc_phase_randomised"].to_numpy(),
        },
        threshold=config.fsc_threshold,
        resolution_angstrom=final,
        title=f"{config.half_maps[0].name} / {config.half_maps[1].name}",
        overwrite=True,
    )
    return files


def _summary(
    config: PostprocessConfig,
    inputs: _Inputs,
    size: int,
    final: float,
    resolutions: dict[str, float],
    from_shell: int,
    s: np.ndarray,
    bfactor: float,
    fit: GuinierFit | None,
    mask: torch.Tensor,
    files: dict[str, Path],
) -> dict[str, object]:
    """The numbers a user looks for, as plain YAML types."""
    randomised_from = float(1.0 / s[from_shell]) if from_shell < len(s) else None
    summary: dict[str, object] = {
        "final_resolution_angstrom": round(final, 4),
        "fsc_threshold": config.fsc_threshold,
        "resolution_unmasked_angstrom": round(resolutions["unmasked"], 4),
        "resolution_masked_uncorrected_angstrom": round(resolutions["masked"], 4),
        "phases_randomised_from_shell": from_shell,
        "phases_randomised_from_angstrom": randomised_from,
        "fsc_corrected_from_shell": from_shell + CORRECTION_OFFSET_SHELLS,
        "bfactor_angstrom2": round(bfactor, 3),
        "bfactor_source": "guinier_fit" if fit is not None else "given",
        "box_size": size,
        "pixel_size_angstrom": inputs.pixel_size_angstrom,
        "mask_volume_fraction": round(float(mask.mean()), 6),
        "seed": config.seed,
    }
    if fit is not None:
        used = fit.used.cpu().numpy()
        summary["guinier_fit"] = {
            "map": "masked" if config.guinier_masked else "unmasked",
            "amplitudes": "fsc_weighted" if config.guinier_fsc_weighted else "unweighted",
            "low_resolution_angstrom": float(1.0 / s[used].min()),
            "high_resolution_angstrom": float(1.0 / s[used].max()),
            "shells": int(used.sum()),
            "slope_angstrom2": round(fit.slope, 4),
            "intercept": round(fit.intercept, 4),
            "correlation": round(fit.correlation, 5),
        }
    summary["files"] = {name: str(path) for name, path in files.items()}
    return summary
