"""Pose likelihoods of particle images against reference projections (the E-step).

Model (RELION's): the image re-centred by its origin o (pixels) is the CTF times
the projection in its view A, plus Gaussian noise of power σ²(k) per Fourier sample:
X(k) · e^{−2πi k·o} = CTF(k) · P_A(k) + N(k), E|N(k)|² = σ²(k). Over the independent
samples of the half transform (kx = 0 and kx = Nyquist columns hold each sample twice,
so they count ½: the `multiplicity`),

    log L(A, o) = −Σ_k m(k) |X(k) e^{−2πi k·o} − CTF(k) P_A(k)|² / σ²(k)
                = const + cross(A, o) − norm(A),
    cross(A, o) = Re Σ_k Y_o(k) P_A(k),  Y_o = 2 m / σ² · conj(X) e^{+2πi k·o} · CTF,
    norm(A)     = Σ_k (m CTF² / σ²)(k) |P_A(k)|².

A global search shares its projections between particles, so `cross` for a batch is
one real matrix product (n·T, 2S) @ (2S, J); a local search has its own projections
per particle and uses batched products. The posterior over the (orientation, offset)
grid is the softmax of log L (uniform priors), and back-projection with marginalisation
inserts Σ_o w(A, o) · X e^{−2πi k·o} · CTF for every A with weight Σ_o w(A, o) · CTF²
(a second matrix product for a global grid).

Cross-correlation (RELION's --firstiter_cc, for a first reference that is not on the
data's greyscale): cc(A, o) = Re Σ m conj(X_o) CTF P_A / √(Σ m |X|² · Σ m CTF² |P_A|²),
the same two products with σ² = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryorefine.engine.fourier import frequency_grid


@dataclass(frozen=True)
class FourierSamples:
    """The samples of a D × D half transform that enter the likelihood.

    Attributes:
        index: (S,) long indices into the flattened (D, D//2 + 1) half transform.
        frequencies: (S, 2) (kx, ky) in cycles per pixel.
        shells: (S,) long shell numbers round(|k| · D).
        multiplicity: (S,) real: ½ on the kx = 0 and kx = Nyquist columns, else 1.
    """

    index: torch.Tensor
    frequencies: torch.Tensor
    shells: torch.Tensor
    multiplicity: torch.Tensor


def fourier_samples(
    box_size: int,
    max_shell: int,
    min_shell: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> FourierSamples:
    """Half-transform samples with min_shell ≤ round(|k| D) ≤ max_shell.

    Args:
        box_size: D (pixels).
        max_shell: largest shell (≤ D // 2 keeps everything inside Nyquist).
        min_shell: smallest shell; 1 leaves out the DC term, which holds the image's
            arbitrary background level.
    """
    k = frequency_grid((box_size, box_size), rfft=True, device=device, dtype=dtype).reshape(-1, 2)
    shells = torch.round(torch.linalg.vector_norm(k, dim=-1) * box_size).long()
    keep = (shells >= min_shell) & (shells <= max_shell)
    index = torch.nonzero(keep).squeeze(-1)
    column = index % (box_size // 2 + 1)
    on_edge = (column == 0) | ((box_size % 2 == 0) & (column == box_size // 2))
    multiplicity = torch.where(on_edge, 0.5, 1.0).to(dtype)
    return FourierSamples(index, k[index], shells[index], multiplicity)


def translation_grid(
    range_pixels: float,
    step_pixels: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Offsets (x, y) on a square lattice of `step_pixels` within a disc of `range_pixels`.

    Returns:
        (T, 2) offsets in pixels, (0, 0) first.
    """
    half_width = math.floor(range_pixels / step_pixels + 1e-9)
    axis = torch.arange(-half_width, half_width + 1, dtype=torch.float64) * step_pixels
    lattice = torch.cartesian_prod(axis, axis)
    lattice = lattice[torch.linalg.vector_norm(lattice, dim=-1) <= range_pixels + 1e-9]
    order = torch.argsort(torch.linalg.vector_norm(lattice, dim=-1), stable=True)
    return lattice[order].to(device=device, dtype=dtype)


def shift_phases(frequencies: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """e^{−2πi k·s}: the factor that translates a transform by s pixels.

    Args:
        frequencies: (S, 2) (kx, ky) cycles per pixel.
        shifts: (..., 2) (x, y) pixels.

    Returns:
        complex (..., S).
    """
    phase = -2.0 * torch.pi * (shifts @ frequencies.to(shifts.dtype).T)
    return torch.polar(torch.ones_like(phase), phase)


@dataclass(frozen=True)
class ParticleTerms:
    """Per-particle factors of the likelihood for a batch of n particles and T offsets.

    Attributes:
        weighted_images: complex (n, T, S): Y_o = 2 m / σ² · conj(X e^{−2πi k·o}) · CTF.
        ctf_weights: real (n, S): m · CTF² / σ².
        image_norms: real (n,): Σ m |X|² / σ² (the constant of log L; CC's image norm).
    """

    weighted_images: torch.Tensor
    ctf_weights: torch.Tensor
    image_norms: torch.Tensor


def particle_terms(
    images: torch.Tensor,
    ctf: torch.Tensor,
    noise_power: torch.Tensor,
    samples: FourierSamples,
    phases: torch.Tensor,
) -> ParticleTerms:
    """The particle-side factors of `global_log_likelihoods` / `local_log_likelihoods`.

    Args:
        images: complex (n, S) image transforms at the samples (engine.fourier
            centred_rfftn, flattened, indexed by samples.index).
        ctf: real (n, S) CTF at the samples.
        noise_power: real (S,) or (n, S) σ² per sample (1 for cross-correlation).
        samples: the samples.
        phases: complex (n, T, S) e^{−2πi k·o} of each particle's T candidate origins
            (`shift_phases`).
    """
    inverse_noise = samples.multiplicity / noise_power
    centred = images[:, None, :] * phases
    weighted = (2.0 * inverse_noise * ctf)[:, None, :] * centred.conj()
    norms = (inverse_noise * (images.real.square() + images.imag.square())).sum(-1)
    return ParticleTerms(weighted, inverse_noise * ctf.square(), norms)


@dataclass(frozen=True)
class Scores:
    """The two pose-dependent parts of log L for n particles, T offsets, J orientations.

    Attributes:
        cross: real (n, T, J) Re Σ Y_o P_A.
        norm: real (n, 1, J) Σ m CTF² |P_A|² / σ².
    """

    cross: torch.Tensor
    norm: torch.Tensor

    def log_likelihoods(self) -> torch.Tensor:
        """(n, T, J) log L up to a per-particle constant."""
        return self.cross - self.norm

    def cross_correlations(self, terms: ParticleTerms) -> torch.Tensor:
        """(n, T, J) normalised cross-correlation (meaningful for terms with σ² = 1)."""
        denominator = torch.sqrt(terms.image_norms[:, None, None] * self.norm)
        return 0.5 * self.cross / denominator.clamp_min(1e-30)


def global_scores(terms: ParticleTerms, projections: torch.Tensor) -> Scores:
    """Scores of n particles against J projections shared by all of them.

    Args:
        terms: from `particle_terms` (n particles, T offsets, S samples).
        projections: complex (J, S) projections at the samples.
    """
    n, t, s = terms.weighted_images.shape
    weighted = terms.weighted_images.reshape(n * t, s)
    # Re(Y P) = Re Y Re P − Im Y Im P: one real product of [Re Y, −Im Y] and [Re P, Im P].
    left = torch.cat([weighted.real, -weighted.imag], dim=-1)
    right = torch.cat([projections.real, projections.imag], dim=-1)
    cross = (left @ right.T).reshape(n, t, -1)
    power = projections.real.square() + projections.imag.square()
    return Scores(cross, (terms.ctf_weights @ power.T)[:, None, :])


def local_scores(terms: ParticleTerms, projections: torch.Tensor) -> Scores:
    """Scores of n particles against their own M projections each.

    Args:
        terms: from `particle_terms` (n particles, T offsets, S samples).
        projections: complex (n, M, S).
    """
    weighted = terms.weighted_images
    left = torch.cat([weighted.real, -weighted.imag], dim=-1)
    right = torch.cat([projections.real, projections.imag], dim=-1)
    cross = left @ right.transpose(-1, -2)
    power = projections.real.square() + projections.imag.square()
    return Scores(cross, (power * terms.ctf_weights[:, None, :]).sum(-1)[:, None, :])


@dataclass(frozen=True)
class Posterior:
    """Posterior over a batch's (offset, orientation) grid.

    Attributes:
        weights: (n, T, J) probabilities, summing to 1 per particle.
        best_offset: (n,) long index of the most probable offset.
        best_orientation: (n,) long index of the most probable orientation.
        max_probability: (n,) posterior of the best pose.
        log_evidence: (n,) logsumexp of the scores (RELION's log-likelihood contribution,
            up to the per-particle constant).
    """

    weights: torch.Tensor
    best_offset: torch.Tensor
    best_orientation: torch.Tensor
    max_probability: torch.Tensor
    log_evidence: torch.Tensor


def posterior(scores: torch.Tensor, hard: bool = False, significance: float = 1e-4) -> Posterior:
    """Softmax of log-likelihood scores over (offset, orientation), or the argmax alone.

    Args:
        scores: real (n, T, J) log-likelihoods (uniform priors), or CC values with hard.
        hard: put all weight on the best pose (maximum, as RELION's first CC iteration);
            ties keep the lowest flat index.
        significance: poses whose probability is below this fraction of the best one's
            get none (RELION's significant samples; they would add < 1e-4 each to the
            back-projection), and the rest are renormalised.
    """
    n, t, j = scores.shape
    flat = scores.reshape(n, t * j)
    best = torch.argmax(flat, dim=-1)
    log_evidence = torch.logsumexp(flat, dim=-1)
    if hard:
        weights = torch.zeros_like(flat)
        weights.scatter_(1, best[:, None], 1.0)
    else:
        relative = flat - flat.gather(1, best[:, None])
        weights = torch.where(relative >= math.log(significance), torch.exp(relative), 0.0)
        weights = weights / weights.sum(-1, keepdim=True)
    max_probability = weights.gather(1, best[:, None]).squeeze(1)
    return Posterior(weights.reshape(n, t, j), best // j, best % j, max_probability, log_evidence)


def marginal_global_slices(
    weights: torch.Tensor, images: torch.Tensor, ctf: torch.Tensor, phases: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior-weighted back-projection data of a batch over J shared orientations.

    data_j(k) = Σ_i Σ_o w_i(o, j) X_i(k) e^{−2πi k·o} CTF_i(k),
    weight_j(k) = Σ_i Σ_o w_i(o, j) CTF_i(k)².

    Args:
        weights: (n, T, J) posterior.
        images: complex (n, S) transforms to back-project (unmasked images).
        ctf: real (n, S).
        phases: complex (n, T, S) e^{−2πi k·o}.

    Returns:
        data complex (J, S) and weights real (J, S).
    """
    n, t, j = weights.shape
    centred = (images[:, None, :] * phases * ctf[:, None, :]).reshape(n * t, -1)
    flat_weights = weights.reshape(n * t, j).T
    data = torch.complex(flat_weights @ centred.real, flat_weights @ centred.imag)
    return data, weights.sum(1).T @ ctf.square()


def marginal_local_slices(
    weights: torch.Tensor,
    images: torch.Tensor,
    ctf: torch.Tensor,
    phases: torch.Tensor,
    keep: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Back-projection data of each particle's `keep` most probable orientations.

    The posterior mass of the kept orientations is renormalised to 1 per particle.

    Args:
        weights: (n, T, M) posterior over each particle's own grid.
        images, ctf, phases: as in `marginal_global_slices`.
        keep: orientations kept per particle (≤ M).

    Returns:
        which: (n, K) long indices of the kept orientations (K = min(keep, M));
        data: complex (n, K, S); sample weights: real (n, K, S).
    """
    orientation_weights = weights.sum(1)  # (n, M)
    kept = min(keep, orientation_weights.shape[-1])
    top, which = torch.topk(orientation_weights, kept, dim=-1)
    scale = 1.0 / top.sum(-1, keepdim=True).clamp_min(1e-30)
    chosen = torch.gather(weights, 2, which[:, None, :].expand(-1, weights.shape[1], -1))
    chosen = chosen * scale[:, None, :]  # (n, T, K)
    centred = images[:, None, :] * phases * ctf[:, None, :]  # (n, T, S)
    transposed = chosen.transpose(1, 2)
    data = torch.complex(transposed @ centred.real, transposed @ centred.imag)
    sample_weights = (top * scale)[:, :, None] * ctf.square()[:, None, :]
    return which, data, sample_weights
