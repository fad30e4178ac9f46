"""MRC images, stacks and volumes (mrcfile), with the voxel size always read and written.

Arrays are (y, x) for single images, (n, y, x) for stacks and (z, y, x) for volumes;
voxel sizes are Å. Every mode users meet is read (int8, int16, uint16 as written by
EPU with FEI extended headers, float16, float32). Writes are atomic (io/atomic.py)
and never replace an existing file unless asked. A damaged file gives one
CryorefineError naming the file and the fix, before any data is read.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np
import numpy.typing as npt
import torch

from cryorefine.errors import CryorefineError, require_file
from cryorefine.io.atomic import atomic_write
from cryorefine.io.particles import split_image_name

#: dtypes write_mrc accepts (MRC modes 0, 1, 6, 12, 2).
WRITABLE_DTYPES = (np.int8, np.int16, np.uint16, np.float16, np.float32)
_HEADER_BYTES = 1024


@dataclass(frozen=True)
class MrcInfo:
    """What an MRC header says, read without the data.

    shape: (y, x), (n, y, x) or (z, y, x) (a ".mrcs" file is always (n, y, x));
    voxel_size_angstrom: Å (0 where the header leaves it unset); dtype: the stored
    type; is_stack: a stack of 2D images (space group 0 or a ".mrcs" name).
    """

    path: Path
    shape: tuple[int, ...]
    voxel_size_angstrom: float
    dtype: np.dtype
    is_stack: bool


def _is_compressed(path: Path) -> bool:
    with path.open("rb") as handle:
        magic = handle.read(3)
    return magic[:2] == b"\x1f\x8b" or magic == b"BZh"


def mrc_info(path: str | Path) -> MrcInfo:
    """Read and check an MRC header: shape, voxel size, dtype; detects truncated files."""
    path = Path(path)
    path = require_file(path, "MRC file")
    try:
        with warnings.catch_warnings():
            # Permissive: old or vendor files (EPU, SerialEM) bend the standard in
            # harmless ways; what matters (mode, shape, size) is checked below.
            warnings.simplefilter("ignore")
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                header = mrc.header.copy()
                voxel = mrc.voxel_size.copy()
        dtype = np.dtype(mrcfile.utils.data_dtype_from_header(header))
        shape = tuple(int(n) for n in mrcfile.utils.data_shape_from_header(header))
    except (ValueError, OSError) as error:
        raise CryorefineError(
            f"not a readable MRC file ({error}).",
            path=path,
            fix="check that this is an MRC image/stack/volume and that it was copied completely.",
        ) from error
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) == 2 and path.suffix == ".mrcs":
        shape = (1, *shape)  # RELION's name for stacks: a stack of one stays a stack
    if not _is_compressed(path):
        expected = _HEADER_BYTES + int(header.nsymbt) + int(np.prod(shape)) * dtype.itemsize
        actual = path.stat().st_size
        if actual < expected:
            raise CryorefineError(
                f"file is truncated: its header describes {shape} {dtype} data "
                f"({expected} bytes with the header) but the file has only {actual} bytes.",
                path=path,
                fix="the file was cut short while being written or copied; copy or "
                "regenerate it (mrcfile.validate on it shows the header).",
            )
    is_stack = len(shape) == 3 and (int(header.ispg) == 0 or path.suffix == ".mrcs")
    return MrcInfo(
        path, shape, _isotropic_voxel_size(voxel, shape, is_stack, path), dtype, is_stack
    )


def _isotropic_voxel_size(
    voxel: np.recarray, shape: tuple[int, ...], stack: bool, path: Path
) -> float:
    sizes = [float(voxel.x), float(voxel.y)] + (
        [float(voxel.z)] if len(shape) == 3 and not stack else []
    )
    if not np.allclose(sizes, sizes[0], rtol=1e-4, atol=1e-6):
        raise CryorefineError(
            f"voxel size differs between axes (x, y[, z] = {sizes} Å); pixels must be square.",
            path=path,
            fix="resample to one voxel size (e.g. relion_image_handler --rescale_angpix).",
        )
    return sizes[0]


def read_mrc(
    path: str | Path, dtype: npt.DTypeLike | None = np.float32
) -> tuple[np.ndarray, float]:
    """Data and voxel size (Å) of an MRC image, stack or volume.

    Args:
        path: the file; checked with `mrc_info` first.
        dtype: the returned array's dtype; None keeps the stored one.

    Returns:
        data: (y, x), (n, y, x) or (z, y, x); voxel_size_angstrom.
    """
    info = mrc_info(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(info.path, permissive=True) as mrc:
            data = np.asarray(mrc.data).reshape(info.shape)
            data = data.copy() if dtype is None else data.astype(dtype)
    return data, info.voxel_size_angstrom


def write_mrc(
    path: str | Path,
    data: np.ndarray | torch.Tensor,
    voxel_size_angstrom: float,
    overwrite: bool = False,
    dtype: npt.DTypeLike = np.float32,
    is_stack: bool = False,
) -> Path:
    """Write an image (y, x), stack (n, y, x, is_stack=True) or volume (z, y, x) atomically.

    Floating-point data written to an integer dtype is rounded; values outside the
    dtype's range are an error, never wrapped or clipped.
    """
    path = Path(path)
    array = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    target = np.dtype(dtype)
    if target not in [np.dtype(t) for t in WRITABLE_DTYPES]:
        raise CryorefineError(
            f"cannot write dtype {target} to MRC.",
            path=path,
            fix="use one of float32, float16, int16, uint16, int8.",
        )
    if array.ndim not in (2, 3) or (is_stack and array.ndim != 3):
        raise CryorefineError(
            f"data of shape {array.shape} is not an image (y, x), stack or volume (n|z, y, x).",
            path=path,
        )
    if not (np.isfinite(voxel_size_angstrom) and voxel_size_angstrom > 0):
        raise CryorefineError(
            f"voxel size {voxel_size_angstrom} Å is not a positive number.",
            path=path,
            field="voxel_size_angstrom",
        )
    converted = _convert(array, target, path)

    def write(temporary: Path) -> None:
        with mrcfile.new(temporary, overwrite=True) as mrc:
            mrc.set_data(converted)
            if is_stack:
                mrc.set_image_stack()
            mrc.voxel_size = voxel_size_angstrom

    return atomic_write(path, write, overwrite=overwrite)


def _convert(array: np.ndarray, target: np.dtype, path: Path) -> np.ndarray:
    if target.kind in "iu":
        if array.dtype.kind == "f":
            array = np.rint(array)
        limits = np.iinfo(target)
        low, high = (array.min(), array.max()) if array.size else (0, 0)
        if low < limits.min or high > limits.max:
            raise CryorefineError(
                f"values {low}..{high} do not fit {target} ({limits.min}..{limits.max}).",
                path=path,
                fix="write as float32 (the default) or scale the data first.",
            )
    elif (
        target == np.float16 and array.size and np.nanmax(np.abs(array)) > np.finfo(np.float16).max
    ):
        raise CryorefineError(
            "values exceed float16's range (±65504).", path=path, fix="write as float32."
        )
    return np.ascontiguousarray(array.astype(target))


def _images_per_stack(
    image_names: Sequence[str], source: str | Path | None = None
) -> dict[str, list[tuple[int, int | None]]]:
    """Rows of each stack file named in `image_names`: {file: [(row, 1-based index)]}."""
    rows_of_file: dict[str, list[tuple[int, int | None]]] = defaultdict(list)
    for row, name in enumerate(image_names):
        try:
            index, file_name = split_image_name(str(name))
        except ValueError as error:
            raise CryorefineError(
                f"{error}.",
                path=source,
                field="rlnImageName",
                fix="image names look like 000012@stack.mrcs.",
            ) from None
        rows_of_file[file_name].append((row, index))
    return rows_of_file


def _require_stack(
    stack_path: Path, relative_to: str | Path, image_name: str, source: str | Path | None = None
) -> None:
    if not stack_path.is_file():
        folder = f"the STAR file's folder ({relative_to})" if source else str(relative_to)
        raise CryorefineError(
            f"particle stack not found (named by rlnImageName '{image_name}').",
            path=stack_path,
            fix=f"image names are read relative to {folder}: put the stacks there "
            "or correct rlnImageName.",
        )


def check_particle_stacks(
    image_names: Sequence[str], relative_to: str | Path, source: str | Path | None = None
) -> int:
    """Check, from headers only, that every named image can be read; return the box edge.

    Every stack must exist, be complete, hold square 2D images of one size and the
    indices asked for. Run it before compute so a bad stack fails at once.

    Args:
        image_names: RELION image names ("000012@stack.mrcs").
        relative_to: the folder the names are relative to.
        source: the STAR file the names come from, for messages.

    Returns:
        The box edge in pixels.
    """
    boxes: dict[int, Path] = {}
    for file_name, rows in _images_per_stack(image_names, source).items():
        stack_path = Path(relative_to) / file_name
        _require_stack(stack_path, relative_to, str(image_names[rows[0][0]]), source)
        info = mrc_info(stack_path)
        if len(info.shape) == 3 and not info.is_stack:
            raise CryorefineError(
                f"holds a volume {info.shape}, not 2D images.",
                path=stack_path,
                fix="give a particle stack (.mrcs).",
            )
        count, height, width = info.shape if len(info.shape) == 3 else (1, *info.shape)
        if height != width:
            raise CryorefineError(
                f"images are {width} x {height} px; square boxes are needed.",
                path=stack_path,
                fix="re-extract the particles with a square box.",
            )
        highest = max(1 if index is None else index for _, index in rows)
        if highest > count:
            raise CryorefineError(
                f"rlnImageName asks for image {highest} but the stack holds {count}.",
                path=stack_path,
                field="rlnImageName",
                fix="the STAR file and the stack do not match; use the right stack.",
            )
        boxes.setdefault(height, stack_path)
    if len(boxes) > 1:
        described = "; ".join(f"{box} px in {path}" for box, path in boxes.items())
        raise CryorefineError(
            f"particle boxes differ between stacks ({described}).",
            path=source,
            fix="use particles extracted with one box size.",
        )
    if not boxes:
        raise CryorefineError("no particle images named.", path=source, field="rlnImageName")
    return next(iter(boxes))


def read_particle_images(image_names: Sequence[str], relative_to: str | Path) -> np.ndarray:
    """Images named RELION's way ("000012@Extract/job007/stack.mrcs", 1-based), in order.

    Stacks are memory-mapped and read once each; relative paths are relative to
    `relative_to` (RELION's project folder). A name without "@" is a whole 2D file.

    Returns:
        (n, y, x) float32.
    """
    rows_of_file = _images_per_stack(image_names)

    images: np.ndarray | None = None
    for file_name, rows in rows_of_file.items():
        stack_path = Path(relative_to) / file_name
        _require_stack(stack_path, relative_to, str(image_names[rows[0][0]]))
        mrc_info(stack_path)  # clear errors for truncated or foreign files
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.mmap(stack_path, mode="r", permissive=True) as mrc:
                stack = mrc.data if mrc.data.ndim == 3 else mrc.data[None]
                if images is None:
                    images = np.empty((len(image_names), *stack.shape[1:]), np.float32)
                if stack.shape[1:] != images.shape[1:]:
                    raise CryorefineError(
                        f"images are {stack.shape[1:]} here but {images.shape[1:]} elsewhere.",
                        path=stack_path,
                        fix="use particles extracted with one box size.",
                    )
                if any(index is None for _, index in rows) and len(stack) != 1:
                    raise CryorefineError(
                        f"image name without 'index@' but the file holds {len(stack)} images.",
                        path=stack_path,
                        field="rlnImageName",
                        fix="name each image as 000012@stack.mrcs.",
                    )
                out_rows = np.array([row for row, _ in rows])
                indices = np.array([1 if index is None else index for _, index in rows])
                if indices.max() > len(stack):
                    raise CryorefineError(
                        f"image index {indices.max()} is out of range: the stack holds "
                        f"{len(stack)} images.",
                        path=stack_path,
                        field="rlnImageName",
                        fix="the STAR file and the stack do not match; use the right stack.",
                    )
                images[out_rows] = stack[indices - 1]
    return images if images is not None else np.empty((0, 0, 0), np.float32)
