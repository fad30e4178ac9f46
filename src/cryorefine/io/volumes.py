"""Maps as 3D programs need them: one cubic volume per MRC file, with a known voxel size.

Checks the header before any data is read, so that a stack, an image, a non-cubic box
or a missing voxel size fails at once with one clear error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryorefine.errors import CryorefineError
from cryorefine.io.mrc import MrcInfo, mrc_info, read_mrc


def cubic_map_info(path: str | Path, kind: str = "map") -> MrcInfo:
    """Header of an MRC file that must hold one cubic (N, N, N) volume.

    Args:
        path: the MRC file.
        kind: what it is to the user ("half map 1", "mask"), for messages.
    """
    info = mrc_info(path)
    if len(info.shape) != 3 or info.is_stack:
        what = "a stack of 2D images" if info.is_stack else f"a 2D image {info.shape}"
        raise CryorefineError(
            f"the {kind} is {what}, not a 3D volume.",
            path=info.path,
            fix="give a 3D map (MRC volume).",
        )
    if len(set(info.shape)) != 1:
        raise CryorefineError(
            f"the {kind} is not cubic: {info.shape[2]} x {info.shape[1]} x {info.shape[0]} "
            "voxels (x, y, z).",
            path=info.path,
            fix="pad or crop the map to a cubic box first.",
        )
    return info


def map_pixel_size(info: MrcInfo, override: float | None, kind: str = "map") -> float:
    """The voxel size to use, Å: `override` if given, else the header's (which must be set)."""
    if override is not None:
        return float(override)
    if not info.voxel_size_angstrom > 0:
        raise CryorefineError(
            f"the {kind}'s header has no voxel size (0 Å).",
            path=info.path,
            field="pixel_size_angstrom",
            fix="give the pixel size (--pixel-size, Å).",
        )
    return info.voxel_size_angstrom


def read_map(info: MrcInfo, device: torch.device | str | None = None) -> torch.Tensor:
    """The (N, N, N) data of a checked map as float64 on `device` (float16 files too)."""
    data, _ = read_mrc(info.path, np.float64)
    return torch.from_numpy(data.reshape(info.shape)).to(device)
