"""The E-step's likelihood, posterior and marginal back-projection against direct sums."""

from __future__ import annotations

import pytest
import torch

from cryorefine.engine.alignment import (
    fourier_samples,
    global_scores,
    local_scores,
    marginal_global_slices,
    marginal_local_slices,
    particle_terms,
    posterior,
    shift_phases,
    translation_grid,
)
from cryorefine.engine.fourier import coordinate_grid, phase_shift
from cryorefine.engine.projection import extract_samples, prepare_for_projection
from cryorefine.engine.so3 import euler_to_matrix
from cryorefine.engine.so3_grid import global_orientation_grid

BOX = 24


def _random_complex(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.complex(
        torch.randn(*shape, generator=generator, dtype=torch.float64),
        torch.randn(*shape, generator=generator, dtype=torch.float64),
    )


def test_samples_count_each_independent_fourier_sample_once() -> None:
    samples = fourier_samples(BOX, BOX // 2, min_shell=0, dtype=torch.float64)
    # Σ m over the half transform = the number of independent samples of a real image
    # within Nyquist, which a full-plane count halves (up to the self-conjugate points).
    full = torch.fft.fftfreq(BOX, dtype=torch.float64)
    radius = torch.sqrt(full[:, None] ** 2 + full[None, :] ** 2) * BOX
    inside_full = int((torch.round(radius) <= BOX // 2).sum())
    assert float(samples.multiplicity.sum()) == pytest.approx(inside_full / 2, abs=2)
    assert int(samples.shells.max()) == BOX // 2
    assert int(fourier_samples(BOX, 5).shells.min()) == 1


def test_translation_grid_is_a_disc_lattice_with_zero_first() -> None:
    offsets = translation_grid(5.0, 1.0, dtype=torch.float64)
    assert offsets.shape[0] == 81  # lattice points within radius 5
    assert offsets[0].tolist() == [0.0, 0.0]
    assert float(offsets.norm(dim=-1).max()) <= 5.0


def test_log_likelihood_equals_the_direct_gaussian_sum() -> None:
    generator = torch.Generator().manual_seed(0)
    samples = fourier_samples(BOX, 8, dtype=torch.float64)
    s = samples.index.shape[0]
    images = _random_complex(3, s, generator=generator)
    ctf = torch.rand(3, s, generator=generator, dtype=torch.float64) - 0.5
    noise = 0.5 + torch.rand(s, generator=generator, dtype=torch.float64)
    projections = _random_complex(5, s, generator=generator)
    offsets = translation_grid(2.0, 1.0, dtype=torch.float64)
    phases = shift_phases(samples.frequencies, offsets)[None].expand(3, -1, -1)
    terms = particle_terms(images, ctf, noise, samples, phases)
    scores = global_scores(terms, projections)

    centred = images[:, None, None, :] * phases[:, :, None, :]
    residual = centred - ctf[:, None, None, :] * projections[None, None]
    direct = -(samples.multiplicity * residual.abs().square() / noise).sum(-1)
    constant = terms.image_norms[:, None, None]
    torch.testing.assert_close(scores.log_likelihoods() - constant, direct)

    own = projections[None].expand(3, -1, -1)
    local = local_scores(terms, own)
    torch.testing.assert_close(local.log_likelihoods(), scores.log_likelihoods())


def test_best_pose_is_the_true_view_and_offset() -> None:
    generator = torch.Generator().manual_seed(1)
    grid = coordinate_grid((BOX, BOX, BOX), dtype=torch.float64)
    centres = torch.randint(-5, 6, (6, 3), generator=generator).to(torch.float64)
    distances = (grid[None] - centres[:, None, None, None]).square().sum(-1)
    volume = torch.exp(-distances / (2 * 1.5**2)).sum(0)  # six Gaussian blobs, σ 1.5 px
    prepared = prepare_for_projection(volume)
    angles = global_orientation_grid(30.0)
    rotations = euler_to_matrix(*angles.T)
    samples = fourier_samples(BOX, BOX // 2 - 1, dtype=torch.float64)
    projections = extract_samples(prepared, rotations, samples.frequencies)

    true_view, true_offset = 17, torch.tensor([2.0, -1.0], dtype=torch.float64)
    full_projection = torch.zeros(BOX * (BOX // 2 + 1), dtype=torch.complex128)
    full_projection[samples.index] = projections[true_view]
    image_ft = phase_shift(full_projection.reshape(BOX, -1), -true_offset, (BOX, BOX))
    noise = _random_complex(BOX, BOX // 2 + 1, generator=generator) * 0.05
    image = (image_ft + noise).reshape(-1)[samples.index][None]

    offsets = translation_grid(3.0, 1.0, dtype=torch.float64)
    phases = shift_phases(samples.frequencies, offsets)[None]
    ones = torch.ones_like(image.real)
    terms = particle_terms(image, ones, torch.ones(1, dtype=torch.float64), samples, phases)
    result = posterior(global_scores(terms, projections).log_likelihoods())
    assert int(result.best_orientation) == true_view
    assert offsets[result.best_offset[0]].tolist() == true_offset.tolist()
    assert float(result.max_probability) > 0.99


def test_marginal_slices_equal_explicit_weighted_sums() -> None:
    generator = torch.Generator().manual_seed(2)
    samples = fourier_samples(BOX, 6, dtype=torch.float64)
    s = samples.index.shape[0]
    images = _random_complex(2, s, generator=generator)
    ctf = torch.rand(2, s, generator=generator, dtype=torch.float64)
    offsets = translation_grid(1.0, 1.0, dtype=torch.float64)
    phases = shift_phases(samples.frequencies, offsets)[None].expand(2, -1, -1)
    weights = torch.rand(2, offsets.shape[0], 4, generator=generator, dtype=torch.float64)
    weights /= weights.sum(dim=(1, 2), keepdim=True)
    data, sample_weights = marginal_global_slices(weights, images, ctf, phases)
    for j in range(4):
        expected = sum(
            weights[i, t, j] * images[i] * phases[i, t] * ctf[i]
            for i in range(2)
            for t in range(offsets.shape[0])
        )
        torch.testing.assert_close(data[j], expected)
        expected_weight = sum(weights[i, :, j].sum() * ctf[i] ** 2 for i in range(2))
        torch.testing.assert_close(sample_weights[j], expected_weight)

    which, local_data, local_weights = marginal_local_slices(weights, images, ctf, phases, keep=4)
    # Keeping every orientation is the global sum per particle.
    for i in range(2):
        order = which[i]
        single, single_weights = marginal_global_slices(
            weights[i : i + 1], images[i : i + 1], ctf[i : i + 1], phases[i : i + 1]
        )
        torch.testing.assert_close(local_data[i], single[order])
        torch.testing.assert_close(local_weights[i], single_weights[order])
