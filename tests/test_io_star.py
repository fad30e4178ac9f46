"""RELION STAR I/O: 3.0 / 3.1 / 5 real files, round trips, RELION 3.1 reading our output."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from cryorefine.errors import CryorefineError
from cryorefine.io.mrc import read_mrc, write_mrc
from cryorefine.io.particles import OPTICS_COLUMNS, Z_SCORE
from cryorefine.io.star import (
    read_star_micrographs,
    read_star_particles,
    write_star_micrographs,
    write_star_particles,
)
from realdata import cryodrgn_data, starfile_data

REAL_STAR_FILES = [
    (cryodrgn_data, "FinalRefinement-OriginalParticles-PfCRT.star"),  # 3.0, origins in px
    (cryodrgn_data, "empiar_10076_7.star"),  # 3.0, numeric micrograph names
    (cryodrgn_data, "sta_testing_bin8.star"),  # 3.0
    (cryodrgn_data, "relion31.star"),  # 3.1
    (cryodrgn_data, "relion31.v2.star"),  # 3.1, particles block before optics
    (cryodrgn_data, "relion31.6opticsgroups.star"),  # 3.1, six optics groups
    (cryodrgn_data, "toy_projections_13.star"),  # optics block, no rlnOpticsGroup column
    (cryodrgn_data, "relion5.star"),  # 5
]


def assert_tables_equal(actual: pd.DataFrame, expected: pd.DataFrame, rtol: float = 1e-6) -> None:
    """Same columns and values; floats to `rtol` relative, text exactly."""
    assert sorted(actual.columns) == sorted(expected.columns)
    pd.testing.assert_frame_equal(
        actual[expected.columns], expected, check_dtype=False, rtol=rtol, atol=1e-12
    )


@pytest.mark.parametrize(("source", "name"), REAL_STAR_FILES, ids=[n for _, n in REAL_STAR_FILES])
def test_real_files_round_trip_through_relion31(tmp_path: Path, source, name: str) -> None:
    table = read_star_particles(source(name))
    assert (
        "rlnOpticsGroup" in table and "rlnOriginX" not in table and "rlnMagnification" not in table
    )
    written = write_star_particles(tmp_path / "out.star", table)
    assert_tables_equal(read_star_particles(written), table)

    blocks = starfile.read(written, always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    assert len(blocks["optics"]) == table["rlnOpticsGroup"].nunique()
    moved = [c for c in OPTICS_COLUMNS if c in blocks["particles"] and c != "rlnOpticsGroup"]
    assert moved == []


def test_relion30_legacy_units_are_converted() -> None:
    table = read_star_particles(cryodrgn_data("FinalRefinement-OriginalParticles-PfCRT.star"))
    # rlnDetectorPixelSize 1.035 µm at rlnMagnification 10000 -> 1.035 Å/px.
    np.testing.assert_allclose(table["rlnImagePixelSize"], 1.035, rtol=1e-12)
    np.testing.assert_allclose(table["rlnOriginXAngst"][:2], [-0.14063 * 1.035, -0.14062 * 1.035])
    np.testing.assert_allclose(table["rlnOriginYAngst"][:2], [-0.04688 * 1.035, 0.046875 * 1.035])
    assert (table["rlnOpticsGroup"] == 1).all() and table["rlnOpticsGroupName"][0] == "opticsGroup1"

    empiar = read_star_particles(cryodrgn_data("empiar_10076_7.star"))
    np.testing.assert_allclose(empiar["rlnImagePixelSize"], 5e4 / 38168, rtol=1e-12)
    assert empiar["rlnMicrographName"].tolist() == [
        str(i) for i in range(1, 8)
    ]  # text, not numbers

    subtomo = read_star_particles(starfile_data("one_loop.star"))  # 3.0 sub-tomograms
    np.testing.assert_allclose(subtomo["rlnImagePixelSize"], 5.0, rtol=1e-12)


def test_writer_refuses_optics_relion_cannot_read(tmp_path: Path) -> None:
    # RELION 3.1 needs pixel size, voltage and Cs in data_optics; without one it
    # silently reads nothing (checked with relion_star_handler), so we refuse.
    no_ctf = read_star_particles(starfile_data("one_loop.star"))
    with pytest.raises(CryorefineError, match=r"no rlnVoltage, which RELION 3.1 needs") as caught:
        write_star_particles(tmp_path / "subtomo.star", no_ctf)
    assert caught.value.field == "rlnVoltage" and caught.value.fix
    table = read_star_particles(cryodrgn_data("relion31.star"))
    for column in ("rlnImagePixelSize", "rlnSphericalAberration"):
        with pytest.raises(CryorefineError, match=column):
            write_star_particles(tmp_path / "p.star", table.drop(columns=column))
    with pytest.raises(CryorefineError, match="rlnMicrographPixelSize"):
        write_star_micrographs(tmp_path / "m.star", table)
    assert list(tmp_path.iterdir()) == []
    # Picked coordinates carry the micrograph's pixel size, which RELION accepts too.
    picks = table.drop(columns="rlnImagePixelSize").assign(rlnMicrographPixelSize=1.4)
    written = write_star_particles(tmp_path / "picks.star", picks)
    assert read_star_particles(written)["rlnMicrographPixelSize"].eq(1.4).all()


def test_optics_values_are_merged_into_every_row() -> None:
    path = cryodrgn_data("relion31.6opticsgroups.star")
    raw = starfile.read(path, always_dict=True)
    table = read_star_particles(path)
    assert len(table) == len(raw["particles"]) == 139
    optics = raw["optics"].set_index("rlnOpticsGroup")
    for column in ("rlnVoltage", "rlnSphericalAberration", "rlnImagePixelSize", "rlnEvenZernike"):
        expected = optics.loc[raw["particles"]["rlnOpticsGroup"], column].to_numpy()
        assert (table[column].to_numpy() == expected).all(), column
    np.testing.assert_array_equal(table["rlnDefocusU"], raw["particles"]["rlnDefocusU"])

    relion5 = read_star_particles(cryodrgn_data("relion5.star"))
    assert relion5["rlnVoltage"].eq(100.0).all() and relion5["rlnImageSize"].eq(448).all()
    assert relion5["rlnOddZernike"][0].startswith("[0.0680480107376,")


def test_rows_without_optics_group_are_grouped_by_distinct_optics(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {
            "rlnImageName": [f"{i:06d}@s.mrcs" for i in range(1, 5)],
            "rlnVoltage": [300.0, 300.0, 200.0, 300.0],
            "rlnSphericalAberration": 2.7,
            "rlnImagePixelSize": [1.0, 1.0, 1.0, 1.0],
            Z_SCORE: [7.5, 8.25, 9.0, 10.5],
        }
    )
    back = read_star_particles(write_star_particles(tmp_path / "g.star", table))
    assert back["rlnOpticsGroup"].tolist() == [1, 1, 2, 1]
    assert_tables_equal(back[table.columns], table)


def test_inconsistent_optics_group_is_refused(tmp_path: Path) -> None:
    table = read_star_particles(cryodrgn_data("relion31.star"))
    table.loc[2, "rlnVoltage"] = 200.0
    with pytest.raises(CryorefineError, match=r"optics group 1 has different values of rlnVoltage"):
        write_star_particles(tmp_path / "bad.star", table)
    assert list(tmp_path.iterdir()) == []


def test_micrographs_round_trip_and_relion30_pixel_size(tmp_path: Path) -> None:
    micrographs = pd.DataFrame(
        {
            "rlnMicrographName": ["MotionCorr/a.mrc", "MotionCorr/b.mrc"],
            "rlnDefocusU": [12000.5, 15000.25],
            "rlnOpticsGroup": [1, 2],
            "rlnMicrographPixelSize": [0.83, 1.06],
            "rlnVoltage": [300.0, 300.0],
            "rlnSphericalAberration": 2.7,
        }
    )
    path = write_star_micrographs(tmp_path / "micrographs.star", micrographs)
    assert list(starfile.read(path, always_dict=True)) == ["optics", "micrographs"]
    assert_tables_equal(read_star_micrographs(path).drop(columns="rlnOpticsGroupName"), micrographs)

    legacy = tmp_path / "legacy.star"
    legacy.write_text(
        "data_\nloop_\n_rlnMicrographName\n_rlnMagnification\n_rlnDetectorPixelSize\n"
        "001.mrc 50000 5.0\n"
    )
    table = read_star_micrographs(legacy)
    assert table["rlnMicrographName"][0] == "001.mrc"
    assert table["rlnMicrographPixelSize"][0] == pytest.approx(1.0)


def test_bad_input_names_file_column_and_fix(tmp_path: Path) -> None:
    with pytest.raises(CryorefineError, match=r"not found"):
        read_star_particles(tmp_path / "absent.star")

    no_names = tmp_path / "coords.star"
    no_names.write_text("data_particles\nloop_\n_rlnCoordinateX\n_rlnCoordinateY\n10 20\n")
    with pytest.raises(CryorefineError) as caught:
        read_star_particles(no_names, require=["rlnImageName"])
    assert caught.value.path == no_names and caught.value.field == "rlnImageName"
    assert "rlnImageName" in str(caught.value) and caught.value.fix

    pixels = tmp_path / "pixels.star"
    pixels.write_text("data_\nloop_\n_rlnImageName\n_rlnOriginX\n1@a.mrcs 2.0\n")
    with pytest.raises(CryorefineError, match=r"rlnImagePixelSize.*converting rlnOriginX"):
        read_star_particles(pixels)

    orphan = tmp_path / "orphan.star"
    orphan.write_text(
        "data_optics\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n1 300\n\n"
        "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n1@a.mrcs 2\n"
    )
    with pytest.raises(CryorefineError, match=r"optics group\(s\) \[2\]"):
        read_star_particles(orphan)

    optics_only = tmp_path / "optics_only.star"
    optics_only.write_text("data_optics\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n1 300\n")
    with pytest.raises(CryorefineError, match=r"no data_particles block \(found: data_optics\)"):
        read_star_particles(optics_only)


def test_no_silent_overwrite_and_no_leftovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = read_star_particles(cryodrgn_data("relion31.star"))
    path = write_star_particles(tmp_path / "p.star", table)
    before = path.read_bytes()
    with pytest.raises(CryorefineError, match=r"exists"):
        write_star_particles(path, table)
    assert path.read_bytes() == before

    def broken_write(blocks: object, filename: Path, **kwargs: object) -> None:
        Path(filename).write_text("data_optics\nloop_\n")
        raise OSError("disk full")

    monkeypatch.setattr(starfile, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        write_star_particles(path, table.head(2), overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.star"]


@pytest.mark.relion
def test_relion_star_handler_reads_and_keeps_what_we_write(tmp_path: Path, relion_bin: str) -> None:
    table = read_star_particles(cryodrgn_data("relion31.6opticsgroups.star"))
    table[Z_SCORE] = np.linspace(6.0, 12.0, len(table))
    ours = write_star_particles(tmp_path / "ours.star", table)
    theirs = tmp_path / "theirs.star"
    done = subprocess.run(
        [f"{relion_bin}/relion_star_handler", "--i", str(ours), "--o", str(theirs)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "unknown label: crfZScore" in done.stdout + done.stderr  # ignored but maintained
    # RELION writes 6 significant digits where it uses exponent notation.
    assert_tables_equal(read_star_particles(theirs), table, rtol=1e-5)


@pytest.mark.relion
def test_relion_star_handler_reads_our_micrographs(tmp_path: Path, relion_bin: str) -> None:
    micrographs = pd.DataFrame(
        {
            "rlnMicrographName": ["MotionCorr/a.mrc", "MotionCorr/b.mrc"],
            "rlnDefocusU": [12000.5, 15000.25],
            "rlnOpticsGroup": [1, 2],
            "rlnMicrographPixelSize": [0.83, 1.06],
            "rlnVoltage": [300.0, 200.0],
            "rlnSphericalAberration": [2.7, 2.0],
        }
    )
    ours = write_star_micrographs(tmp_path / "ours.star", micrographs)
    theirs = tmp_path / "theirs.star"
    command = [f"{relion_bin}/relion_star_handler", "--i", str(ours), "--o", str(theirs)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_tables_equal(read_star_micrographs(theirs), read_star_micrographs(ours))


@pytest.mark.relion
def test_relion_reconstruct_uses_our_stack_and_optics(tmp_path: Path, relion_bin: str) -> None:
    n, box, pixel_size = 12, 16, 2.5
    rng = np.random.default_rng(1)
    write_mrc(tmp_path / "particles.mrcs", rng.normal(size=(n, box, box)), 1.0, is_stack=True)
    table = pd.DataFrame(
        {
            "rlnImageName": [f"{i:06d}@particles.mrcs" for i in range(1, n + 1)],
            "rlnAngleRot": rng.uniform(-180, 180, n),
            "rlnAngleTilt": rng.uniform(0, 180, n),
            "rlnAnglePsi": rng.uniform(-180, 180, n),
            "rlnOriginXAngst": np.zeros(n),
            "rlnOriginYAngst": np.zeros(n),
            "rlnDefocusU": np.full(n, 15000.0),
            "rlnDefocusV": np.full(n, 14000.0),
            "rlnDefocusAngle": np.full(n, 30.0),
            "rlnOpticsGroup": np.ones(n, dtype=int),
            "rlnImagePixelSize": pixel_size,
            "rlnImageSize": box,
            "rlnImageDimensionality": 2,
            "rlnVoltage": 300.0,
            "rlnSphericalAberration": 2.7,
            "rlnAmplitudeContrast": 0.1,
            Z_SCORE: rng.uniform(7, 9, n),
        }
    )
    write_star_particles(tmp_path / "particles.star", table)
    done = subprocess.run(
        [f"{relion_bin}/relion_reconstruct", "--i", "particles.star", "--o", "map.mrc", "--ctf"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    volume, voxel = read_mrc(tmp_path / "map.mrc")
    assert volume.shape == (box, box, box) and np.isfinite(volume).all() and volume.std() > 0
    assert voxel == pytest.approx(pixel_size, rel=1e-6)  # taken from our data_optics
