"""`cryorefine mask`: a soft mask from a map (threshold) or a soft sphere.

Two modes, as RELION's relion_mask_create:

* from a map (`--map M --threshold T [--extend E] [--soft-edge W]`): voxels at or
  above T, grown by E voxels (voxels at a distance < E join; negative E shrinks),
  then a raised-cosine edge W voxels wide (engine.volume_masks). Checked against
  relion_mask_create voxel for voxel.
* a sphere (`--sphere-diameter D --box N --pixel-size P [--soft-edge W]`): 1 out to
  the radius D / 2 (Å), falling as a raised cosine over W voxels beyond it
  (engine.masks.soft_sphere_mask; relion_mask_create --denovo --outer_radius D/2P).
  The box and pixel size may come from `--map` instead.

The mask is written with the map's (or the given) voxel size, as float32 or with
--float16 as float16, and its resolved config beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator
from rich.console import Console

from cryorefine.config import Config, save_resolved_config
from cryorefine.engine.masks import soft_sphere_mask
from cryorefine.engine.volume_masks import threshold_mask
from cryorefine.errors import CryorefineError
from cryorefine.io.mrc import write_mrc
from cryorefine.io.volumes import cubic_map_info, map_pixel_size, read_map
from cryorefine.parallel.device import resolve_device
from cryorefine.programs.reconstruct import claim_map_output


class MaskConfig(Config):
    """What `cryorefine mask` makes. Lengths in Å unless the name says px."""

    output: Path = Field(description="Output mask (MRC); the resolved config goes beside it.")
    map: Path | None = Field(
        None, description="Map to threshold (or, for a sphere, to take box and pixel size from)."
    )
    threshold: float | None = Field(
        None, description="Density at or above which a voxel is inside (map mode)."
    )
    extend_px: float = Field(
        0.0, description="Grow the thresholded mask by this many voxels (negative shrinks)."
    )
    soft_edge_px: float = Field(0.0, ge=0, description="Width of the raised-cosine edge, voxels.")
    sphere_diameter_angstrom: float | None = Field(
        None, gt=0, description="Diameter of a spherical mask, Å (where the soft edge starts)."
    )
    box_size: int | None = Field(None, ge=2, description="Box edge of a spherical mask, voxels.")
    pixel_size_angstrom: float | None = Field(
        None, gt=0, description="Pixel size, Å (sphere mode; or overrides the map's header)."
    )
    float16: bool = Field(False, description="Write the mask as float16 (MRC mode 12).")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto.")
    overwrite: bool = Field(False, description="Replace an existing output mask and config.")

    @model_validator(mode="after")
    def _one_mode(self) -> MaskConfig:
        sphere = self.sphere_diameter_angstrom is not None
        if sphere == (self.threshold is not None):
            raise ValueError(
                "give either threshold (with map) or sphere_diameter_angstrom, exactly one"
            )
        if not sphere and self.map is None:
            raise ValueError("threshold needs a map (--map) to threshold")
        if sphere and self.extend_px != 0:
            raise ValueError("extend_px applies to a thresholded map, not to a sphere")
        if (
            sphere
            and self.map is None
            and (self.box_size is None or self.pixel_size_angstrom is None)
        ):
            raise ValueError("a sphere needs box_size and pixel_size_angstrom (or a map)")
        if not sphere and self.box_size is not None:
            raise ValueError("box_size is for a sphere; a thresholded mask has the map's box")
        return self


@dataclass(frozen=True)
class MaskResult:
    """What `run` wrote and how much of the box the mask holds."""

    output: Path
    config: Path
    box_size: int
    pixel_size_angstrom: float
    volume_fraction: float


def run(config: MaskConfig, console: Console | None = None) -> MaskResult:
    """Make the mask `config` describes (module docstring) and write it."""
    console = console or Console()
    config_path = claim_map_output(config.output, config.overwrite)
    device = resolve_device(config.device)
    info = None if config.map is None else cubic_map_info(config.map, "map")
    if info is not None:
        pixel = map_pixel_size(info, config.pixel_size_angstrom, "map")
        box = config.box_size or info.shape[0]
    else:
        assert config.box_size is not None and config.pixel_size_angstrom is not None
        pixel, box = config.pixel_size_angstrom, config.box_size

    if config.sphere_diameter_angstrom is not None:
        radius_px = config.sphere_diameter_angstrom / (2.0 * pixel)
        if radius_px + config.soft_edge_px > box / 2:
            console.print(
                f"note: the sphere ({radius_px:.4g} + {config.soft_edge_px:g} px edge) reaches "
                f"beyond the box's half-width ({box / 2:g} px).",
                highlight=False,
            )
        console.print(
            f"[bold]cryorefine mask[/]: sphere of diameter {config.sphere_diameter_angstrom:g} Å "
            f"({radius_px:.4g} px radius) + {config.soft_edge_px:g} px soft edge, box {box}³ at "
            f"{pixel:g} Å/px -> {config.output}",
            highlight=False,
        )
        mask = soft_sphere_mask(box, radius_px, config.soft_edge_px, device=device)
    else:
        assert info is not None and config.threshold is not None
        volume = read_map(info, device)
        low, high = float(volume.min()), float(volume.max())
        if not low <= config.threshold <= high:
            raise CryorefineError(
                f"threshold {config.threshold:g} is outside the map's range {low:.4g} .. "
                f"{high:.4g}: the mask would be {'empty' if config.threshold > high else 'full'}.",
                path=config.map,
                field="threshold",
                fix="choose a threshold between the map's minimum and maximum.",
            )
        console.print(
            f"[bold]cryorefine mask[/]: {config.map} ({box}³ at {pixel:g} Å/px) ≥ "
            f"{config.threshold:g}, extended {config.extend_px:g} px, soft edge "
            f"{config.soft_edge_px:g} px -> {config.output}",
            highlight=False,
        )
        mask = threshold_mask(volume, config.threshold, config.extend_px, config.soft_edge_px)

    dtype = np.float16 if config.float16 else np.float32
    write_mrc(config.output, mask.float(), pixel, overwrite=config.overwrite, dtype=dtype)
    written_config = save_resolved_config(config, config_path)
    fraction = float(mask.double().mean())
    console.print(
        f"wrote {config.output} ({box}³ px, {pixel:g} Å/px, {fraction:.2%} of the box) "
        f"and {written_config}",
        highlight=False,
    )
    return MaskResult(config.output, written_config, box, pixel, fraction)
