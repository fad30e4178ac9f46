"""Atomic writes: a temporary file in the target's folder, then a rename.

A crash leaves either the old file or the new one, never half of one; an existing
file is only replaced when the caller says so.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from cryorefine.errors import CryorefineError


def refuse_overwrite(path: Path, overwrite: bool) -> None:
    """Stop before any work if `path` exists and overwriting was not asked for."""
    if path.exists() and not overwrite:
        raise CryorefineError(
            "output exists and would be overwritten.",
            path=path,
            fix="choose another output path, remove the file, or pass --overwrite.",
        )


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    The temporary name keeps the suffix so that libraries choosing a format by
    extension (mrcfile, starfile) still work.
    """
    path = Path(path)
    refuse_overwrite(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent
    )
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(temporary_path, 0o666 & ~_current_umask())
        os.replace(temporary_path, path)
    finally:
        temporary_path.unlink(missing_ok=True)


def atomic_write(
    path: str | Path, write: Callable[[Path], object], overwrite: bool = False
) -> Path:
    """Call `write(temporary_path)` and move the result onto `path` atomically."""
    with atomic_path(path, overwrite=overwrite) as temporary:
        write(temporary)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    """Write `text` to `path` atomically."""
    return atomic_write(path, lambda temporary: temporary.write_text(text), overwrite=overwrite)


def refuse_nonempty_folder(output: Path, overwrite: bool) -> None:
    """One clear error if `output` is a file, or a non-empty folder and not `overwrite`."""
    if output.exists() and not output.is_dir():
        raise CryorefineError(
            "output exists and is not a folder.", path=output, fix="choose another --output."
        )
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise CryorefineError(
            "output folder exists and is not empty.",
            path=output,
            fix="choose another --output, empty the folder, or pass --overwrite.",
        )
