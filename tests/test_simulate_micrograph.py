"""Micrographs: true positions are where the templates correlate best; noise; determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryorefine.engine.ctf import ctf_2d
from cryorefine.engine.fourier import centred_irfftn, centred_rfftn, phase_shift
from cryorefine.engine.projection import project_fourier
from cryorefine.engine.so3 import euler_to_matrix
from cryorefine.errors import CryorefineError
from cryorefine.io.mrc import read_particle_images, write_mrc
from cryorefine.io.particles import RELATIVE_DEFOCUS
from cryorefine.io.star import read_star_particles, write_star_micrographs
from cryorefine.simulate.atoms import (
    builtin_structure_path,
    potential_from_atoms,
    read_atomic_model,
)
from cryorefine.simulate.micrograph import random_positions, simulate_micrograph
from cryorefine.simulate.noise import power_law_spectrum, seeded_generator
from cryorefine.simulate.particles import Optics, simulate_particle_stack
from relion_tools import run_relion

PIXEL = 5.0
BOX = 32
SHAPE = (256, 256)


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    """The built-in mTOR-mLST8 model in a 32-pixel box at 5 Å/px."""
    return potential_from_atoms(read_atomic_model(builtin_structure_path()), BOX, PIXEL)


def template(volume: torch.Tensor, row, defocus_u: float, defocus_v: float) -> torch.Tensor:
    """The particle's CTF-modulated projection in its box, from the table's truth: (D, D)."""
    rotation = euler_to_matrix(row.rlnAngleRot, row.rlnAngleTilt, row.rlnAnglePsi).float()
    ctf = ctf_2d(
        (BOX, BOX),
        PIXEL,
        defocus_u,
        defocus_v,
        row.rlnDefocusAngle,
        row.rlnVoltage,
        row.rlnSphericalAberration,
        row.rlnAmplitudeContrast,
    )
    return centred_irfftn(project_fourier(volume, rotation) * ctf, (BOX, BOX))


def cross_correlation(micrograph: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Σ micrograph(r + s) · image(s - D//2): (H, W), the value at a candidate centre r."""
    height, width = micrograph.shape
    kernel = torch.zeros((height, width), dtype=torch.float64)
    kernel[:BOX, :BOX] = image.double()
    kernel = torch.roll(kernel, shifts=(-(BOX // 2), -(BOX // 2)), dims=(0, 1))
    spectrum = torch.fft.rfft2(micrograph.double()) * torch.fft.rfft2(kernel).conj()
    return torch.fft.irfft2(spectrum, s=(height, width))


def refined_peak(correlation: torch.Tensor, near: tuple[float, float], radius: int = 3):
    """Largest value within `radius` px of `near` (x, y), refined by 1D parabolas: (x, y, value)."""
    x0, y0 = round(near[0]), round(near[1])
    window = correlation[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1]
    flat = int(torch.argmax(window))
    iy, ix = divmod(flat, window.shape[1])
    y, x = y0 - radius + iy, x0 - radius + ix

    def parabola(minus: float, centre: float, plus: float) -> float:
        return 0.5 * (minus - plus) / (minus - 2 * centre + plus)

    c = correlation
    dx = parabola(float(c[y, x - 1]), float(c[y, x]), float(c[y, x + 1]))
    dy = parabola(float(c[y - 1, x]), float(c[y, x]), float(c[y + 1, x]))
    return x + dx, y + dy, float(c[y, x])


def test_positions_recovered_by_cross_correlation(volume: torch.Tensor):
    """Each particle's true template correlates best at its true centre (< 0.5 px; 0.25 kept)."""
    micrograph = simulate_micrograph(
        volume, PIXEL, SHAPE, n_particles=6, snr=None, seed=3, ice_thickness_angstrom=400.0
    )
    image = micrograph.noiseless
    for row in micrograph.particles.itertuples():
        correlation = cross_correlation(
            image, template(volume, row, row.rlnDefocusU, row.rlnDefocusV)
        )
        global_y, global_x = divmod(int(torch.argmax(correlation)), SHAPE[1])
        truth = (row.rlnCoordinateX, row.rlnCoordinateY)
        assert abs(global_x - truth[0]) <= 1 and abs(global_y - truth[1]) <= 1
        x, y, _ = refined_peak(correlation, truth)
        assert abs(x - truth[0]) < 0.25 and abs(y - truth[1]) < 0.25


@pytest.mark.parametrize(("ctf_box", "tolerance"), [(256, 5e-4), (None, 1e-2)])
def test_sub_pixel_position_is_a_fourier_shift(volume: torch.Tensor, ctf_box, tolerance):
    """Moving a particle by a sub-pixel step translates the micrograph by that step.

    With the CTF box = the micrograph, only the Nyquist terms of a sub-pixel shift of an
    even-sized array (whose sign is ambiguous) differ: 2e-4 measured. With the default box
    (D + delocalisation, here 96 px) the interpolation's tails beyond that box are
    dropped too: 0.55 % measured.
    """
    angles = torch.tensor([[30.0, 70.0, -20.0]])
    common = dict(
        orientations_degrees=angles, snr=None, defocus_u_angstrom=12000.0, ctf_box_px=ctf_box
    )
    at_grid = simulate_micrograph(volume, PIXEL, SHAPE, positions_px=[[128.0, 128.0]], **common)
    moved = simulate_micrograph(volume, PIXEL, SHAPE, positions_px=[[128.3, 127.4]], **common)
    step = torch.tensor([0.3, -0.6])
    spectrum = torch.fft.rfft2(at_grid.noiseless)
    expected = torch.fft.irfft2(phase_shift(spectrum, step, SHAPE), s=SHAPE)
    error = (moved.noiseless - expected).abs().max() / expected.abs().max()
    assert float(error) < tolerance


def test_integer_step_is_an_exact_translation(volume: torch.Tensor):
    angles = torch.tensor([[30.0, 70.0, -20.0]])
    common = dict(orientations_degrees=angles, snr=None, defocus_u_angstrom=12000.0)
    first = simulate_micrograph(volume, PIXEL, SHAPE, positions_px=[[100.25, 110.5]], **common)
    moved = simulate_micrograph(volume, PIXEL, SHAPE, positions_px=[[107.25, 105.5]], **common)
    torch.testing.assert_close(moved.noiseless, torch.roll(first.noiseless, (-5, 7), (0, 1)))


def test_ctf_box_holds_the_delocalisation():
    """λ Δf k_Nyquist each side: 300 kV, 20000 Å, 2 Å/px -> 0.019687·20000·0.25/2 = 49.2 px."""
    from cryorefine.simulate.micrograph import ctf_box_size

    assert ctf_box_size(64, 2.0, 20000.0, 300.0) == 64 + 2 * 50 + 8


def test_per_particle_defocus_is_applied(volume: torch.Tensor):
    """A particle 3000 Å deeper is imaged as at the micrograph's defocus + 3000 Å."""
    positions = [[70.0, 70.0], [180.5, 170.25]]
    angles = torch.tensor([[0.0, 40.0, 0.0], [100.0, 80.0, 30.0]])
    common = dict(positions_px=positions, orientations_degrees=angles, snr=None, ctf_box_px=96)
    micrograph = simulate_micrograph(
        volume, PIXEL, SHAPE, defocus_offsets_angstrom=[0.0, 3000.0],
        defocus_u_angstrom=10000.0, defocus_v_angstrom=9800.0, **common,
    )  # fmt: skip
    table = micrograph.particles
    np.testing.assert_allclose(table["rlnDefocusU"], [10000.0, 13000.0])
    np.testing.assert_allclose(table["rlnDefocusV"], [9800.0, 12800.0])
    np.testing.assert_allclose(table[RELATIVE_DEFOCUS], [0.0, 3000.0])
    # The same as two micrographs, one per defocus, each holding one particle.
    parts = [
        simulate_micrograph(
            volume, PIXEL, SHAPE, positions_px=[position], orientations_degrees=angles[[i]],
            snr=None, defocus_u_angstrom=10000.0 + shift, defocus_v_angstrom=9800.0 + shift,
            ctf_box_px=96,
        ).noiseless
        for i, (position, shift) in enumerate(zip(positions, (0.0, 3000.0), strict=True))
    ]  # fmt: skip
    scale = float(micrograph.noiseless.abs().max())
    torch.testing.assert_close(micrograph.noiseless, parts[0] + parts[1], rtol=0, atol=1e-5 * scale)
    # And its own CTF matches it better than the micrograph's (normalised templates).
    row = next(table.iloc[[1]].itertuples())
    own = template(volume, row, 13000.0, 12800.0)
    base = template(volume, row, 10000.0, 9800.0)
    truth = (row.rlnCoordinateX, row.rlnCoordinateY)
    _, _, own_peak = refined_peak(cross_correlation(micrograph.noiseless, own / own.norm()), truth)
    _, _, base_peak = refined_peak(
        cross_correlation(micrograph.noiseless, base / base.norm()), truth
    )
    assert own_peak > base_peak


@pytest.mark.parametrize("spectrum", [None, power_law_spectrum(1.0)])
def test_noise_statistics(volume: torch.Tensor, spectrum):
    micrograph = simulate_micrograph(
        volume, PIXEL, SHAPE, n_particles=5, snr=0.3, seed=4, noise_spectrum=spectrum
    )
    noise = (micrograph.image - micrograph.noiseless).double()
    # 65536 samples (correlated for the power law): 3 % asked.
    assert float(noise.var()) == pytest.approx(micrograph.noise_std**2, rel=0.03)
    assert abs(float(noise.mean())) < 0.05 * micrograph.noise_std


def test_snr_means_the_same_as_for_particle_stacks(volume: torch.Tensor):
    """Same particles in a stack (no origins, one defocus) give the same noise level."""
    angles = torch.tensor([[10.0, 50.0, 80.0], [-120.0, 100.0, 5.0], [60.0, 20.0, -90.0]])
    micrograph = simulate_micrograph(
        volume, PIXEL, SHAPE, n_particles=3, orientations_degrees=angles, snr=0.2,
        defocus_u_angstrom=14000.0, seed=5,
    )  # fmt: skip
    stack = simulate_particle_stack(
        volume, PIXEL, 3, snr=0.2, orientations_degrees=angles,
        defocus_range_angstrom=(14000.0, 14000.0), max_astigmatism_angstrom=0.0, seed=5,
    )  # fmt: skip
    assert micrograph.noise_std == pytest.approx(stack.noise_std, rel=1e-5)


def test_absolute_noise_level(volume: torch.Tensor):
    micrograph = simulate_micrograph(volume, PIXEL, SHAPE, n_particles=2, noise_std=3.0, seed=2)
    assert micrograph.noise_std == 3.0
    assert float((micrograph.image - micrograph.noiseless).std()) == pytest.approx(3.0, rel=0.02)


def test_deterministic_for_a_seed(volume: torch.Tensor):
    first = simulate_micrograph(volume, PIXEL, SHAPE, n_particles=4, seed=8)
    again = simulate_micrograph(volume, PIXEL, SHAPE, n_particles=4, seed=8)
    other = simulate_micrograph(volume, PIXEL, SHAPE, n_particles=4, seed=9)
    assert torch.equal(first.image, again.image)
    pd.testing.assert_frame_equal(first.particles, again.particles)
    assert not np.allclose(first.particles["rlnCoordinateX"], other.particles["rlnCoordinateX"])


def test_same_micrograph_on_any_device(volume: torch.Tensor, device: torch.device):
    cpu = simulate_micrograph(
        volume, PIXEL, SHAPE, n_particles=3, seed=6, ice_thickness_angstrom=200
    )
    there = simulate_micrograph(
        volume.to(device), PIXEL, SHAPE, n_particles=3, seed=6, ice_thickness_angstrom=200
    )
    assert there.image.device.type == device.type
    scale = float(cpu.noiseless.abs().max())
    torch.testing.assert_close(there.image.cpu(), cpu.image, rtol=0, atol=1e-4 * scale)


def test_invert_contrast(volume: torch.Tensor):
    white = simulate_micrograph(volume, PIXEL, SHAPE, n_particles=3, seed=7, snr=None)
    dark = simulate_micrograph(
        volume, PIXEL, SHAPE, n_particles=3, seed=7, snr=None, invert_contrast=True
    )
    torch.testing.assert_close(dark.noiseless, -white.noiseless)


def test_placement_respects_distance_and_edges(volume: torch.Tensor):
    micrograph = simulate_micrograph(
        volume, PIXEL, SHAPE, n_particles=12, min_distance_px=40.0, seed=10, snr=None
    )
    xy = micrograph.particles[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
    distances = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    assert distances[~np.eye(len(xy), dtype=bool)].min() >= 40.0
    margin = BOX // 2 + 1
    assert xy.min() >= margin and xy.max() <= SHAPE[0] - 1 - margin
    # Different fractional parts: positions are not snapped to the grid.
    assert len(set(np.round(xy[:, 0] % 1, 3))) > 6


def test_impossible_placements_are_clear_errors(volume: torch.Tensor):
    with pytest.raises(CryorefineError, match="could not place 50 particles"):
        random_positions(50, (128, 128), 40.0, 17.0, seeded_generator(0), max_draws=5)
    with pytest.raises(CryorefineError, match="edge"):
        simulate_micrograph(volume, PIXEL, SHAPE, positions_px=[[5.0, 100.0]], snr=None)


def test_tables(volume: torch.Tensor):
    optics = Optics(voltage_kv=200.0, spherical_aberration_mm=2.0, amplitude_contrast=0.1)
    micrograph = simulate_micrograph(
        volume, PIXEL, SHAPE, n_particles=3, seed=1, optics=optics, micrograph_name="m/a.mrc",
        defocus_u_angstrom=11000.0, defocus_v_angstrom=10500.0, defocus_angle_degrees=33.0,
    )  # fmt: skip
    ctf = micrograph.ctf.iloc[0]
    assert ctf["rlnMicrographName"] == "m/a.mrc"
    assert (ctf["rlnDefocusU"], ctf["rlnDefocusV"], ctf["rlnDefocusAngle"]) == (
        11000.0,
        10500.0,
        33.0,
    )
    assert (ctf["rlnVoltage"], ctf["rlnMicrographPixelSize"]) == (200.0, PIXEL)
    particles = micrograph.particles
    assert (particles["rlnMicrographName"] == "m/a.mrc").all()
    assert (particles["rlnDefocusAngle"] == 33.0).all()
    assert (particles["rlnAmplitudeContrast"] == 0.1).all()


@pytest.mark.relion
def test_relion_extracts_the_particles_at_their_coordinates(
    volume: torch.Tensor, tmp_path: Path, relion_bin: str
):
    """relion_preprocess --extract on our micrograph, CTF and coordinates.

    RELION centres the box (pixel D//2) on micrograph pixel floor(rlnCoordinateX), so the
    particle lies at +frac(coordinate) in the box: our coordinates are RELION's 0-based
    ones (a 1-based reading would put it at frac - 1).
    """
    micrograph = simulate_micrograph(
        volume, PIXEL, SHAPE, n_particles=4, snr=None, seed=12, micrograph_name="mics/a.mrc"
    )
    write_mrc(tmp_path / "mics" / "a.mrc", micrograph.image, PIXEL)
    write_star_micrographs(tmp_path / "micrographs.star", micrograph.ctf)
    truth = micrograph.particles
    # A RELION coordinate file is a single data_ block with the coordinates.
    coordinates = truth[["rlnCoordinateX", "rlnCoordinateY"]]
    (tmp_path / "coords" / "mics").mkdir(parents=True)
    starfile.write({"": coordinates}, tmp_path / "coords" / "mics" / "a_coords.star")
    run_relion(
        relion_bin,
        "relion_preprocess",
        ["--i", "micrographs.star", "--coord_dir", "coords/", "--coord_suffix", "_coords.star",
         "--part_star", "extracted.star", "--part_dir", "Extract/", "--extract",
         "--extract_size", str(BOX)],
        cwd=tmp_path,
    )  # fmt: skip
    extracted = read_star_particles(tmp_path / "extracted.star")
    images = read_particle_images(list(extracted["rlnImageName"]), relative_to=tmp_path)
    assert len(images) == len(truth)
    for image, row in zip(images, truth.itertuples(), strict=True):
        spectrum = centred_rfftn(template(volume, row, row.rlnDefocusU, row.rlnDefocusV), 2)
        fraction = torch.tensor([row.rlnCoordinateX % 1.0, row.rlnCoordinateY % 1.0])

        def correlation(shift: torch.Tensor, spectrum=spectrum, image=image) -> float:
            shifted = centred_irfftn(phase_shift(spectrum, shift, (BOX, BOX)), (BOX, BOX))
            return float(np.corrcoef(shifted.numpy().ravel(), image.ravel())[0, 1])

        assert correlation(fraction) > 0.99  # 0.998-0.999 measured at 2.5 Å/px
        assert correlation(fraction) > correlation(fraction - 1.0)
