"""Contrast transfer function: RELION's model, sign and units.

CTF(k) = sin(χ(k)) · exp(−B k² / 4) with

    χ(k) = π λ Δf(φ) k² − (π/2) Cs λ³ k⁴ + asin(Q0) + phase_shift,
    Δf(φ) = (dU + dV)/2 + (dU − dV)/2 · cos 2(φ − astigmatism_angle),

k in 1/Å, φ = atan2(ky, kx) the azimuth of the frequency (x = column), defocus
positive for underfocus, λ the relativistic electron wavelength. asin(Q0) is
RELION's atan(Q0 / √(1 − Q0²)) written so that Q0 = 1 stays finite. With this sign
the CTF equals +Q0 at k = 0 (without phase shift) and a projection multiplied by it
is what `relion_project --ctf` writes.

Parameters are tensors or numbers that broadcast together; their broadcast shape
is the leading (...) shape of the result, so a batch of defoci gives a batch of CTFs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryorefine.engine.fourier import frequency_grid

Parameter = torch.Tensor | float


def electron_wavelength_angstrom(
    voltage_kv: Parameter, device: torch.device | str | None = None
) -> torch.Tensor:
    """Relativistic electron wavelength λ = 12.2643247 / √(V (1 + 0.978466e-6 V)), V in volts.

    Args:
        voltage_kv: (...) acceleration voltage in kV.

    Returns:
        (...) wavelength in Å (0.019687 Å at 300 kV), float64 for numbers, else the
        input's floating dtype.
    """
    v = _as_float_tensor(voltage_kv, device, torch.float64) * 1e3
    return 12.2643247 / torch.sqrt(v * (1.0 + 0.978466e-6 * v))


def ctf_1d(
    frequency_per_angstrom: torch.Tensor,
    defocus_angstrom: Parameter,
    voltage_kv: Parameter,
    spherical_aberration_mm: Parameter,
    amplitude_contrast: Parameter,
    phase_shift_degrees: Parameter = 0.0,
    b_factor_angstrom2: Parameter = 0.0,
) -> torch.Tensor:
    """Rotationally symmetric CTF at spatial frequencies |k|.

    Args:
        frequency_per_angstrom: (*f) spatial frequencies |k| in 1/Å.
        defocus_angstrom: (...) defocus in Å, positive for underfocus.
        voltage_kv: (...) acceleration voltage in kV.
        spherical_aberration_mm: (...) Cs in mm.
        amplitude_contrast: (...) fraction Q0 in [0, 1].
        phase_shift_degrees: (...) extra phase (phase plate) in degrees.
        b_factor_angstrom2: (...) envelope exp(−B k² / 4), B in Å².

    Returns:
        (..., *f) CTF values on the frequencies' device, ... the broadcast shape of
        the parameters; float64 if the frequencies are float64, else float32.
    """
    k = frequency_per_angstrom
    dtype = k.dtype if k.dtype == torch.float64 else torch.float32
    k = k.to(dtype)
    defocus, voltage, cs, q0, phase, b_factor = _broadcast_parameters(
        (
            defocus_angstrom,
            voltage_kv,
            spherical_aberration_mm,
            amplitude_contrast,
            phase_shift_degrees,
            b_factor_angstrom2,
        ),
        device=k.device,
        trailing_dims=k.ndim,
    )
    wavelength = electron_wavelength_angstrom(voltage)
    k2 = k * k
    chi = torch.addcmul(
        _constant_phase(q0, phase).to(dtype), (math.pi * wavelength * defocus).to(dtype), k2
    )
    chi = chi.addcmul_(_cs_coefficient(cs, wavelength).to(dtype), k2 * k2, value=-1.0)
    return _apply_envelope(torch.sin(chi), b_factor_angstrom2, b_factor, k2)


def ctf_2d(
    image_shape: tuple[int, int],
    pixel_size_angstrom: float,
    defocus_u_angstrom: Parameter,
    defocus_v_angstrom: Parameter,
    astigmatism_angle_degrees: Parameter,
    voltage_kv: Parameter,
    spherical_aberration_mm: Parameter,
    amplitude_contrast: Parameter,
    phase_shift_degrees: Parameter = 0.0,
    b_factor_angstrom2: Parameter = 0.0,
    rfft: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Astigmatic CTF on the Fourier samples of an image (layout of `frequency_grid`).

    Args:
        image_shape: (h, w) real-space image shape in pixels.
        pixel_size_angstrom: pixel size in Å.
        defocus_u_angstrom, defocus_v_angstrom: (...) defoci in Å along the
            astigmatism azimuth and perpendicular to it (underfocus positive).
        astigmatism_angle_degrees: (...) azimuth of the U axis from the x axis
            (towards y), degrees.
        voltage_kv, spherical_aberration_mm, amplitude_contrast, phase_shift_degrees,
        b_factor_angstrom2: (...) as in `ctf_1d`.
        rfft: half transform along x (h, w // 2 + 1), as `centred_rfftn`, or the full (h, w).
        device: where to build it; by default the device of the tensor parameters.

    Returns:
        real (..., h, w // 2 + 1) or (..., h, w) with DC at index 0 (FFT order), dtype
        float32 unless a tensor parameter is float64; ... the parameters' broadcast shape.
    """
    values = (
        defocus_u_angstrom,
        defocus_v_angstrom,
        astigmatism_angle_degrees,
        voltage_kv,
        spherical_aberration_mm,
        amplitude_contrast,
        phase_shift_degrees,
        b_factor_angstrom2,
    )
    if device is None:
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
    dtype = torch.float32
    if any(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in values):
        dtype = torch.float64
    du, dv, angle, voltage, cs, q0, phase, b_factor = _broadcast_parameters(
        values, device=device, trailing_dims=2
    )
    k = frequency_grid(image_shape, rfft=rfft, device=du.device, dtype=dtype)
    k = k / pixel_size_angstrom
    kx, ky = k[..., 0], k[..., 1]
    k2 = kx * kx + ky * ky
    # Δf(φ) k² without atan2: k² cos 2φ = kx² − ky² and k² sin 2φ = 2 kx ky, so
    # π λ Δf k² = a k² + b (kx² − ky²) + c (2 kx ky) with per-CTF a, b, c.
    wavelength = electron_wavelength_angstrom(voltage)
    two_angle = 2.0 * torch.deg2rad(angle)
    mean_term = math.pi * wavelength * 0.5 * (du + dv)
    astigmatic_term = math.pi * wavelength * 0.5 * (du - dv)
    chi = torch.addcmul(_constant_phase(q0, phase).to(dtype), mean_term.to(dtype), k2)
    chi = chi.addcmul_((astigmatic_term * torch.cos(two_angle)).to(dtype), kx * kx - ky * ky)
    chi = chi.addcmul_((astigmatic_term * torch.sin(two_angle)).to(dtype), 2.0 * kx * ky)
    chi = chi.addcmul_(_cs_coefficient(cs, wavelength).to(dtype), k2 * k2, value=-1.0)
    return _apply_envelope(torch.sin(chi), b_factor_angstrom2, b_factor, k2)


