"""cryoSPARC .cs -> canonical table, pinned against real files and cryodrgn's readings."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryorefine.engine.so3 import angular_distance, euler_to_matrix
from cryorefine.errors import CryorefineError
from cryorefine.io.cryosparc import (
    read_cryosparc_particles,
    rotation_vector_to_matrix,
    table_from_cryosparc,
)
from cryorefine.io.particles import split_image_name
from cryorefine.io.star import read_star_particles, write_star_particles
from realdata import cryodrgn_data


def relion_matrices(table: pd.DataFrame) -> torch.Tensor:
    angles = (
        torch.tensor(table[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    )
    return euler_to_matrix(*angles)


def test_rodrigues_matches_scipy_and_the_right_hand_rule() -> None:
    vectors = torch.tensor(np.random.default_rng(0).normal(size=(50, 3)) * 1.5)
    vectors[0] = 0.0
    ours = rotation_vector_to_matrix(vectors)
    truth = Rotation.from_rotvec(vectors.numpy()).as_matrix()
    np.testing.assert_allclose(ours.numpy(), truth, atol=1e-12)
    quarter_turn_about_z = rotation_vector_to_matrix(torch.tensor([0.0, 0.0, np.pi / 2]))
    np.testing.assert_allclose(
        quarter_turn_about_z @ torch.tensor([1.0, 0, 0]), [0, 1, 0], atol=1e-15
    )


def test_ctf_and_image_names_match_the_paired_relion_star() -> None:
    # cryodrgn's tests/data holds the same 7 EMPIAR-10076 particles as .cs and as STAR.
    cs = read_cryosparc_particles(cryodrgn_data("empiar_10076_7.cs"))
    star = read_star_particles(cryodrgn_data("empiar_10076_7.star"))
    assert [split_image_name(n) for n in cs["rlnImageName"]] == [
        split_image_name(n) for n in star["rlnImageName"]
    ]
    assert cs["rlnImageName"][0] == "000001@empiar_10076_7.mrc"  # blob/idx 0 -> 1-based
    # .cs stores float32: 1e-6 relative covers its rounding of the STAR's decimals.
    for column in ("rlnDefocusU", "rlnDefocusV", "rlnVoltage", "rlnSphericalAberration"):
        np.testing.assert_allclose(cs[column], star[column], rtol=1e-6, err_msg=column)
    np.testing.assert_allclose(cs["rlnAmplitudeContrast"], star["rlnAmplitudeContrast"], rtol=1e-6)
    np.testing.assert_allclose(cs["rlnDefocusAngle"], star["rlnDefocusAngle"], atol=1e-5)  # degrees
    np.testing.assert_allclose(cs["rlnImagePixelSize"], star["rlnImagePixelSize"], rtol=1e-6)
    assert (cs["rlnImageSize"] == 320).all()


def test_pose_convention_pinned_by_cryodrgn_reference_outputs() -> None:
    # 1. cryodrgn's pose.star.pkl (from the RELION 3.0 file below) holds RELION's A:
    #    our euler_to_matrix of the STAR angles reproduces it, origins in px / box 300.
    star = read_star_particles(cryodrgn_data("FinalRefinement-OriginalParticles-PfCRT.star"))
    with cryodrgn_data("pose.star.pkl").open("rb") as handle:
        star_rotations, star_translations = pickle.load(handle)
    assert angular_distance(relion_matrices(star), torch.tensor(star_rotations)).max() < 1e-3
    origin_pixels = star[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 1.035
    np.testing.assert_allclose(star_translations * 300, origin_pixels, atol=1e-6)

    # 2. cryodrgn's pose.cs.pkl is its reading of this .cs in that same convention.
    cs = read_cryosparc_particles(cryodrgn_data("cryosparc_P12_J24_001_particles.cs"))
    with cryodrgn_data("pose.cs.pkl").open("rb") as handle:
        cs_rotations, cs_translations = pickle.load(handle)  # float32, box 180
    ours = relion_matrices(cs)
    reference = torch.tensor(cs_rotations, dtype=torch.float64)
    assert (ours - reference).abs().max() < 2e-6  # float32 storage
    # angular_distance's acos turns float32 rounding into up to ~0.05° near 0.
    assert angular_distance(ours, reference).max() < 0.1
    # The transposed (wrong) convention is far off: the test can tell them apart.
    assert angular_distance(ours.transpose(-1, -2), reference).median() > 10
    shift_pixels = cs[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 2.95
    np.testing.assert_allclose(shift_pixels, cs_translations * 180, atol=1e-4)
    assert set(cs["rlnRandomSubset"]) == {1, 2}


def test_cs_to_relion31_star_round_trip(tmp_path: Path) -> None:
    for name in ("cryosparc_P12_J24_001_particles.cs", "cryosparc_J2_particles_exported.cs"):
        table = read_cryosparc_particles(cryodrgn_data(name))
        back = read_star_particles(write_star_particles(tmp_path / f"{name}.star", table))
        pd.testing.assert_frame_equal(back[table.columns], table, check_dtype=False, rtol=1e-6)
    assert table["rlnImageName"][0].startswith("000001@J1/imported/")  # '>' dropped


def test_micrograph_locations_use_shape_y_x() -> None:
    # location/micrograph_shape is (ny, nx); fractions are taken as stored (no flip).
    records = np.zeros(
        2,
        dtype=[
            ("blob/path", "S16"),
            ("blob/idx", "<u4"),
            ("location/micrograph_path", "S16"),
            ("location/micrograph_shape", "<u4", (2,)),
            ("location/center_x_frac", "<f4"),
            ("location/center_y_frac", "<f4"),
        ],
    )
    records["blob/path"] = b">J3/stack.mrc"
    records["blob/idx"] = [4, 0]
    records["location/micrograph_path"] = b">J2/mic.mrc"
    records["location/micrograph_shape"] = [3000, 4000]
    records["location/center_x_frac"] = [0.25, 0.5]
    records["location/center_y_frac"] = [0.5, 0.125]
    table = table_from_cryosparc(records)
    assert table["rlnImageName"].tolist() == ["000005@J3/stack.mrc", "000001@J3/stack.mrc"]
    assert (table["rlnMicrographName"] == "J2/mic.mrc").all()
    np.testing.assert_array_equal(table["rlnCoordinateX"], [1000.0, 2000.0])
    np.testing.assert_array_equal(table["rlnCoordinateY"], [1500.0, 375.0])


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(CryorefineError, match=r"not found"):
        read_cryosparc_particles(tmp_path / "absent.cs")
    records = np.zeros(3, dtype=[("uid", "<u8"), ("ctf/df1_A", "<f4")])
    with (tmp_path / "ctf_only.cs").open("wb") as handle:
        np.save(handle, records)
    with pytest.raises(CryorefineError, match=r"'blob/path' is missing"):
        read_cryosparc_particles(tmp_path / "ctf_only.cs")
    (tmp_path / "text.cs").write_text("not numpy")
    with pytest.raises(CryorefineError, match=r"not a readable cryoSPARC"):
        read_cryosparc_particles(tmp_path / "text.cs")
