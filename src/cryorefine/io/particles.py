"""The canonical particle table: a pandas DataFrame with RELION 3.1 column names.

One row per particle. Units are Ångström and degrees, as in RELION 3.1:

* rlnCoordinateX / rlnCoordinateY: the particle centre, in pixels of its micrograph
  (0-based array index of the centre pixel; Leopard-EM's top-left `pos_x/pos_y`
  exists only inside io/leopard.py).
* rlnAngleRot / rlnAngleTilt / rlnAnglePsi: RELION ZYZ Euler angles (engine/so3.py).
* rlnOriginXAngst / rlnOriginYAngst: RELION's origin offsets, Å.
* rlnDefocusU / rlnDefocusV (Å, underfocus positive), rlnDefocusAngle (°),
  rlnPhaseShift (°), rlnCtfBfactor (Å²).
* Optics-group columns (OPTICS_COLUMNS) are merged into every row; the STAR writer
  splits them back into a data_optics block.

What RELION has no name for gets a cryorefine column, prefixed "crf" (constants
below). RELION 3.1.3 reads STAR files carrying such labels: it warns
"will ignore (but maintain) values for the unknown label" and writes them back out
unchanged (pinned by tests/test_io_star.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from cryorefine.errors import CryorefineError

#: Columns that live in a RELION 3.1 data_optics block, one value per optics group.
OPTICS_COLUMNS: tuple[str, ...] = (
    "rlnOpticsGroup",
    "rlnOpticsGroupName",
    "rlnImagePixelSize",
    "rlnMicrographPixelSize",
    "rlnMicrographOriginalPixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnCtfDataAreCtfPremultiplied",
    "rlnBeamTiltX",
    "rlnBeamTiltY",
    "rlnOddZernike",
    "rlnEvenZernike",
    "rlnMagMat00",
    "rlnMagMat01",
    "rlnMagMat10",
    "rlnMagMat11",
    "rlnMtfFileName",
)

# cryorefine columns (RELION has no label for these). Template-matching statistics
# are those of the correlation at the particle's peak.
#: 2DTM z-score of the peak: (MIP − mean) / standard deviation of the correlations
#: over all orientations and defoci searched (Leopard-EM's "scaled_mip").
Z_SCORE = "crfZScore"
#: Maximum intensity projection: the largest cross-correlation value at the peak.
MIP = "crfMip"
#: Mean of the cross-correlation over all searched orientations/defoci at the peak.
CORRELATION_MEAN = "crfCorrelationMean"
#: Standard deviation of those correlations (Leopard-EM calls it correlation_variance).
CORRELATION_STD = "crfCorrelationStd"
#: Number of correlation values (orientations × defoci) behind MIP, mean and std.
TOTAL_CORRELATIONS = "crfTotalCorrelations"
#: Defocus offset of the best match relative to the micrograph's defocus, Å
#: (rlnDefocusU/V already include it).
RELATIVE_DEFOCUS = "crfRelativeDefocus"
#: Pixel size (Å) found by pixel-size refinement against the template.
REFINED_PIXEL_SIZE = "crfRefinedPixelSize"
#: Refined values kept beside the search values in rlnAngle*/rlnCoordinate*.
REFINED_ANGLE_ROT = "crfRefinedAngleRot"
REFINED_ANGLE_TILT = "crfRefinedAngleTilt"
REFINED_ANGLE_PSI = "crfRefinedAnglePsi"
REFINED_COORDINATE_X = "crfRefinedCoordinateX"
REFINED_COORDINATE_Y = "crfRefinedCoordinateY"
REFINED_RELATIVE_DEFOCUS = "crfRefinedRelativeDefocus"
REFINED_MIP = "crfRefinedMip"
REFINED_Z_SCORE = "crfRefinedZScore"
#: The 3D template (reference volume) a particle was found with.
TEMPLATE_NAME = "crfTemplateName"
#: Index of the particle in the program that found it (kept for round trips).
PARTICLE_INDEX = "crfParticleIndex"
#: cryoSPARC's 64-bit particle uid (kept for round trips).
CRYOSPARC_UID = "crfCryosparcUid"

#: Columns read as text even when every value looks like a number (e.g. micrograph
#: names "1", "2"); any column ending in "Name" is text too.
TEXT_COLUMNS: tuple[str, ...] = (
    "rlnImageName",
    "rlnMicrographName",
    "rlnOpticsGroupName",
    "rlnImageOriginalName",
    "rlnMicrographMovieName",
    "rlnMicrographMetadata",
    "rlnCtfImage",
    "rlnCtfPowerSpectrum",
    "rlnGroupName",
    "rlnMtfFileName",
    "rlnOddZernike",
    "rlnEvenZernike",
    TEMPLATE_NAME,
)


def require_columns(
    table: pd.DataFrame, columns: Iterable[str], path: str | Path, purpose: str
) -> None:
    """Raise one CryorefineError naming the file and the first missing column.

    Args:
        table: the particle (or micrograph) table read from `path`.
        columns: names the caller needs.
        path: the file the table came from (named in the message).
        purpose: what the columns are needed for, e.g. "reading particle images".
    """
    missing = [name for name in columns if name not in table.columns]
    if missing:
        others = f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise CryorefineError(
            f"column '{missing[0]}' is missing, and is needed for {purpose}{others}.",
            path=path,
            field=missing[0],
            fix=f"use a file that has {', '.join(missing)}, "
            "e.g. the output of the job that made these particles.",
        )


def split_image_name(name: str) -> tuple[int | None, str]:
    """RELION image name "000012@stack.mrcs" -> (12, "stack.mrcs"); 1-based index.

    A name without "@" is a whole single-image file: (None, name).
    """
    index, at, file_name = name.partition("@")
    if not at:
        return None, name
    if not index.strip().isdigit() or int(index) < 1:
        raise ValueError(f"image name '{name}' does not start with a 1-based index and '@'")
    return int(index), file_name


def format_image_name(index: int, file_name: str) -> str:
    """RELION image name of image `index` (1-based) in `file_name`: "000012@stack.mrcs"."""
    return f"{index:06d}@{file_name}"
