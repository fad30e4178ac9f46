"""CTF against theory (zeros, k = 0, astigmatism axes, envelope) and against RELION."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryorefine.engine.ctf import ctf_1d, ctf_2d, electron_wavelength_angstrom
from cryorefine.engine.fourier import centred_rfftn, radial_frequency

VOLTAGE, CS, Q0 = 300.0, 2.7, 0.07


def test_wavelength_matches_tabulated_values() -> None:
    assert electron_wavelength_angstrom(300.0).item() == pytest.approx(0.019687, abs=1e-5)
    assert electron_wavelength_angstrom(200.0).item() == pytest.approx(0.025079, abs=1e-5)
    batch = electron_wavelength_angstrom(torch.tensor([200.0, 300.0]))
    assert batch.shape == (2,) and batch[0] > batch[1]


@pytest.mark.parametrize("defocus", [5000.0, 21000.0])
def test_1d_zeros_where_chi_is_a_multiple_of_pi(device: torch.device, defocus: float) -> None:
    wavelength = electron_wavelength_angstrom(VOLTAGE).item()
    # χ(u = k²) = b u − a u² + φ0 = n π  ⇔  a u² − b u + (n π − φ0) = 0; smaller root.
    a = 0.5 * math.pi * CS * 1e7 * wavelength**3
    b = math.pi * wavelength * defocus
    phase0 = math.asin(Q0)
    orders = torch.arange(1, 11, dtype=torch.float64)
    c = orders * math.pi - phase0
    u = (b - torch.sqrt(b * b - 4 * a * c)) / (2 * a)
    zeros = torch.sqrt(u).to(device)
    at_zeros = ctf_1d(zeros, defocus, VOLTAGE, CS, Q0)
    assert at_zeros.abs().max().item() < 1e-5
    # Between zeros n and n+1, χ lies in (nπ, (n+1)π): the sign is (−1)^n.
    midpoints = 0.5 * (zeros[:-1] + zeros[1:])
    signs = torch.sign(ctf_1d(midpoints, defocus, VOLTAGE, CS, Q0)).cpu()
    assert torch.equal(signs, (-1.0) ** orders[:-1])
    # float32 frequencies give a float32 CTF still within 1e-4 of the zero.
    assert ctf_1d(zeros.float(), defocus, VOLTAGE, CS, Q0).abs().max().item() < 1e-4


def test_value_at_zero_frequency(device: torch.device) -> None:
    k0 = torch.zeros(1, device=device)
    assert ctf_1d(k0, 15000.0, VOLTAGE, CS, Q0).item() == pytest.approx(Q0, abs=1e-7)
    phase_plate = ctf_1d(k0, 15000.0, VOLTAGE, CS, Q0, phase_shift_degrees=90.0).item()
    assert phase_plate == pytest.approx(math.sqrt(1 - Q0**2), abs=1e-6)
    image = ctf_2d((32, 32), 1.0, 15000.0, 12000.0, 20.0, VOLTAGE, CS, Q0, device=device)
    assert image[0, 0].item() == pytest.approx(Q0, abs=1e-7)


def test_astigmatism_axes_follow_the_1d_ctf(device: torch.device) -> None:
    # Angle atan2(3, 4): the U axis passes exactly through grid points (4m, 3m),
    # the V axis (perpendicular) through (3m, −4m).
    size, pixel = 128, 1.2
    angle = math.degrees(math.atan2(3, 4))
    du, dv = 18000.0, 11000.0
    # float64 parameters make a float64 CTF: the convention is checked to 1e-7.
    du64 = torch.tensor(du, dtype=torch.float64, device=device)
    image = ctf_2d((size, size), pixel, du64, dv, angle, VOLTAGE, CS, Q0)
    m = torch.arange(1, 13)
    k_per_angstrom = (5 * m.double() / size / pixel).to(device)
    along_u = image[3 * m, 4 * m]
    along_v = image[(-4 * m) % size, 3 * m]
    torch.testing.assert_close(along_u, ctf_1d(k_per_angstrom, du, VOLTAGE, CS, Q0))
    torch.testing.assert_close(along_v, ctf_1d(k_per_angstrom, dv, VOLTAGE, CS, Q0))
    # Without astigmatism the 2D CTF is the 1D one at |k|.
    round_ctf = ctf_2d((size, size), pixel, du64, du, angle, VOLTAGE, CS, Q0)
    radius = radial_frequency((size, size), device=device, dtype=torch.float64) / pixel
    torch.testing.assert_close(round_ctf, ctf_1d(radius, du, VOLTAGE, CS, Q0))


def test_b_factor_envelope(device: torch.device) -> None:
    k = torch.linspace(0.0, 0.3, 50, device=device, dtype=torch.float64)
    plain = ctf_1d(k, 12000.0, VOLTAGE, CS, Q0)
    damped = ctf_1d(k, 12000.0, VOLTAGE, CS, Q0, b_factor_angstrom2=80.0)
    torch.testing.assert_close(damped, plain * torch.exp(-80.0 * k**2 / 4))


@pytest.mark.parametrize("shape", [(32, 32), (31, 20), (24, 17)])
def test_full_transform_is_hermitian_and_matches_rfft(
    device: torch.device, shape: tuple[int, int]
) -> None:
    args = (shape, 1.3, 14000.0, 9000.0, 33.0, VOLTAGE, CS, Q0, 10.0, 30.0)
    half = ctf_2d(*args, rfft=True, device=device)
    full = ctf_2d(*args, rfft=False, device=device)
    assert half.shape == (shape[0], shape[1] // 2 + 1) and full.shape == shape
    # An even axis's Nyquist sample (frequency −1/2 in the full grid, +1/2 in the
    # rfft's last column) has no mirror image on the grid: leave it out.
    rows = slice(None) if shape[0] % 2 else torch.arange(shape[0]) != shape[0] // 2
    columns = (shape[1] + 1) // 2
    torch.testing.assert_close(full[rows, :columns], half[rows, :columns])
    # A real function's transform is Hermitian: C(−k) = conj C(k) = C(k) for a real CTF.
    flipped = torch.roll(torch.flip(full, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    keep = torch.ones(shape, dtype=torch.bool)
    if shape[0] % 2 == 0:
        keep[shape[0] // 2, :] = False
    if shape[1] % 2 == 0:
        keep[:, shape[1] // 2] = False
    torch.testing.assert_close(flipped[keep], full[keep])


def test_parameters_broadcast_to_a_batch(device: torch.device) -> None:
    defoci = torch.tensor([8000.0, 12000.0, 20000.0], device=device)
    angles = torch.tensor([[0.0], [45.0]], device=device)
    batch = ctf_2d((16, 16), 1.0, defoci, defoci - 2000, angles, VOLTAGE, CS, Q0)
    assert batch.shape == (2, 3, 16, 9) and batch.device.type == device.type
    for i in range(2):
        for j in range(3):
            one = ctf_2d(
                (16, 16), 1.0, defoci[j].item(), defoci[j].item() - 2000,
                angles[i, 0].item(), VOLTAGE, CS, Q0, device=device,
            )  # fmt: skip
            torch.testing.assert_close(batch[i, j], one)
    k = torch.linspace(0, 0.2, 7, device=device)
    assert ctf_1d(k, defoci, VOLTAGE, CS, Q0).shape == (3, 7)


def test_float32_agrees_with_float64(device: torch.device) -> None:
    defocus = torch.tensor([9000.0, 25000.0], device=device)
    single = ctf_2d((64, 64), 1.0, defocus, defocus - 500, 70.0, VOLTAGE, CS, Q0)
    double = ctf_2d((64, 64), 1.0, defocus.double(), defocus - 500, 70.0, VOLTAGE, CS, Q0)
    assert single.dtype == torch.float32 and double.dtype == torch.float64
    # χ reaches ~230 rad at the corner: float32 keeps ~1e-5 of it.
    assert (single.double() - double).abs().max().item() < 1e-4


def test_gradient_with_respect_to_defocus(device: torch.device) -> None:
    """d CTF / d defocus = cos χ · π λ k² (CTF refinement by gradient needs it)."""
    defocus = torch.tensor([12000.0, 15000.0], dtype=torch.float64, device=device)
    defocus.requires_grad_(True)
    k = torch.linspace(0.01, 0.3, 40, dtype=torch.float64, device=device)
    (gradient,) = torch.autograd.grad(ctf_1d(k, defocus, VOLTAGE, CS, Q0).sum(), defocus)
    wavelength = electron_wavelength_angstrom(VOLTAGE).item()
    chi = (
        math.pi * wavelength * defocus.detach()[:, None] * k**2
        - 0.5 * math.pi * CS * 1e7 * wavelength**3 * k**4
        + math.asin(Q0)
    )
    expected = (torch.cos(chi) * math.pi * wavelength * k**2).sum(dim=-1)
    torch.testing.assert_close(gradient, expected)


STAR_TEMPLATE = """
data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnVoltage #3
_rlnSphericalAberration #4
_rlnAmplitudeContrast #5
_rlnImagePixelSize #6
_rlnImageSize #7
_rlnImageDimensionality #8
1 opticsGroup1 {voltage} {cs} {q0} {pixel} {size} 2

