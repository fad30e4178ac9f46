"""Leopard-EM CSV <-> canonical table: documented columns, centre/corner, both round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryorefine.errors import CryorefineError
from cryorefine.io import particles as p
from cryorefine.io.leopard import (
    LEOPARD_COLUMNS,
    leopard_from_table,
    read_leopard_csv,
    table_from_leopard,
    write_leopard_csv,
)
from cryorefine.io.star import read_star_particles
from realdata import cryodrgn_data

# leopard-em 1.3.0, pydantic_models/formats.py: MATCH_TEMPLATE_DF_COLUMN_ORDER.
DOCUMENTED_COLUMNS = [
    "particle_index",
    "mip",
    "scaled_mip",
    "correlation_mean",
    "correlation_variance",
    "total_correlations",
    "pos_x",
    "pos_y",
    "pos_x_img",
    "pos_y_img",
    "pos_x_img_angstrom",
    "pos_y_img_angstrom",
    "phi",
    "theta",
    "psi",
    "relative_defocus",
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
TEMPLATE_SIZE = 99  # odd on purpose: the centre is pos + 99 // 2 = pos + 49


def leopard_match_csv(n: int = 6, refined: bool = False) -> pd.DataFrame:
    """A table as Leopard-EM's match_template writes it (results_to_dataframe)."""
    rng = np.random.default_rng(3)
    pixel_size, half = 1.06, TEMPLATE_SIZE // 2
    pos_x, pos_y = rng.integers(0, 3000, n), rng.integers(0, 3000, n)
    mip = rng.uniform(8, 12, n)
    df = pd.DataFrame(
        {
            "particle_index": np.arange(n) * 3,  # a filtered subset keeps its indices
            "mip": mip,
            "scaled_mip": mip / 1.1,
            "correlation_mean": rng.normal(0, 0.01, n),
            "correlation_variance": rng.uniform(0.9, 1.1, n),
            "total_correlations": np.full(n, 1_630_000),
            "pos_x": pos_x,
            "pos_y": pos_y,
            "pos_x_img": pos_x + half,
            "pos_y_img": pos_y + half,
            "pos_x_img_angstrom": (pos_x + half) * pixel_size,
            "pos_y_img_angstrom": (pos_y + half) * pixel_size,
            "phi": rng.uniform(-180, 180, n),
            "theta": rng.uniform(0, 180, n),
            "psi": rng.uniform(-180, 180, n),
            "relative_defocus": rng.choice([-200.0, 0.0, 400.0], n),
            "defocus_u": np.full(n, 13450.5),
            "defocus_v": np.full(n, 12980.25),
            "astigmatism_angle": np.full(n, 37.5),
            "pixel_size": pixel_size,
            "refined_pixel_size": pixel_size,
            "voltage": 300.0,
            "spherical_aberration": 2.7,
            "amplitude_contrast_ratio": 0.07,
            "phase_shift": 0.0,
            "ctf_B_factor": 60.0,
            "even_zernikes": json.dumps({"Z44c": 1.5, "Z60": -0.25}),
            "odd_zernikes": np.nan,
            "mag_matrix": "[1.01, 0.0, 0.0, 0.99]",
            "micrograph_path": "/data/mic_0001.mrc",
            "template_path": "/data/template_99.mrc",
            "mip_path": "/out/mip.mrc",
            "scaled_mip_path": "/out/scaled_mip.mrc",
            "psi_path": "/out/psi.mrc",
            "theta_path": "/out/theta.mrc",
            "phi_path": "/out/phi.mrc",
            "defocus_path": "/out/defocus.mrc",
            "correlation_average_path": "/out/corr_mean.mrc",
            "correlation_variance_path": "/out/corr_std.mrc",
        }
    )
    if refined:  # as refine_template adds them: offsets applied to both position columns
        offset = rng.integers(-2, 3, (2, n))
        df["refined_pos_x"], df["refined_pos_y"] = pos_x + offset[0], pos_y + offset[1]
        df["refined_pos_x_img"] = df["pos_x_img"] + offset[0]
        df["refined_pos_y_img"] = df["pos_y_img"] + offset[1]
        df["refined_pos_x_img_angstrom"] = df["refined_pos_x_img"] * pixel_size
        df["refined_pos_y_img_angstrom"] = df["refined_pos_y_img"] * pixel_size
        for angle in ("phi", "theta", "psi"):
            df[f"refined_{angle}"] = df[angle] + rng.normal(0, 0.5, n)
        df["refined_relative_defocus"] = df["relative_defocus"] + 25.0
        df["refined_pixel_size"] = pixel_size * 1.002
        df["refined_mip"], df["refined_scaled_mip"] = mip * 1.05, mip / 1.05
    return df


def test_column_list_matches_leopard_documentation() -> None:
    assert list(LEOPARD_COLUMNS) == DOCUMENTED_COLUMNS and len(LEOPARD_COLUMNS) == 39


