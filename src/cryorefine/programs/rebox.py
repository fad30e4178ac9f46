"""`cryorefine rebox`: a map in a new box and/or at a new pixel size.

What `relion_image_handler --rescale_angpix P --new_box N` does to a map:

* a new pixel size p_new resamples the map (engine.rebox.fourier_resample) from N
  to M = round(N · p_old / p_new) voxels per axis by cropping or zero-padding its
  centred Fourier transform: same physical box, same density scale (a constant map
  stays that constant); the pixel size written is the one achieved, p_old · N / M,
  which differs from p_new where N · p_old / p_new is not an integer;
* then a new box crops or zero-pads in real space (engine.rebox.crop_or_pad);
  without --box the box is M.

The origin voxel N // 2 stays the origin M // 2 throughout. float16 maps are read
like any other; --float16 writes the result as float16 (MRC mode 12).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator
from rich.console import Console

from cryorefine.config import Config, save_resolved_config
from cryorefine.engine.rebox import crop_or_pad, fourier_resample, resampled_size
from cryorefine.io.mrc import write_mrc
from cryorefine.io.volumes import cubic_map_info, map_pixel_size, read_map
from cryorefine.parallel.device import resolve_device
from cryorefine.programs.reconstruct import claim_map_output

#: Relative difference between asked and achieved pixel size that is worth a note.
_PIXEL_NOTE = 1e-6


class ReboxConfig(Config):
    """What `cryorefine rebox` does. Lengths in Å, boxes in voxels."""

    map: Path = Field(description="Input map (MRC, cubic; float16 too).")
    output: Path = Field(description="Output map (MRC); the resolved config goes beside it.")
    box_size: int | None = Field(
        None, ge=1, description="New box edge, voxels (real-space crop/pad about N // 2)."
    )
    pixel_size_angstrom: float | None = Field(
        None, gt=0, description="New pixel size, Å (Fourier crop/pad to round(N p_old / p_new))."
    )
    input_pixel_size_angstrom: float | None = Field(
        None, gt=0, description="The input's pixel size, Å; its header's by default."
    )
    float16: bool = Field(False, description="Write the map as float16 (MRC mode 12).")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto.")
    overwrite: bool = Field(False, description="Replace an existing output map and config.")

    @model_validator(mode="after")
    def _something_to_do(self) -> ReboxConfig:
        if self.box_size is None and self.pixel_size_angstrom is None:
            raise ValueError(
                "give a new box_size (--box) and/or pixel_size_angstrom (--pixel-size)"
            )
        return self


@dataclass(frozen=True)
class ReboxResult:
    """What `run` wrote."""

    output: Path
    config: Path
    box_size: int
    pixel_size_angstrom: float


def run(config: ReboxConfig, console: Console | None = None) -> ReboxResult:
    """Rebox / resample the map as `config` says (module docstring) and write it."""
    console = console or Console()
    config_path = claim_map_output(config.output, config.overwrite)
    device = resolve_device(config.device)
    info = cubic_map_info(config.map, "map")
    pixel = map_pixel_size(info, config.input_pixel_size_angstrom, "map")
    size = info.shape[0]
    resampled = size
    new_pixel = pixel
    if config.pixel_size_angstrom is not None:
        resampled = resampled_size(size, pixel, config.pixel_size_angstrom)
        new_pixel = pixel * size / resampled
    box = config.box_size if config.box_size is not None else resampled
    console.print(
        f"[bold]cryorefine rebox[/]: {config.map} ({size}³ at {pixel:g} Å/px) -> "
        f"resample to {resampled}³ at {new_pixel:.6g} Å/px, box {box}³ -> {config.output}",
        highlight=False,
    )
    if config.pixel_size_angstrom is not None and (
        abs(new_pixel - config.pixel_size_angstrom) > _PIXEL_NOTE * config.pixel_size_angstrom
    ):
        console.print(
            f"note: {size} · {pixel:g} / {config.pixel_size_angstrom:g} is not a whole box; "
            f"the pixel size written is {new_pixel:.6g} Å ({size} -> {resampled} voxels).",
            highlight=False,
        )

    volume = read_map(info, device)
    if resampled != size:
        volume = fourier_resample(volume, resampled)
    volume = crop_or_pad(volume, box)
    dtype = np.float16 if config.float16 else np.float32
    write_mrc(config.output, volume.float(), new_pixel, overwrite=config.overwrite, dtype=dtype)
    written_config = save_resolved_config(config, config_path)
    console.print(
        f"wrote {config.output} ({box}³ px, {new_pixel:.6g} Å/px, {np.dtype(dtype).name}) "
        f"and {written_config}",
        highlight=False,
    )
    return ReboxResult(config.output, written_config, box, new_pixel)