data_particles

loop_
_rlnAngleRot #1
_rlnAngleTilt #2
_rlnAnglePsi #3
_rlnDefocusU #4
_rlnDefocusV #5
_rlnDefocusAngle #6
_rlnPhaseShift #7
_rlnCtfBfactor #8
_rlnOpticsGroup #9
_rlnImageName #10
{rows}
"""


@pytest.mark.relion
def test_matches_relion_project_ctf(relion_bin: str, tmp_path: Path) -> None:
    """A delta-function volume projects to a constant transform, so the transform of
    `relion_project --ctf`'s image is RELION's CTF (inside RELION's r_max = N/2)."""
    size, pixel = 64, 1.5
    # (defocus U, V, angle, phase shift, B-factor)
    cases = [
        (15000.0, 10000.0, 30.0, 0.0, 0.0),
        (8000.0, 12000.0, -70.0, 0.0, 0.0),
        (20000.0, 19000.0, 125.0, 40.0, 60.0),
    ]
    volume = np.zeros((size, size, size), np.float32)
    volume[size // 2, size // 2, size // 2] = 1.0
    with mrcfile.new(tmp_path / "delta.mrc") as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = pixel
    rows = "\n".join(
        f"0 0 0 {u} {v} {a} {p} {b} 1 {i + 1}@none.mrcs" for i, (u, v, a, p, b) in enumerate(cases)
    )
    star = STAR_TEMPLATE.format(voltage=VOLTAGE, cs=CS, q0=Q0, pixel=pixel, size=size, rows=rows)
    (tmp_path / "angles.star").write_text(star)
    subprocess.run(
        [f"{relion_bin}/relion_project", "--i", "delta.mrc", "--o", "proj", "--ctf",
         "--ang", "angles.star", "--angpix", str(pixel)],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    images = torch.from_numpy(mrcfile.read(tmp_path / "proj.mrcs").astype(np.float64))
    relion_ctf = centred_rfftn(images, 2)
    assert relion_ctf.imag.abs().max().item() < 1e-5
    u, v, a, p, b = (
        torch.tensor(column, dtype=torch.float64) for column in zip(*cases, strict=True)
    )
    ours = ctf_2d((size, size), pixel, u, v, a, VOLTAGE, CS, Q0, p, b)
    inside = radial_frequency((size, size)) < 0.45
    difference = (relion_ctf.real - ours)[:, inside]
    assert difference.abs().max().item() < 1e-4
