"""`cryorefine reconstruct`: maps from simulated particles with known truth, symmetry,
batch-size invariance, half sets, agreement with relion_reconstruct, bad input."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cryorefine.cli import app
from cryorefine.engine.fsc import fourier_shell_correlation
from cryorefine.io.mrc import read_mrc
from cryorefine.io.star import read_star_particles, write_star_particles
from cryorefine.programs.reconstruct import ReconstructConfig, config_path_for, run
from cryorefine.simulate.particles import simulate_particle_stack, write_particle_stack
from relion_tools import anisotropic_blobs, band_limit, masked_noise_volume, run_relion

BOX = 32
PIXEL = 4.0
N_PARTICLES = 400
# Shell 13 of 16 (0.8 Nyquist, 0.2 cycles/px, 20 Å at 4 Å/px).
SHELL_08_NYQUIST = 13
# The test volumes are band-limited to 0.45 cycles/px: shell 14.4 of 16.
BAND_LIMIT = 0.45
BAND_LIMIT_SHELL = 14


def invoke(*args: str):
    return CliRunner().invoke(app, ["reconstruct", *args])


def write_dataset(
    folder: Path, volume: torch.Tensor, n: int, seed: int = 0, snr: float | None = None
) -> Path:
    """Noise-free (or noisy) particles of `volume` with CTFs and origins; the STAR path."""
    stack = simulate_particle_stack(
        volume,
        PIXEL,
        n,
        snr=snr,
        seed=seed,
        defocus_range_angstrom=(8000.0, 20000.0),
        max_origin_angstrom=8.0,
    )
    folder.mkdir(parents=True, exist_ok=True)
    return write_particle_stack(stack, folder)[1]


@pytest.fixture(scope="module")
def truth() -> torch.Tensor:
    return band_limit(anisotropic_blobs(BOX), BAND_LIMIT)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, truth: torch.Tensor) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), truth, N_PARTICLES)


def reconstruct(star: Path, output: Path, **values) -> torch.Tensor:
    run(ReconstructConfig(particles=star, output=output, **values))
    return torch.from_numpy(read_mrc(output, np.float64)[0])


def test_cli_reconstructs_the_truth(dataset: Path, truth: torch.Tensor, tmp_path: Path) -> None:
    output = tmp_path / "maps" / "map.mrc"
    result = invoke("--particles", str(dataset), "--output", str(output))
    assert result.exit_code == 0, result.output
    assert "400 particles" in result.output and "wrote" in result.output
    with mrcfile.open(output) as mrc:
        assert mrc.data.shape == (BOX,) * 3
        assert float(mrc.voxel_size.x) == pytest.approx(PIXEL)
        volume = torch.from_numpy(mrc.data.astype(np.float64))
    fsc = fourier_shell_correlation(volume, truth.double())
    # Measured: FSC ≥ 0.996 through shell 14 (the band limit), relative error 3.1 %.
    assert fsc[: SHELL_08_NYQUIST + 1].min() > 0.9, fsc
    assert fsc[: BAND_LIMIT_SHELL + 1].min() > 0.99, fsc
    # The amplitude is right too (CTF² weighting undoes the CTF).
    error = (volume - truth).norm() / truth.norm()
    assert error < 0.05, error
    saved = yaml.safe_load(config_path_for(output).read_text())
    assert saved["particles"] == str(dataset) and saved["symmetry"] == "C1" and saved["ctf"]


def test_without_ctf_correction_the_map_is_worse(
    dataset: Path, truth: torch.Tensor, tmp_path: Path
) -> None:
    corrected = reconstruct(dataset, tmp_path / "ctf.mrc")
    uncorrected = reconstruct(dataset, tmp_path / "noctf.mrc", ctf=False)
    fsc_corrected = fourier_shell_correlation(corrected, truth.double())
    fsc_uncorrected = fourier_shell_correlation(uncorrected, truth.double())
    # Averaging CTF-modulated images with random defoci washes out high frequencies.
    assert fsc_uncorrected[SHELL_08_NYQUIST] < fsc_corrected[SHELL_08_NYQUIST] - 0.2


def test_batch_size_does_not_change_the_map(dataset: Path, tmp_path: Path) -> None:
    one_batch = reconstruct(dataset, tmp_path / "a.mrc", batch_size=1000)
    small = reconstruct(dataset, tmp_path / "b.mrc", batch_size=7)
    # float64 accumulators: measured identical; allow float64 rounding of the sum order.
    assert torch.allclose(one_batch, small, rtol=0, atol=1e-6 * float(one_batch.abs().max()))
    again = reconstruct(dataset, tmp_path / "c.mrc", batch_size=1000)
    assert torch.equal(one_batch, again)  # deterministic


def test_a_float16_stack_gives_the_float32_map(dataset: Path, tmp_path: Path) -> None:
    with mrcfile.open(dataset.parent / "particles.mrcs") as mrc:
        images, voxel_size = mrc.data.copy(), mrc.voxel_size.copy()
    half_stack = tmp_path / "particles.mrcs"
    with mrcfile.new(half_stack) as mrc:
        mrc.set_data(images.astype(np.float16))  # MRC mode 12
        mrc.set_image_stack()
        mrc.voxel_size = voxel_size
    star = tmp_path / "particles.star"
    star.write_text(dataset.read_text())  # same names, now read beside this STAR
    from_half = reconstruct(star, tmp_path / "half.mrc")
    from_single = reconstruct(dataset, tmp_path / "single.mrc")
    assert not torch.equal(from_half, from_single)  # the float16 stack was the one read
    fsc = fourier_shell_correlation(from_half, from_single)
    # float16 keeps 11 significant bits: far below the images' own noise.
    assert float(fsc[1:].min()) > 0.999, fsc


def test_subset_uses_only_that_half(dataset: Path, tmp_path: Path) -> None:
    table = read_star_particles(dataset)
    half = table[table["rlnRandomSubset"] == 2]
    assert 0 < len(half) < len(table)
    half_star = write_star_particles(dataset.parent / "half2.star", half, overwrite=True)
    selected = reconstruct(dataset, tmp_path / "sub.mrc", subset=2)
    expected = reconstruct(half_star, tmp_path / "half.mrc")
    whole = reconstruct(dataset, tmp_path / "whole.mrc")
    scale = float(expected.abs().max())
    assert torch.allclose(selected, expected, rtol=0, atol=1e-6 * scale)
    assert (selected - whole).abs().max() > 1e-3 * scale


def rotate_half_turn(volume: torch.Tensor, dims: tuple[int, int]) -> torch.Tensor:
    """The volume turned by 180° about the axis not in `dims` (exact for even D)."""
    return torch.roll(torch.flip(volume, dims=dims), shifts=(1, 1), dims=dims)


def test_d2_symmetry_improves_a_map_from_few_particles(tmp_path: Path) -> None:
    volume = band_limit(masked_noise_volume(BOX, 10.0, seed=3, dtype=torch.float64), BAND_LIMIT)
    # D2: the identity and half turns about z (negates y, x), x (z, y) and y (z, x).
    volume = (
        volume
        + rotate_half_turn(volume, (1, 2))
        + rotate_half_turn(volume, (0, 1))
        + rotate_half_turn(volume, (0, 2))
    ) / 4
    star = write_dataset(tmp_path / "d2", volume.float(), 20, seed=4)
    symmetric = reconstruct(star, tmp_path / "d2.mrc", symmetry="d2")
    asymmetric = reconstruct(star, tmp_path / "c1.mrc")
    fsc_d2 = fourier_shell_correlation(symmetric, volume)
    fsc_c1 = fourier_shell_correlation(asymmetric, volume)
    assert fsc_d2[: SHELL_08_NYQUIST + 1].min() > 0.9, fsc_d2
    print(fsc_d2, fsc_c1)
    assert fsc_d2[SHELL_08_NYQUIST] > fsc_c1[SHELL_08_NYQUIST] + 0.05, (fsc_d2, fsc_c1)
    assert fsc_d2[4:].mean() > fsc_c1[4:].mean()


def test_agrees_with_relion_reconstruct(relion_bin: str, dataset: Path, tmp_path: Path) -> None:
    run_relion(
        relion_bin,
        "relion_reconstruct",
        ["--i", dataset.name, "--o", str(tmp_path / "relion.mrc"), "--ctf"],
        cwd=dataset.parent,
    )
    relion = torch.from_numpy(read_mrc(tmp_path / "relion.mrc", np.float64)[0])
    ours = reconstruct(dataset, tmp_path / "ours.mrc")
    fsc = fourier_shell_correlation(ours, relion)
    # Through shell 14 of 16 (0.875 Nyquist); the truth is band-limited to 0.45 cycles/px
    # (shell 14.4), so the shells beyond hold only interpolation residue in both maps.
    # Measured: FSC ≥ 0.991 through shell 14; our map / RELION's = 0.9995 (least squares).
    assert fsc[: BAND_LIMIT_SHELL + 1].min() > 0.98, fsc
    scale = float((ours * relion).sum() / (relion * relion).sum())
    assert scale == pytest.approx(1.0, abs=0.02)


def assert_refused(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, (word, result.output)


def test_bad_input_fails_before_any_output(dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "map.mrc"
    table = read_star_particles(dataset)

    no_names = write_star_particles(tmp_path / "no_names.star", table.drop(columns="rlnImageName"))
    assert_refused(
        invoke("--particles", str(no_names), "--output", str(output)),
        "no_names.star",
        "rlnImageName",
        "Fix:",
    )

    truncated_folder = tmp_path / "truncated"
    truncated_folder.mkdir()
    data = (dataset.parent / "particles.mrcs").read_bytes()
    (truncated_folder / "particles.mrcs").write_bytes(data[: len(data) // 2])
    truncated_star = write_star_particles(truncated_folder / "p.star", table)
    assert_refused(
        invoke("--particles", str(truncated_star), "--output", str(output)),
        "particles.mrcs",
        "truncated",
    )

    missing_folder = tmp_path / "missing"
    missing_folder.mkdir()
    missing_star = write_star_particles(missing_folder / "p.star", table)
    assert_refused(
        invoke("--particles", str(missing_star), "--output", str(output)),
        str(missing_folder / "particles.mrcs"),
        "not found",
        "relative to the STAR file's folder",
    )

    assert_refused(
        invoke("--particles", str(dataset), "--output", str(output), "--symmetry", "Q7"),
        "symmetry",
        "Q7",
        "D7",
    )

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"particles": str(dataset), "symetry": "C2"}))
    assert_refused(
        invoke("--config", str(config), "--output", str(output)),
        "job.yaml",
        "symetry",
        "unknown key",
        "symmetry",
    )

    assert_refused(
        invoke("--particles", str(dataset), "--output", str(output), "--pad-factor", "-2"),
        "pad_factor",
        "-2",
    )
    assert not output.exists() and not config_path_for(output).exists()

    output.write_bytes(b"an earlier map")
    assert_refused(
        invoke("--particles", str(dataset), "--output", str(output)),
        "map.mrc",
        "--overwrite",
    )
    assert output.read_bytes() == b"an earlier map"
    assert not config_path_for(output).exists()
    result = invoke("--particles", str(dataset), "--output", str(output), "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_mrc(output)[0].shape == (BOX,) * 3
