"""Leopard-EM particle CSV <-> the canonical particle table.

Facts about the CSV (read from leopard-em 1.3.0's source, pydantic_models/formats.py
and managers/match_template_manager.py, refine_template_manager.py):

* `pos_x`, `pos_y`: pixel index of the template box's top-left corner in the
  micrograph (the peak's index in the "valid"-mode correlation map);
  `pos_x_img = pos_x + nx // 2` is the particle centre, nx the (cubic) template's
  box size; `*_angstrom` columns are the centre times `pixel_size`.
* `phi, theta, psi`: ZYZ Euler angles, the same numbers as RELION's rot, tilt, psi.
* `defocus_u, defocus_v` (Å): the micrograph's defocus; the particle's is
  `defocus_u + relative_defocus` (likewise v). `astigmatism_angle` and `phase_shift`
  in degrees, `ctf_B_factor` in Å², `voltage` kV, `spherical_aberration` mm.
* `mip`, `scaled_mip` (the 2DTM z-score), `correlation_mean`, `correlation_variance`
  (which holds a standard deviation) and `total_correlations` describe the peak.
* Refinement adds `refined_*` columns: refined_pos_x = refined offset + pos_x (and so
  on), refined_relative_defocus, refined_pixel_size, refined_mip, refined_scaled_mip;
  constrained search adds original_offset_phi/theta/psi.

The top-left <-> centre conversion lives here and nowhere else. Columns the other
side has no name for travel under their own names, so both round trips are lossless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cryorefine.errors import CryorefineError, require_file
from cryorefine.io import particles as p
from cryorefine.io.atomic import atomic_write
from cryorefine.io.particles import require_columns

# Leopard-EM column -> canonical column, values unchanged.
_RENAMED: dict[str, str] = {
    "particle_index": p.PARTICLE_INDEX,
    "mip": p.MIP,
    "scaled_mip": p.Z_SCORE,
    "refined_mip": p.REFINED_MIP,
    "refined_scaled_mip": p.REFINED_Z_SCORE,
    "correlation_mean": p.CORRELATION_MEAN,
    "correlation_variance": p.CORRELATION_STD,
    "total_correlations": p.TOTAL_CORRELATIONS,
    "pos_x_img": "rlnCoordinateX",
    "pos_y_img": "rlnCoordinateY",
    "refined_pos_x_img": p.REFINED_COORDINATE_X,
    "refined_pos_y_img": p.REFINED_COORDINATE_Y,
    "phi": "rlnAngleRot",
    "theta": "rlnAngleTilt",
    "psi": "rlnAnglePsi",
    "refined_phi": p.REFINED_ANGLE_ROT,
    "refined_theta": p.REFINED_ANGLE_TILT,
    "refined_psi": p.REFINED_ANGLE_PSI,
    "original_offset_phi": "crfOriginalOffsetAngleRot",
    "original_offset_theta": "crfOriginalOffsetAngleTilt",
    "original_offset_psi": "crfOriginalOffsetAnglePsi",
    "relative_defocus": p.RELATIVE_DEFOCUS,
    "refined_relative_defocus": p.REFINED_RELATIVE_DEFOCUS,
    "astigmatism_angle": "rlnDefocusAngle",
    "pixel_size": "rlnMicrographPixelSize",
    "refined_pixel_size": p.REFINED_PIXEL_SIZE,
    "voltage": "rlnVoltage",
    "spherical_aberration": "rlnSphericalAberration",
    "amplitude_contrast_ratio": "rlnAmplitudeContrast",
    "phase_shift": "rlnPhaseShift",
    "ctf_B_factor": "rlnCtfBfactor",
    "even_zernikes": "crfLeopardEvenZernikes",  # JSON {"Z44c": ...}, not RELION's list
    "odd_zernikes": "crfLeopardOddZernikes",
    "mag_matrix": "crfLeopardMagMatrix",
    "micrograph_path": "rlnMicrographName",
    "template_path": p.TEMPLATE_NAME,
    "mip_path": "crfMipMapName",
    "scaled_mip_path": "crfZScoreMapName",
    "psi_path": "crfAnglePsiMapName",
    "theta_path": "crfAngleTiltMapName",
    "phi_path": "crfAngleRotMapName",
    "defocus_path": "crfRelativeDefocusMapName",
    "correlation_average_path": "crfCorrelationMeanMapName",
    "correlation_variance_path": "crfCorrelationStdMapName",
}
# Leopard-EM columns computed from others (rebuilt on write, not kept on read).
_DERIVED = (
    "pos_x",
    "pos_y",
    "pos_x_img_angstrom",
    "pos_y_img_angstrom",
    "refined_pos_x",
    "refined_pos_y",
    "refined_pos_x_img_angstrom",
    "refined_pos_y_img_angstrom",
    "defocus_u",
    "defocus_v",
)
# Leopard-EM's column order (the 39 columns its ParticleStack requires), with the
# refined and constrained-search columns inserted where its outputs put them.
_COLUMN_ORDER = [
    "particle_index",
    "mip",
    "scaled_mip",
    "refined_mip",
    "refined_scaled_mip",
    "correlation_mean",
    "correlation_variance",
    "total_correlations",
    "pos_x",
    "pos_y",
    "pos_x_img",
    "pos_y_img",
    "pos_x_img_angstrom",
    "pos_y_img_angstrom",
    "refined_pos_x",
    "refined_pos_y",
    "refined_pos_x_img",
    "refined_pos_y_img",
    "refined_pos_x_img_angstrom",
    "refined_pos_y_img_angstrom",
    "phi",
    "theta",
    "psi",
    "refined_phi",
    "refined_theta",
    "refined_psi",
    "original_offset_phi",
    "original_offset_theta",
    "original_offset_psi",
    "relative_defocus",
    "refined_relative_defocus",
    "defocus_u",
    "defocus_v",
    "astigmatism_angle",
    "pixel_size",
    "refined_pixel_size",
    "voltage",
    "spherical_aberration",
    "amplitude_contrast_ratio",
    "phase_shift",
    "ctf_B_factor",
    "even_zernikes",
    "odd_zernikes",
    "mag_matrix",
    "micrograph_path",
    "template_path",
    "mip_path",
    "scaled_mip_path",
    "psi_path",
    "theta_path",
    "phi_path",
    "defocus_path",
    "correlation_average_path",
    "correlation_variance_path",
]
#: The 39 columns every Leopard-EM particle CSV has (its ParticleStack refuses others).
LEOPARD_COLUMNS: tuple[str, ...] = tuple(
    c
    for c in _COLUMN_ORDER
    if not c.startswith(("refined_", "original_offset_")) or c == "refined_pixel_size"
)
_DEFAULTS = {"phase_shift": 0.0, "ctf_B_factor": 0.0, "relative_defocus": 0.0}


def table_from_leopard(
    leopard: pd.DataFrame, template_size: int | None = None, source: str | Path = "Leopard-EM table"
) -> pd.DataFrame:
    """The canonical table of a Leopard-EM particle DataFrame.

    Args:
        leopard: its columns (see the module doc); unknown columns are kept as they are.
        template_size: box size of the template, needed only when the CSV has the
            top-left `pos_x/pos_y` but not the centre `pos_x_img/pos_y_img`.
        source: named in error messages.
    """
    leopard = leopard.loc[:, ~leopard.columns.str.startswith("Unnamed:")].reset_index(drop=True)
    if "pos_x_img" not in leopard.columns and {"pos_x", "pos_y"} <= set(leopard.columns):
        if template_size is None:
            raise CryorefineError(
                "the table has only top-left positions (pos_x, pos_y), not centres.",
                path=source,
                field="pos_x_img",
                fix="pass the template's box size so the centre can be computed.",
            )
        leopard = leopard.assign(
            pos_x_img=leopard["pos_x"] + template_size // 2,
            pos_y_img=leopard["pos_y"] + template_size // 2,
        )
    needed = ["pos_x_img", "pos_y_img", "phi", "theta", "psi", "defocus_u", "defocus_v"]
    require_columns(leopard, [*needed, "pixel_size"], source, "converting a Leopard-EM table")
    leopard = leopard.assign(**{k: v for k, v in _DEFAULTS.items() if k not in leopard.columns})
    table = leopard.drop(columns=[c for c in _DERIVED if c in leopard.columns])
    table = table.rename(columns=_RENAMED)
    table["rlnDefocusU"] = leopard["defocus_u"] + leopard["relative_defocus"]
    table["rlnDefocusV"] = leopard["defocus_v"] + leopard["relative_defocus"]
    if "rlnImagePixelSize" not in table.columns:
        # Particles are cut from the micrograph at its pixel size.
        table["rlnImagePixelSize"] = leopard["pixel_size"]
    return table


def leopard_from_table(
    table: pd.DataFrame, template_size: int, template_path: str | None = None
) -> pd.DataFrame:
    """The Leopard-EM particle DataFrame of a canonical table.

    Args:
        table: canonical particle table (needs centres, angles, CTF and a pixel size).
        template_size: box size (pixels) of the cubic template: pos_x = centre − size // 2.
        template_path: written to template_path where the table has no crfTemplateName.

    Columns Leopard-EM has no name for (e.g. rlnImageName) follow its own columns.
    Statistics the table lacks (mip, map paths, ...) are left empty.
    """
    needed = ["rlnCoordinateX", "rlnCoordinateY", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    needed += ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage"]
    needed += ["rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMicrographName"]
    require_columns(table, needed, "particle table", "writing Leopard-EM's CSV")
    pixel_column = next(
        (c for c in ("rlnMicrographPixelSize", "rlnImagePixelSize") if c in table), None
    )
    if pixel_column is None:
        require_columns(
            table, ["rlnMicrographPixelSize"], "particle table", "writing Leopard-EM's CSV"
        )
    table = table.reset_index(drop=True)
    back = {canonical: leopard for leopard, canonical in _RENAMED.items()}
    back[str(pixel_column)] = "pixel_size"
    out = table.rename(columns={c: back[c] for c in table.columns if c in back})
    if pixel_column == "rlnImagePixelSize":
        out["rlnImagePixelSize"] = table[pixel_column]  # keep it for the way back
    if "particle_index" not in out.columns:
        out["particle_index"] = np.arange(len(out))
    if "template_path" not in out.columns and template_path is not None:
        out["template_path"] = template_path
    out = out.assign(**{k: v for k, v in _DEFAULTS.items() if k not in out.columns})
    half = template_size // 2
    out["defocus_u"] = table["rlnDefocusU"] - out["relative_defocus"]
    out["defocus_v"] = table["rlnDefocusV"] - out["relative_defocus"]
    for prefix in ("", "refined_"):
        for axis in "xy":
            centre = f"{prefix}pos_{axis}_img"
            if centre in out.columns:
                out[f"{prefix}pos_{axis}"] = out[centre] - half
                out[f"{centre}_angstrom"] = out[centre] * out["pixel_size"]
    present = set(out.columns)
    ordered = [c for c in _COLUMN_ORDER if c in present or c in LEOPARD_COLUMNS]
    extra = [c for c in out.columns if c not in _COLUMN_ORDER]
    return out.reindex(columns=ordered + extra)


def read_leopard_csv(path: str | Path, template_size: int | None = None) -> pd.DataFrame:
    """The canonical table of a Leopard-EM particle CSV (see `table_from_leopard`)."""
    path = Path(path)
    path = require_file(path, "Leopard-EM CSV")
    try:
        leopard = pd.read_csv(path)
    except (ValueError, OSError) as error:
        raise CryorefineError(
            f"not a readable CSV file ({error}).", path=path, fix="give a Leopard-EM particle CSV."
        ) from error
    return table_from_leopard(leopard, template_size=template_size, source=path)


def write_leopard_csv(
    path: str | Path,
    table: pd.DataFrame,
    overwrite: bool = False,
    *,
    template_size: int,
    template_path: str | None = None,
) -> Path:
    """Write a canonical table as a Leopard-EM particle CSV, atomically (`leopard_from_table`)."""
    leopard = leopard_from_table(table, template_size, template_path)
    return atomic_write(path, lambda temporary: leopard.to_csv(temporary, index=False), overwrite)
