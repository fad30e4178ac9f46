"""`cryorefine simulate`: the files, their sizes and tables; bad configs fail before any output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cryorefine.cli import app
from cryorefine.config import load_config
from cryorefine.io.mrc import mrc_info, read_mrc
from cryorefine.io.star import read_star_micrographs, read_star_particles
from cryorefine.programs.simulate import SimulateConfig, run
from cryorefine.simulate.atoms import read_atomic_model, total_scattering
from cryorefine.simulate.scattering import POTENTIAL_PREFACTOR_VOLT_ANGSTROM2

SMALL = {
    "box_size": 32,
    "pixel_size_angstrom": 5.0,
    "n_particles": 6,
    "n_micrographs": 2,
    "micrograph_size_px": 192,
    "particles_per_micrograph": 3,
}
PARTICLE_COLUMNS = {
    "rlnImageName",
    "rlnMicrographName",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnOpticsGroup",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnRandomSubset",
}


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, ["simulate", *args])


def test_writes_the_dataset(tmp_path: Path):
    config = write_yaml(tmp_path / "sim.yaml", SMALL)
    out = tmp_path / "out"
    result = invoke("--config", str(config), "--output", str(out), "--seed", "3")
    assert result.exit_code == 0, result.output

    template, voxel = read_mrc(out / "template.mrc")
    assert template.shape == (32, 32, 32) and voxel == pytest.approx(5.0)
    info = mrc_info(out / "particles.mrcs")
    assert info.shape == (6, 32, 32) and info.is_stack and info.voxel_size_angstrom == 5.0

    particles = read_star_particles(out / "particles.star")
    assert set(particles.columns) >= PARTICLE_COLUMNS
    assert len(particles) == 6
    assert particles["rlnImageName"].iloc[0] == "000001@particles.mrcs"
    assert (particles["rlnImagePixelSize"] == 5.0).all() and (particles["rlnImageSize"] == 32).all()

    micrographs = read_star_micrographs(out / "micrographs.star")
    assert list(micrographs["rlnMicrographName"]) == [
        "micrographs/micrograph_001.mrc",
        "micrographs/micrograph_002.mrc",
    ]
    for column in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnMicrographPixelSize"):
        assert column in micrographs.columns
    assert micrographs["rlnDefocusU"].between(10000.0, 25000.0).all()
    for name, ctf in zip(micrographs["rlnMicrographName"], micrographs.itertuples(), strict=True):
        image, voxel = read_mrc(out / name)
        assert image.shape == (192, 192) and voxel == pytest.approx(5.0)
        truth = read_star_particles(out / "truth" / (Path(name).stem + "_particles.star"))
        assert len(truth) == 3 and (truth["rlnMicrographName"] == name).all()
        assert truth["rlnCoordinateX"].between(17, 192 - 18).all()
        assert truth["rlnCoordinateY"].between(17, 192 - 18).all()
        # Absolute defocus = the micrograph's + the particle's height (within ±150 Å).
        assert (truth["rlnDefocusU"] - ctf.rlnDefocusU).abs().max() <= 150.0

    saved = load_config(SimulateConfig, out / "config.yaml")
    assert saved.seed == 3 and saved.box_size == 32 and saved.output == out
    assert "simulate" in result.output and "template.mrc" in result.output


def test_same_seed_same_files(tmp_path: Path):
    for name in ("a", "b"):
        run(SimulateConfig(output=tmp_path / name, seed=5, **SMALL))
    for relative in ("particles.mrcs", "micrographs/micrograph_002.mrc", "template.mrc"):
        first, _ = read_mrc(tmp_path / "a" / relative)
        second, _ = read_mrc(tmp_path / "b" / relative)
        np.testing.assert_array_equal(first, second)


def test_user_structure(tmp_path: Path):
    """A user's PDB makes the template; its integral is the model's total scattering."""
    lines = [
        "ATOM      1  CA  GLY A   1      -5.000   0.000   1.000  1.00 30.00           C",
        "ATOM      2  N   GLY A   1       4.000   3.000  -2.000  1.00 30.00           N",
        "ATOM      3  SG  CYS A   2       1.000  -6.000   0.500  0.50 40.00           S",
        "END",
    ]
    pdb = tmp_path / "tiny.pdb"
    pdb.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    values = {**SMALL, "n_micrographs": 0, "n_particles": 2, "pixel_size_angstrom": 1.0}
    result = invoke("--config", str(write_yaml(tmp_path / "c.yaml", values)),
                    "--structure", str(pdb), "--output", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    template, _ = read_mrc(out / "template.mrc")
    expected = total_scattering(read_atomic_model(pdb)) * POTENTIAL_PREFACTOR_VOLT_ANGSTROM2
    assert float(template.astype(np.float64).sum()) == pytest.approx(expected, rel=1e-4)
    assert not (out / "micrographs.star").exists()


def test_refuses_to_overwrite(tmp_path: Path):
    out = tmp_path / "out"
    config = str(write_yaml(tmp_path / "sim.yaml", {**SMALL, "n_micrographs": 0}))
    assert invoke("--config", config, "--output", str(out)).exit_code == 0
    before = (out / "particles.mrcs").stat().st_mtime_ns
    result = invoke("--config", config, "--output", str(out), "--seed", "9")
    assert result.exit_code == 2
    assert "not empty" in result.output and "--overwrite" in result.output
    assert (out / "particles.mrcs").stat().st_mtime_ns == before
    result = invoke("--config", config, "--output", str(out), "--seed", "9", "--overwrite")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("values", "field", "words"),
    [
        ({"pixel_size": 2.0}, "pixel_size", "unknown key"),
        ({"pixel_size_angstrom": -1.0}, "pixel_size_angstrom", "greater than 0"),
        ({"box_size": 33}, "box_size", "even"),
        ({"defocus_min_angstrom": 30000.0}, "defocus_min_angstrom", "larger than"),
        ({"box_size": 16, "pixel_size_angstrom": 2.0}, "box_size", "inside"),
    ],
)
def test_bad_config_fails_before_any_output(tmp_path: Path, values, field, words):
    out = tmp_path / "out"
    config = write_yaml(tmp_path / "bad.yaml", values)
    result = invoke("--config", str(config), "--output", str(out))
    assert result.exit_code == 2
    assert field in result.output and words in result.output
    assert not out.exists()


def test_command_line_entry_point(tmp_path: Path):
    """The installed `cryorefine` script: a negative pixel size is one line and exit code 2."""
    script = Path(sys.executable).parent / "cryorefine"
    out = tmp_path / "out"
    completed = subprocess.run(
        [str(script), "simulate", "--pixel-size", "-2", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "pixel_size_angstrom" in completed.stderr and "Traceback" not in completed.stderr
    assert not out.exists()
