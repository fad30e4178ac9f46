"""cryoSPARC .cs particle files (numpy structured arrays) -> the canonical particle table.

Field meanings and the conversions to RELION 3.1 columns:

* blob/path, blob/idx (0-based) -> rlnImageName "{idx+1:06d}@{path}". A leading ">"
  (cryoSPARC's mark for "relative to the project folder") is dropped, so image names
  are relative to the cryoSPARC project folder. blob/psize_A -> rlnImagePixelSize,
  blob/shape (y, x) -> rlnImageSize.
* ctf/df1_A, df2_A -> rlnDefocusU/V (Å); df_angle_rad, phase_shift_rad -> degrees;
  accel_kv, cs_mm, amp_contrast, bfactor -> rlnVoltage, rlnSphericalAberration,
  rlnAmplitudeContrast, rlnCtfBfactor; exp_group_id (0-based) -> rlnOpticsGroup + 1.
* alignments3D/pose is an axis-angle rotation vector (radians). Its rotation matrix R
  (Rodrigues) is the transpose of RELION's A (engine/so3.py): A = Rᵀ. Pinned by two
  independent readers: cryodrgn 4.3.1 (parse_pose_csparc transposes expmap(pose),
  parse_pose_star uses RELION's A; tests compare to its reference pose.cs.pkl) and
  pyem's csparc2star (its expmap builds Rᵀ directly).
* alignments3D/shift (pixels of alignments3D/psize_A) -> rlnOriginXAngst/YAngst, same
  sign (both readers copy it to rlnOriginX/Y unchanged). split -> rlnRandomSubset + 1,
  class -> rlnClassNumber + 1.
* location/center_x_frac, center_y_frac times micrograph_shape (y, x) ->
  rlnCoordinateX/Y, location/micrograph_path -> rlnMicrographName, as stored (no flip);
  uid -> crfCryosparcUid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryorefine.engine.so3 import matrix_to_euler
from cryorefine.errors import CryorefineError, require_file
from cryorefine.io.particles import CRYOSPARC_UID, format_image_name


def rotation_vector_to_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Rotation matrices of axis-angle vectors (Rodrigues' formula).

    Args:
        vectors: (..., 3) axis × angle (radians), (x, y, z).

    Returns:
        (..., 3, 3) R with R·v = v and R rotating counter-clockwise (right-hand rule)
        by |v| about v: R = I + sin θ K + (1 − cos θ) K², K the cross-product matrix
        of the unit axis.
    """
    angle = torch.linalg.vector_norm(vectors, dim=-1)
    axis = vectors / torch.where(angle > 0, angle, torch.ones_like(angle))[..., None]
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack(
        [torch.stack(row, -1) for row in ([zero, -z, y], [z, zero, -x], [-y, x, zero])], -2
    )
    eye = torch.eye(3, dtype=vectors.dtype, device=vectors.device)
    s, c = angle.sin()[..., None, None], angle.cos()[..., None, None]
    return eye + s * k + (1 - c) * (k @ k)


def _text(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def table_from_cryosparc(
    records: np.ndarray, source: str | Path = "cryoSPARC records"
) -> pd.DataFrame:
    """The canonical particle table of cryoSPARC particle records (see the module doc)."""
    names = set(records.dtype.names or ())
    for field in ("blob/path", "blob/idx"):
        if field not in names:
            raise CryorefineError(
                f"field '{field}' is missing: these are not particle images.",
                path=source,
                field=field,
                fix="export the particles of an extraction or refinement job (particles.cs).",
            )
    table = pd.DataFrame()
    paths = [name.removeprefix(">") for name in _text(records["blob/path"])]
    table["rlnImageName"] = [
        format_image_name(int(i) + 1, f) for i, f in zip(records["blob/idx"], paths, strict=True)
    ]
    if "location/micrograph_path" in names:
        table["rlnMicrographName"] = [
            m.removeprefix(">") for m in _text(records["location/micrograph_path"])
        ]
    if {"location/center_x_frac", "location/micrograph_shape"} <= names:
        shape = records["location/micrograph_shape"].astype(np.float64)
        table["rlnCoordinateX"] = records["location/center_x_frac"] * shape[:, 1]
        table["rlnCoordinateY"] = records["location/center_y_frac"] * shape[:, 0]
    if "alignments3D/pose" in names:
        pose = torch.as_tensor(np.asarray(records["alignments3D/pose"], dtype=np.float64))
        angles = matrix_to_euler(rotation_vector_to_matrix(pose).transpose(-1, -2))  # A = Rᵀ
        for column, values in zip(
            ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"), angles, strict=True
        ):
            table[column] = values.numpy()
    if "alignments3D/shift" in names:
        psize_field = "alignments3D/psize_A" if "alignments3D/psize_A" in names else "blob/psize_A"
        shift = (
            np.asarray(records["alignments3D/shift"], np.float64) * records[psize_field][:, None]
        )
        table["rlnOriginXAngst"], table["rlnOriginYAngst"] = shift[:, 0], shift[:, 1]
    plain = {
        "ctf/df1_A": ("rlnDefocusU", 1.0),
        "ctf/df2_A": ("rlnDefocusV", 1.0),
        "ctf/df_angle_rad": ("rlnDefocusAngle", 180 / np.pi),
        "ctf/phase_shift_rad": ("rlnPhaseShift", 180 / np.pi),
        "ctf/bfactor": ("rlnCtfBfactor", 1.0),
        "ctf/accel_kv": ("rlnVoltage", 1.0),
        "ctf/cs_mm": ("rlnSphericalAberration", 1.0),
        "ctf/amp_contrast": ("rlnAmplitudeContrast", 1.0),
        "blob/psize_A": ("rlnImagePixelSize", 1.0),
    }
    for field, (column, scale) in plain.items():
        if field in names:
            table[column] = np.asarray(records[field], np.float64) * scale
    if "blob/shape" in names:
        table["rlnImageSize"] = np.asarray(records["blob/shape"])[:, -1].astype(np.int64)
        table["rlnImageDimensionality"] = 2
    for field, column in (
        ("ctf/exp_group_id", "rlnOpticsGroup"),
        ("alignments3D/split", "rlnRandomSubset"),
        ("alignments3D/class", "rlnClassNumber"),
    ):
        if field in names:
            table[column] = np.asarray(records[field]).astype(np.int64) + 1  # RELION counts from 1
    if "uid" in names:
        table[CRYOSPARC_UID] = records["uid"]
    return table


def read_cryosparc_particles(path: str | Path) -> pd.DataFrame:
    """The canonical particle table of a cryoSPARC particles .cs file."""
    path = Path(path)
    path = require_file(path, "cryoSPARC file")
    try:
        records = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise CryorefineError(
            f"not a readable cryoSPARC .cs file ({error}).",
            path=path,
            fix="give the particles .cs file exported by cryoSPARC.",
        ) from error
    if not isinstance(records, np.ndarray) or records.dtype.names is None:
        raise CryorefineError(
            "not a cryoSPARC .cs file (no named fields).",
            path=path,
            fix="give the particles .cs file exported by cryoSPARC.",
        )
    return table_from_cryosparc(records, source=path)