def _constant_phase(
    amplitude_contrast: torch.Tensor, phase_shift_degrees: torch.Tensor
) -> torch.Tensor:
    """asin(Q0) + phase shift in radians: the frequency-independent part of χ."""
    return torch.asin(amplitude_contrast) + torch.deg2rad(phase_shift_degrees)


def _cs_coefficient(
    spherical_aberration_mm: torch.Tensor, wavelength: torch.Tensor
) -> torch.Tensor:
    """(π/2) Cs λ³ in Å⁴, the coefficient of k⁴ in χ."""
    return 0.5 * math.pi * (spherical_aberration_mm * 1e7) * wavelength**3


def _apply_envelope(
    ctf: torch.Tensor, b_factor_given: Parameter, b_factor: torch.Tensor, k2: torch.Tensor
) -> torch.Tensor:
    """ctf · exp(−B k² / 4); skipped when B is the number 0 (the common case)."""
    if not isinstance(b_factor_given, torch.Tensor) and b_factor_given == 0:
        return ctf
    return ctf * torch.exp(-0.25 * b_factor.to(ctf.dtype) * k2)


def _as_float_tensor(
    value: Parameter, device: torch.device | str | None, default_dtype: torch.dtype
) -> torch.Tensor:
    """A floating tensor from a number or tensor (numbers get `default_dtype`)."""
    if isinstance(value, torch.Tensor):
        tensor = value if device is None else value.to(device)
        return tensor if tensor.is_floating_point() else tensor.to(default_dtype)
    return torch.tensor(value, dtype=default_dtype, device=device)


def _broadcast_parameters(
    values: tuple[Parameter, ...], device: torch.device | str | None, trailing_dims: int
) -> list[torch.Tensor]:
    """Parameters as broadcast float64 tensors of shape (..., 1 × trailing_dims).

    Parameters are per-CTF numbers, few compared with the frequency samples, so
    they are combined in float64 and only the final coefficients are cast.
    """
    converted = [torch.as_tensor(v, dtype=torch.float64, device=device) for v in values]
    return [
        p.reshape(*p.shape, *([1] * trailing_dims)) for p in torch.broadcast_tensors(*converted)
    ]


@dataclass(frozen=True)
class CtfParameters:
    """One micrograph's (or particle's) CTF, in the units RELION's STAR files use.

    Attributes:
        defocus_u_angstrom, defocus_v_angstrom: Å, underfocus positive.
        astigmatism_angle_degrees: azimuth of U from the x axis, degrees.
        voltage_kv: kV; spherical_aberration_mm: mm; amplitude_contrast: fraction.
        phase_shift_degrees: degrees; b_factor_angstrom2: Å².
    """

    defocus_u_angstrom: float
    defocus_v_angstrom: float
    astigmatism_angle_degrees: float
    voltage_kv: float
    spherical_aberration_mm: float
    amplitude_contrast: float
    phase_shift_degrees: float = 0.0
    b_factor_angstrom2: float = 0.0

    def planes(
        self,
        image_shape: tuple[int, int],
        pixel_size_angstrom: float,
        defocus_offsets_angstrom: torch.Tensor,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """CTFs with both defoci shifted by each offset: real (P, h, w // 2 + 1), rfft layout.

        Args:
            image_shape: (h, w) pixels.
            pixel_size_angstrom: Å per pixel.
            defocus_offsets_angstrom: (P,) added to defocus U and V (a defocus plane).
        """
        offsets = defocus_offsets_angstrom.to(device=device, dtype=torch.float64)
        return ctf_2d(
            image_shape,
            pixel_size_angstrom,
            self.defocus_u_angstrom + offsets,
            self.defocus_v_angstrom + offsets,
            self.astigmatism_angle_degrees,
            self.voltage_kv,
            self.spherical_aberration_mm,
            self.amplitude_contrast,
            self.phase_shift_degrees,
            self.b_factor_angstrom2,
            device=device,
        ).float()
