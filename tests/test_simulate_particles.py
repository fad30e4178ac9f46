"""Particle stacks: the table's truth reproduces the images, noise has the asked SNR."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cryorefine.engine.ctf import ctf_2d
from cryorefine.engine.fourier import centred_irfftn, phase_shift, radial_frequency
from cryorefine.engine.projection import project_fourier
from cryorefine.engine.so3 import euler_to_matrix
from cryorefine.io.mrc import read_mrc, read_particle_images, write_mrc
from cryorefine.io.star import read_star_particles
from cryorefine.simulate.atoms import (
    builtin_structure_path,
    potential_from_atoms,
    read_atomic_model,
)
from cryorefine.simulate.noise import (
    coloured_noise,
    power_law_spectrum,
    seeded_generator,
    white_noise,
)
from cryorefine.simulate.particles import (
    Optics,
    simulate_particle_stack,
    uniform_orientations,
    write_particle_stack,
)

PIXEL = 5.0
BOX = 32


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    """The built-in mTOR-mLST8 model in a 32-pixel box at 5 Å/px."""
    return potential_from_atoms(read_atomic_model(builtin_structure_path()), BOX, PIXEL)


def expected_images(volume: torch.Tensor, table: pd.DataFrame, pixel: float) -> torch.Tensor:
    """Images made from the table alone: project, multiply by the CTF, shift by the origin."""
    images = []
    for row in table.itertuples():
        rotation = euler_to_matrix(row.rlnAngleRot, row.rlnAngleTilt, row.rlnAnglePsi)
        spectrum = project_fourier(volume, rotation.float())
        ctf = ctf_2d(
            (BOX, BOX),
            pixel,
            row.rlnDefocusU,
            row.rlnDefocusV,
            row.rlnDefocusAngle,
            row.rlnVoltage,
            row.rlnSphericalAberration,
            row.rlnAmplitudeContrast,
        )
        # RELION: the particle appears shifted by -origin (pinned against relion_project below).
        shift = -torch.tensor([row.rlnOriginXAngst, row.rlnOriginYAngst]) / pixel
        images.append(centred_irfftn(phase_shift(spectrum * ctf, shift, (BOX, BOX)), (BOX, BOX)))
    return torch.stack(images)


def test_table_truth_reproduces_the_images(volume: torch.Tensor, tmp_path: Path):
    optics = Optics(voltage_kv=200.0, spherical_aberration_mm=1.4, amplitude_contrast=0.1)
    stack = simulate_particle_stack(
        volume, PIXEL, 6, snr=0.5, seed=4, max_origin_angstrom=12.0, optics=optics
    )
    stack_path, star_path = write_particle_stack(stack, tmp_path)
    table = read_star_particles(star_path)
    assert list(table["rlnImageName"]) == [f"{i:06d}@particles.mrcs" for i in range(1, 7)]
    assert (table["rlnVoltage"] == 200.0).all() and (table["rlnImagePixelSize"] == PIXEL).all()
    assert float(np.hypot(table.rlnOriginXAngst, table.rlnOriginYAngst).max()) > 2 * PIXEL / 2
    expected = expected_images(volume, table, PIXEL)
    scale = float(stack.noiseless.abs().max())
    torch.testing.assert_close(stack.noiseless, expected, rtol=0, atol=1e-5 * scale)
    # The stack on disk holds the noisy images, in the table's order.
    on_disk = read_particle_images(list(table["rlnImageName"]), relative_to=tmp_path)
    np.testing.assert_array_equal(on_disk, stack.images.numpy())
    assert read_mrc(stack_path)[1] == pytest.approx(PIXEL)


@pytest.mark.relion
def test_matches_relion_project(volume: torch.Tensor, tmp_path: Path, relion_bin: str):
    """relion_project --ctf on our particles.star gives our noiseless images.

    Pins the Euler angles, the CTF sign and the origin sign together (measured:
    correlation > 0.9999, largest difference 0.5 % of the image's maximum).
    """
    stack = simulate_particle_stack(volume, PIXEL, 5, snr=None, seed=5, max_origin_angstrom=20.0)
    write_particle_stack(stack, tmp_path)
    write_mrc(tmp_path / "template.mrc", volume, PIXEL)
    subprocess.run(
        [
            f"{relion_bin}/relion_project",
            "--i", "template.mrc",
            "--ang", "particles.star",
            "--o", "relion",
            "--ctf",
            "--angpix", str(PIXEL),
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )  # fmt: skip
    relion, _ = read_mrc(tmp_path / "relion.mrcs")
    ours = stack.noiseless.numpy()
    for mine, theirs in zip(ours, relion, strict=True):
        correlation = np.corrcoef(mine.ravel(), theirs.ravel())[0, 1]
        assert correlation > 0.9995
        assert np.abs(mine - theirs).max() < 0.02 * np.abs(theirs).max()


@pytest.mark.parametrize("spectrum", [None, power_law_spectrum(1.0)])
def test_noise_variance_matches_snr(volume: torch.Tensor, spectrum):
    snr = 0.2
    stack = simulate_particle_stack(volume, PIXEL, 40, snr=snr, seed=6, noise_spectrum=spectrum)
    signal_variance = float(stack.noiseless.var(dim=(-2, -1)).mean())
    noise = (stack.images - stack.noiseless).double()
    assert stack.noise_std**2 == pytest.approx(signal_variance / snr, rel=1e-6)
    # 40 x 32² samples: the variance is known to ~1-2 %; 5 % asked.
    assert float(noise.var()) == pytest.approx(signal_variance / snr, rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * stack.noise_std


def test_no_noise_without_snr(volume: torch.Tensor):
    stack = simulate_particle_stack(volume, PIXEL, 3, snr=None, seed=1)
    assert stack.noise_std == 0.0
    assert torch.equal(stack.images, stack.noiseless)


def test_deterministic_for_a_seed(volume: torch.Tensor):
    first = simulate_particle_stack(volume, PIXEL, 8, seed=11, max_origin_angstrom=5.0)
    again = simulate_particle_stack(volume, PIXEL, 8, seed=11, max_origin_angstrom=5.0)
    other = simulate_particle_stack(volume, PIXEL, 8, seed=12, max_origin_angstrom=5.0)
    assert torch.equal(first.images, again.images)
    pd.testing.assert_frame_equal(first.table, again.table)
    assert not torch.equal(first.images, other.images)
    assert not np.allclose(first.table["rlnAngleRot"], other.table["rlnAngleRot"])


def test_same_stack_on_any_device(volume: torch.Tensor, device: torch.device):
    cpu = simulate_particle_stack(volume, PIXEL, 4, seed=3, max_origin_angstrom=5.0)
    there = simulate_particle_stack(volume.to(device), PIXEL, 4, seed=3, max_origin_angstrom=5.0)
    assert there.images.device.type == device.type
    scale = float(cpu.noiseless.abs().max())
    torch.testing.assert_close(there.noiseless.cpu(), cpu.noiseless, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(there.images.cpu(), cpu.images, rtol=0, atol=1e-4 * scale)


def test_table_ranges_and_given_orientations(volume: torch.Tensor):
    angles = torch.tensor([[10.0, 20.0, 30.0], [-40.0, 150.0, 60.0], [0.0, 90.0, -170.0]])
    stack = simulate_particle_stack(
        volume,
        PIXEL,
        3,
        seed=2,
        orientations_degrees=angles,
        defocus_range_angstrom=(12000.0, 13000.0),
        max_astigmatism_angstrom=300.0,
        max_origin_angstrom=7.0,
    )
    table = stack.table
    np.testing.assert_allclose(table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]], angles)
    assert table["rlnDefocusU"].between(12000.0, 13000.0).all()
    assert ((table["rlnDefocusU"] - table["rlnDefocusV"]).between(0.0, 300.0)).all()
    assert (np.hypot(table["rlnOriginXAngst"], table["rlnOriginYAngst"]) <= 7.0).all()
    assert list(table["rlnRandomSubset"]) == [1, 2, 1]


def test_random_subsets_are_balanced(volume: torch.Tensor):
    stack = simulate_particle_stack(volume, PIXEL, 20, seed=8, random_subset="random", snr=None)
    subsets = stack.table["rlnRandomSubset"].to_numpy()
    assert (subsets == 1).sum() == 10 and (subsets == 2).sum() == 10
    assert not np.array_equal(subsets, np.arange(20) % 2 + 1)


def test_uniform_orientations_are_uniform_on_so3():
    """Haar measure: every matrix entry has mean 0 and variance 1/3 (20000 draws: ±0.02)."""
    angles = uniform_orientations(20000, seeded_generator(0))
    matrices = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    assert float(matrices.mean(dim=0).abs().max()) < 0.02
    assert float((matrices.pow(2).mean(dim=0) - 1.0 / 3.0).abs().max()) < 0.02
    assert float(angles[:, 1].min()) >= 0.0 and float(angles[:, 1].max()) <= 180.0


def test_white_noise_is_seeded_and_has_the_asked_std():
    first = white_noise((200, 200), 2.5, seeded_generator(3))
    again = white_noise((200, 200), 2.5, seeded_generator(3))
    assert torch.equal(first, again)
    assert float(first.std()) == pytest.approx(2.5, rel=0.01)  # 40000 samples: ±0.35 %


def test_coloured_noise_has_the_asked_spectrum_and_variance():
    """Shell-averaged power / P(k) is flat and the variance is std² (statistics of 64 images)."""
    shape, std, n = (64, 64), 1.5, 64
    spectrum = power_law_spectrum(1.0, corner_frequency=0.02)
    noise = coloured_noise(shape, std, spectrum, seeded_generator(9), n=n).double()
    assert float(noise.var()) == pytest.approx(std**2, rel=0.03)
    power = torch.fft.rfft2(noise).abs().pow(2).mean(dim=0)
    k = radial_frequency(shape, rfft=True, dtype=torch.float64)
    k_full = radial_frequency(shape, rfft=False, dtype=torch.float64)
    p_full = spectrum(k_full)
    p_full[0, 0] = 0.0
    # E|F(k)|² = N · std² · P(k) / mean(P).
    expected = shape[0] * shape[1] * std**2 * spectrum(k) / p_full.mean()
    for low in np.arange(0.05, 0.5, 0.05):
        shell = (k >= low) & (k < low + 0.05)
        ratio = float(power[shell].mean() / expected[shell].mean())
        assert ratio == pytest.approx(1.0, abs=0.1)
    assert float(power[0, 0]) < 1e-6 * float(power.max())
    again = coloured_noise(shape, std, spectrum, seeded_generator(9), n=n).double()
    assert torch.equal(noise, again)