@pytest.mark.parametrize("refined", [False, True])
def test_leopard_csv_to_canonical_values(tmp_path: Path, refined: bool) -> None:
    leopard = leopard_match_csv(refined=refined)
    path = tmp_path / "particles.csv"
    leopard.to_csv(path)  # Leopard-EM writes the index as an unnamed first column
    table = read_leopard_csv(path)

    np.testing.assert_array_equal(table["rlnCoordinateX"], leopard["pos_x"] + 49)
    np.testing.assert_array_equal(table["rlnCoordinateY"], leopard["pos_y"] + 49)
    np.testing.assert_allclose(
        table["rlnDefocusU"], leopard["defocus_u"] + leopard["relative_defocus"]
    )
    np.testing.assert_allclose(
        table["rlnDefocusV"], leopard["defocus_v"] + leopard["relative_defocus"]
    )
    for leopard_name, canonical in [
        ("phi", "rlnAngleRot"),
        ("theta", "rlnAngleTilt"),
        ("psi", "rlnAnglePsi"),
        ("astigmatism_angle", "rlnDefocusAngle"),
        ("scaled_mip", p.Z_SCORE),
        ("mip", p.MIP),
        ("correlation_variance", p.CORRELATION_STD),
        ("refined_pixel_size", p.REFINED_PIXEL_SIZE),
        ("pixel_size", "rlnImagePixelSize"),
        ("micrograph_path", "rlnMicrographName"),
    ]:
        assert (table[canonical] == leopard[leopard_name]).all(), leopard_name
    if refined:
        np.testing.assert_array_equal(table[p.REFINED_COORDINATE_X], leopard["refined_pos_x"] + 49)
        assert (table[p.REFINED_ANGLE_PSI] == leopard["refined_psi"]).all()
    assert not any(c.startswith("Unnamed") or c.startswith("pos_") for c in table.columns)


@pytest.mark.parametrize("refined", [False, True])
def test_leopard_to_canonical_to_leopard_is_exact(tmp_path: Path, refined: bool) -> None:
    leopard = leopard_match_csv(refined=refined)
    path = tmp_path / "in.csv"
    leopard.to_csv(path, index=False)
    out = write_leopard_csv(
        tmp_path / "out.csv", read_leopard_csv(path), template_size=TEMPLATE_SIZE
    )
    again = pd.read_csv(out)
    columns = [c for c in again.columns if c in leopard.columns]
    assert columns == [c for c in again.columns if not c.startswith(("rln", "crf"))]
    assert set(LEOPARD_COLUMNS) <= set(columns) and set(columns) == set(leopard.columns)
    pd.testing.assert_frame_equal(again[columns], pd.read_csv(path)[columns], rtol=1e-12)


def test_canonical_to_leopard_to_canonical_keeps_every_column(tmp_path: Path) -> None:
    table = read_star_particles(cryodrgn_data("relion5.star"))
    table[p.Z_SCORE] = np.linspace(7, 9, len(table))
    leopard = leopard_from_table(table, template_size=64, template_path="t.mrc")
    np.testing.assert_array_equal(leopard["pos_x"], table["rlnCoordinateX"] - 32)
    np.testing.assert_allclose(leopard["pos_y_img_angstrom"], table["rlnCoordinateY"] * 0.89)
    np.testing.assert_array_equal(leopard["defocus_u"], table["rlnDefocusU"])  # relative 0
    assert list(leopard.columns[:39]) == DOCUMENTED_COLUMNS

    back = read_leopard_csv(write_leopard_csv(tmp_path / "l.csv", table, template_size=64))
    pd.testing.assert_frame_equal(back[table.columns], table, check_dtype=False, rtol=1e-12)


def test_top_left_positions_need_the_template_size() -> None:
    corner_only = leopard_match_csv().drop(columns=["pos_x_img", "pos_y_img"])
    with pytest.raises(CryorefineError, match=r"pos_x, pos_y.*box size"):
        table_from_leopard(corner_only)
    table = table_from_leopard(corner_only, template_size=TEMPLATE_SIZE)
    np.testing.assert_array_equal(table["rlnCoordinateX"], corner_only["pos_x"] + 49)


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(CryorefineError, match=r"not found"):
        read_leopard_csv(tmp_path / "absent.csv")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(CryorefineError, match=r"'pos_x_img' is missing"):
        read_leopard_csv(tmp_path / "x.csv")
    table = table_from_leopard(leopard_match_csv())
    with pytest.raises(CryorefineError, match=r"rlnMicrographName"):
        leopard_from_table(table.drop(columns="rlnMicrographName"), template_size=64)
    existing = tmp_path / "x.csv"
    with pytest.raises(CryorefineError, match=r"exists"):
        write_leopard_csv(existing, table, template_size=64)
    assert existing.read_text() == "a,b\n1,2\n"
