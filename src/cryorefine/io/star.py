"""RELION STAR files (starfile) <-> the canonical particle / micrograph table.

Reads RELION 3.0 (one data block, per-row optics, legacy rlnOriginX/Y in pixels and
rlnDetectorPixelSize/rlnMagnification), 3.1 and 5 (data_optics plus data_particles
or data_micrographs: the optics columns are merged into every row on rlnOpticsGroup;
where a column is in both blocks the optics value wins, as in RELION). Writes RELION
3.1: data_optics (one row per optics group, values checked to agree within each
group) and data_particles / data_micrographs, atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryorefine.errors import CryorefineError, require_file
from cryorefine.io.atomic import atomic_write
from cryorefine.io.particles import OPTICS_COLUMNS, TEXT_COLUMNS, require_columns

# Columns RELION parses as integers: written without a decimal point.
_INTEGER_COLUMNS = (
    "rlnOpticsGroup",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnCtfDataAreCtfPremultiplied",
    "rlnRandomSubset",
    "rlnClassNumber",
    "rlnGroupNumber",
    "rlnNrOfSignificantSamples",
    "rlnNrOfFrames",
)
# Enough digits that float64 -> text -> float64 keeps 1e-9 relative precision.
_FLOAT_FORMAT = "%.10g"
_OPTICS_TOLERANCE = 1e-6


def read_star_particles(path: str | Path, require: Sequence[str] = ()) -> pd.DataFrame:
    """The canonical particle table of a RELION 3.0 / 3.1 / 5 particles STAR file.

    Args:
        path: the STAR file.
        require: columns the caller needs (e.g. ("rlnImageName",)); a missing one is
            a CryorefineError naming the file, the column and the fix.

    Returns:
        one row per particle, RELION 3.1 names, optics columns merged into each row,
        rlnOpticsGroup always present (3.0 files get one group per distinct optics).
    """
    table = _read_table(Path(path), "particles", "rlnImagePixelSize")
    require_columns(table, require, path, "this job")
    return table


def read_star_micrographs(path: str | Path, require: Sequence[str] = ()) -> pd.DataFrame:
    """The micrograph table of a RELION 3.0 / 3.1 / 5 micrographs STAR file (see above)."""
    table = _read_table(Path(path), "micrographs", "rlnMicrographPixelSize")
    require_columns(table, require, path, "this job")
    return table


def write_star_particles(path: str | Path, table: pd.DataFrame, overwrite: bool = False) -> Path:
    """Write a RELION 3.1 particles STAR file (data_optics + data_particles), atomically.

    The table needs rlnImagePixelSize (or rlnMicrographPixelSize, for picked
    coordinates), rlnVoltage and rlnSphericalAberration: without any of them RELION
    3.1 skips the optics table and reads nothing (it still exits 0).
    Rows without rlnOpticsGroup get one group per distinct combination of optics values.
    """
    return _write_table(Path(path), table, "particles", overwrite)


def write_star_micrographs(path: str | Path, table: pd.DataFrame, overwrite: bool = False) -> Path:
    """Write a RELION 3.1 micrographs STAR file (data_optics + data_micrographs), atomically.

    Needs rlnMicrographPixelSize, rlnVoltage and rlnSphericalAberration (see above).
    """
    return _write_table(Path(path), table, "micrographs", overwrite)


def _read_blocks(path: Path) -> dict[str, pd.DataFrame]:
    path = require_file(path, "STAR file")
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=list(TEXT_COLUMNS))
    except Exception as error:  # starfile raises many types on malformed text
        raise CryorefineError(
            f"not a readable STAR file ({type(error).__name__}: {error}).",
            path=path,
            fix="check that this is a RELION STAR file and that it is complete.",
        ) from error
    loops = {name: block for name, block in blocks.items() if isinstance(block, pd.DataFrame)}
    for block in loops.values():
        for column in block.columns:
            if column.endswith("Name") and block[column].dtype.kind in "iuf":
                block[column] = block[column].astype(str)
    return loops


def _read_table(path: Path, kind: str, pixel_size_column: str) -> pd.DataFrame:
    loops = _read_blocks(path)
    if kind in loops:
        table, optics = loops[kind], loops.get("optics")
    elif "optics" not in loops and len(loops) == 1:
        table, optics = next(iter(loops.values())), None  # RELION 3.0: one block
    else:
        raise CryorefineError(
            f"no data_{kind} block (found: {', '.join('data_' + n for n in loops) or 'none'}).",
            path=path,
            fix=f"give a RELION {kind} STAR file.",
        )
    table = table.reset_index(drop=True)
    if optics is not None:
        table = _merge_optics(table, optics, path)
    table = _convert_relion30(table, path, pixel_size_column)
    if "rlnOpticsGroup" not in table.columns:
        table = _assign_optics_groups(table)
    return table


def _merge_optics(table: pd.DataFrame, optics: pd.DataFrame, path: Path) -> pd.DataFrame:
    require_columns(optics, ["rlnOpticsGroup"], path, "reading the data_optics block")
    if "rlnOpticsGroup" not in table.columns and len(optics) == 1:
        # Hand-made files often leave the group out when there is only one.
        table = table.assign(rlnOpticsGroup=optics["rlnOpticsGroup"].iloc[0])
    require_columns(table, ["rlnOpticsGroup"], path, "matching rows to their data_optics group")
    if optics["rlnOpticsGroup"].duplicated().any():
        raise CryorefineError(
            "data_optics lists an optics group twice.", path=path, field="rlnOpticsGroup"
        )
    unknown = sorted(set(table["rlnOpticsGroup"]) - set(optics["rlnOpticsGroup"]))
    if unknown:
        raise CryorefineError(
            f"rows refer to optics group(s) {unknown} that data_optics does not define.",
            path=path,
            field="rlnOpticsGroup",
            fix="add those groups to data_optics or correct rlnOpticsGroup.",
        )
    shared = [c for c in optics.columns if c in table.columns and c != "rlnOpticsGroup"]
    return table.drop(columns=shared).join(optics.set_index("rlnOpticsGroup"), on="rlnOpticsGroup")


def _convert_relion30(table: pd.DataFrame, path: Path, pixel_size_column: str) -> pd.DataFrame:
    """Legacy columns -> RELION 3.1: pixel size from detector/magnification, origins in Å."""
    legacy_size = {"rlnDetectorPixelSize", "rlnMagnification"}
    if legacy_size <= set(table.columns):
        if pixel_size_column not in table.columns:
            # Detector pixel in µm, magnification unitless: Å/px = 1e4 · µm / mag.
            table[pixel_size_column] = (
                1e4 * table["rlnDetectorPixelSize"] / table["rlnMagnification"]
            )
        table = table.drop(columns=list(legacy_size))
    for axis in "XY":
        legacy = f"rlnOrigin{axis}"
        if legacy in table.columns:
            require_columns(table, [pixel_size_column], path, f"converting {legacy} (pixels) to Å")
            table[f"rlnOrigin{axis}Angst"] = table[legacy] * table[pixel_size_column]
            table = table.drop(columns=[legacy])
    return table


def _assign_optics_groups(table: pd.DataFrame) -> pd.DataFrame:
    """One optics group per distinct combination of optics values, numbered from 1."""
    table = table.copy()
    columns = [c for c in OPTICS_COLUMNS if c in table.columns and c != "rlnOpticsGroupName"]
    if columns:
        keys = table[columns].astype(str).agg("\x1f".join, axis=1)
        table["rlnOpticsGroup"] = pd.factorize(keys)[0] + 1
    else:
        table["rlnOpticsGroup"] = 1
    if "rlnOpticsGroupName" not in table.columns:
        table["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in table["rlnOpticsGroup"]]
    return table


def _optics_block(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """One row per optics group; every row of a group must agree on every optics column."""
    columns = [c for c in OPTICS_COLUMNS if c in table.columns and table[c].notna().any()]
    groups = table[columns].groupby("rlnOpticsGroup", sort=True)
    for column in columns[1:]:
        values = table[column]
        if values.isna().any():
            group = table.loc[values.isna(), "rlnOpticsGroup"].iloc[0]
            raise CryorefineError(
                f"{column} is missing for optics group {group} but set for others.",
                path=path,
                field=column,
                fix="give every optics group a value, or split the table.",
            )
        if values.dtype.kind in "iuf":
            spread = groups[column].max() - groups[column].min()
            size = groups[column].max().abs()
            bad = spread > _OPTICS_TOLERANCE * size + 1e-12
        else:
            bad = groups[column].nunique() > 1
        if bad.any():
            group = bad[bad].index[0]
            seen = table.loc[table["rlnOpticsGroup"] == group, column].unique()[:2]
            raise CryorefineError(
                f"optics group {group} has different values of {column} ({seen[0]} and {seen[1]}).",
                path=path,
                field=column,
                fix="give rows with different optics their own rlnOpticsGroup.",
            )
    return groups.first().reset_index()


def _with_integer_columns(block: pd.DataFrame) -> pd.DataFrame:
    for column in _INTEGER_COLUMNS:
        if column in block.columns and block[column].dtype.kind == "f":
            values = block[column]
            if values.notna().all() and np.array_equal(values, np.round(values)):
                block[column] = values.astype(np.int64)
    return block


def _has_values(table: pd.DataFrame, column: str) -> bool:
    return column in table.columns and bool(table[column].notna().any())


def _write_table(path: Path, table: pd.DataFrame, kind: str, overwrite: bool) -> Path:
    pixel_size = "rlnMicrographPixelSize"
    if kind == "particles" and not _has_values(table, pixel_size):
        pixel_size = "rlnImagePixelSize"  # either will do; picked coordinates have only the first
    for column in (pixel_size, "rlnVoltage", "rlnSphericalAberration"):
        if not _has_values(table, column):
            raise CryorefineError(
                f"the table has no {column}, which RELION 3.1 needs in data_optics "
                "(without it RELION ignores the optics table and reads nothing).",
                path=path,
                field=column,
                fix=f"set {column} for every row (e.g. from the microscope settings).",
            )
    table = table.reset_index(drop=True)
    if "rlnOpticsGroup" not in table.columns:
        table = _assign_optics_groups(table)
    elif "rlnOpticsGroupName" not in table.columns:
        table = table.assign(
            rlnOpticsGroupName=[f"opticsGroup{g}" for g in table["rlnOpticsGroup"]]
        )
    optics = _with_integer_columns(_optics_block(table, path))
    moved = [c for c in OPTICS_COLUMNS if c in table.columns and c != "rlnOpticsGroup"]
    rows = _with_integer_columns(table.drop(columns=moved))
    blocks = {"optics": optics, kind: rows}
    return atomic_write(
        path,
        lambda temporary: starfile.write(
            blocks, temporary, float_format=_FLOAT_FORMAT, na_rep="nan"
        ),
        overwrite=overwrite,
    )
