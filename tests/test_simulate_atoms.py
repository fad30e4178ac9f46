"""Potential maps from atoms against closed forms: integrals, centroids, peaks, transforms."""

from __future__ import annotations

import math
import time
from pathlib import Path

import gemmi
import pytest
import torch

from cryorefine.errors import CryorefineError
from cryorefine.simulate.atoms import (
    AtomicModel,
    builtin_structure_path,
    potential_from_atoms,
    read_atomic_model,
    scattering_centre,
    total_scattering,
)
from cryorefine.simulate.scattering import (
    PENG1996_REFERENCE,
    POTENTIAL_PREFACTOR_VOLT_ANGSTROM2,
    electron_scattering_factor,
    scattering_coefficients,
)


def make_model(positions, elements, b_factor=30.0, occupancy=1.0) -> AtomicModel:
    n = len(elements)
    return AtomicModel(
        positions_angstrom=torch.as_tensor(positions, dtype=torch.float64).reshape(n, 3),
        elements=tuple(elements),
        b_factors_angstrom2=torch.full((n,), float(b_factor), dtype=torch.float64),
        occupancies=torch.full((n,), float(occupancy), dtype=torch.float64),
    )


def centroid_px(volume: torch.Tensor) -> torch.Tensor:
    """(x, y, z) centroid of a (z, y, x) map in voxels from the box origin D // 2."""
    d = volume.shape[-1]
    r = torch.arange(d, dtype=torch.float64) - d // 2
    v = volume.double()
    total = v.sum()
    return (
        torch.stack(
            [
                (v.sum(dim=(0, 1)) * r).sum(),
                (v.sum(dim=(0, 2)) * r).sum(),
                (v.sum(dim=(1, 2)) * r).sum(),
            ]
        )
        / total
    )


def test_gemmi_table_is_peng_1996():
    """gemmi's c4322 rows equal the rows typed in from Peng et al. (1996), Table 1."""
    elements = list(PENG1996_REFERENCE)
    a, b = scattering_coefficients(elements)
    for i, element in enumerate(elements):
        ref_a, ref_b = PENG1996_REFERENCE[element]
        assert torch.allclose(a[i], torch.tensor(ref_a, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(b[i], torch.tensor(ref_b, dtype=torch.float64), atol=1e-6)


def test_scattering_factor_at_zero_and_known_value():
    a, b = scattering_coefficients(["C"])
    assert float(
        electron_scattering_factor(torch.tensor(0.0, dtype=torch.float64), a[0], b[0])
    ) == (pytest.approx(2.5088, abs=1e-4))
    # Direct sum of the five Gaussians at s = 0.5 / Å.
    expected = sum(
        ai * math.exp(-bi * 0.25) for ai, bi in zip(*PENG1996_REFERENCE["C"], strict=True)
    )
    value = float(electron_scattering_factor(torch.tensor(0.5, dtype=torch.float64), a[0], b[0]))
    assert value == pytest.approx(expected, rel=1e-12)


def test_potential_prefactor():
    """h²/(2π m₀ e) = 47.878 V·Å² (CODATA constants)."""
    assert pytest.approx(47.878, abs=2e-3) == POTENTIAL_PREFACTOR_VOLT_ANGSTROM2


def test_unknown_element_is_a_clear_error():
    with pytest.raises(CryorefineError, match="unknown element"):
        scattering_coefficients(["C", "Xx"])


@pytest.mark.parametrize("b_factor", [0.0, 20.0])
@pytest.mark.parametrize("pixel_size", [0.7, 2.5])
def test_integral_of_one_atom_is_fe0(b_factor, pixel_size):
    """sum(map) · voxel volume = prefactor · fe(0), any B and pixel size (1% asked, 1e-4 kept)."""
    model = make_model([[0.3, -0.2, 0.1]], ["S"], b_factor=b_factor)
    volume = potential_from_atoms(model, 32, pixel_size, centre_angstrom=torch.zeros(3))
    integral = float(volume.double().sum()) * pixel_size**3
    expected = POTENTIAL_PREFACTOR_VOLT_ANGSTROM2 * sum(PENG1996_REFERENCE["S"][0])
    assert integral == pytest.approx(expected, rel=1e-4)


def test_occupancy_scales_the_map():
    full = potential_from_atoms(make_model([[0, 0, 0]], ["O"]), 16, 1.0)
    half = potential_from_atoms(make_model([[0, 0, 0]], ["O"], occupancy=0.5), 16, 1.0)
    torch.testing.assert_close(half, 0.5 * full)


def test_transform_matches_scattering_factor():
    """The map's DFT is the aliased sum of prefactor · fe(|q|/2) · exp(-B q²/4) · Π sinc(q_i p).

    The sinc is the voxel average; aliases of ±1/p per axis are summed (the next, ±2/p,
    are below 1e-9).
    """
    pixel, box, b_factor = 1.0, 32, 40.0
    model = make_model([[0.0, 0.0, 0.0]], ["N"], b_factor=b_factor)
    volume = potential_from_atoms(model, box, pixel, centre_angstrom=torch.zeros(3)).double()
    transform = torch.fft.fftn(torch.fft.ifftshift(volume)) * pixel**3
    q = torch.fft.fftfreq(box, d=pixel, dtype=torch.float64)
    a, b = scattering_coefficients(["N"])
    expected = torch.zeros_like(volume)
    for nz in range(-1, 2):
        for ny in range(-1, 2):
            for nx in range(-1, 2):
                qz, qy, qx = torch.meshgrid(
                    q + nz / pixel, q + ny / pixel, q + nx / pixel, indexing="ij"
                )
                q_norm = torch.sqrt(qx**2 + qy**2 + qz**2)
                fe = electron_scattering_factor(q_norm / 2.0, a[0], b[0] + b_factor)
                sinc = torch.sinc(qx * pixel) * torch.sinc(qy * pixel) * torch.sinc(qz * pixel)
                expected += POTENTIAL_PREFACTOR_VOLT_ANGSTROM2 * fe * sinc
    scale = expected.abs().max()
    # Tails beyond the 4-sigma window are the remaining error (~1e-4 of fe(0)).
    assert float((transform.real - expected).abs().max() / scale) < 3e-4
    assert float(transform.imag.abs().max() / scale) < 1e-5


@pytest.mark.parametrize(("pixel", "b_factor"), [(0.5, 200.0), (2.0, 0.0)])
def test_peak_value_is_the_voxel_mean(pixel, b_factor):
    """The voxel at an atom holds its mean potential: prefactor Σ a_i [erf(p / (2√2 σ_i)) / p]³.

    σ_i² = (b_i + B) / (8π²); for B >> p² this tends to the point value ρ(0) (1.5 %).
    """
    model = make_model([[0.0, 0.0, 0.0]], ["C"], b_factor=b_factor)
    volume = potential_from_atoms(model, 32, pixel, centre_angstrom=torch.zeros(3))
    a, b = PENG1996_REFERENCE["C"]
    mean = sum(
        ai
        * (
            math.erf(pixel / (2 * math.sqrt(2) * math.sqrt((bi + b_factor) / (8 * math.pi**2))))
            / pixel
        )
        ** 3
        for ai, bi in zip(a, b, strict=True)
    )
    assert float(volume[16, 16, 16]) == pytest.approx(
        POTENTIAL_PREFACTOR_VOLT_ANGSTROM2 * mean, rel=1e-5
    )
    if b_factor > 100:
        point = sum(
            ai * (4 * math.pi / (bi + b_factor)) ** 1.5 for ai, bi in zip(a, b, strict=True)
        )
        assert float(volume[16, 16, 16]) == pytest.approx(
            POTENTIAL_PREFACTOR_VOLT_ANGSTROM2 * point, rel=1.5e-2
        )


def test_centroid_is_box_origin():
    """Centred on the scattering centre, the map's centroid is the box origin (< 0.1 px)."""
    generator = torch.Generator().manual_seed(1)
    n = 40
    positions = 8.0 * torch.randn((n, 3), generator=generator, dtype=torch.float64)
    elements = ["C", "N", "O", "S", "P"] * (n // 5)
    model = AtomicModel(
        positions_angstrom=positions,
        elements=tuple(elements),
        b_factors_angstrom2=50.0
        + 60.0 * torch.rand((n,), generator=generator, dtype=torch.float64),
        occupancies=0.5 + 0.5 * torch.rand((n,), generator=generator, dtype=torch.float64),
    )
    pixel = 1.5
    volume = potential_from_atoms(model, 64, pixel)
    assert float(centroid_px(volume).abs().max()) < 0.01
    # With a given centre, the centroid sits at (scattering centre - centre) / pixel.
    centre = torch.tensor([3.0, -2.0, 4.5], dtype=torch.float64)
    volume = potential_from_atoms(model, 64, pixel, centre_angstrom=centre)
    expected = (scattering_centre(model) - centre) / pixel
    assert float((centroid_px(volume) - expected).abs().max()) < 0.01


def test_two_atoms_peak_where_the_atoms_are():
    pixel = 1.0
    positions = [[6.0, 0.0, -3.0], [-5.0, 7.0, 4.0]]
    model = make_model(positions, ["S", "S"], b_factor=10.0)
    volume = potential_from_atoms(model, 32, pixel, centre_angstrom=torch.zeros(3))
    # Local maxima: voxels larger than all 26 neighbours.
    pooled = torch.nn.functional.max_pool3d(volume[None, None], 3, stride=1, padding=1)[0, 0]
    peaks = torch.nonzero((volume == pooled) & (volume > 0.1 * volume.max()))
    found = sorted((int(x) - 16, int(y) - 16, int(z) - 16) for z, y, x in peaks)
    assert found == sorted((int(x), int(y), int(z)) for x, y, z in positions)


@pytest.mark.parametrize("shift", [(0.3, 0.0, 0.0), (0.0, -0.45, 0.2), (1.7, 0.25, -0.8)])
@pytest.mark.parametrize(
    ("pixel", "b_factor", "tolerance"), [(2.0, 40.0, 0.05), (1.0, 200.0, 1e-4)]
)
def test_sub_pixel_shift_moves_the_centroid(shift, pixel, b_factor, tolerance):
    """A shifted atom's centroid moves by the shift.

    Exact once every Gaussian is wider than a voxel (σ >= 1.5 px at B = 200 Å², 1 Å/px);
    with σ ≈ 0.35 px (B = 40 Å², 2 Å/px) binning leaves ≈ e^(-2π²σ²)/π ≈ 0.03 px.
    """
    base = make_model([[0.0, 0.0, 0.0]], ["O"], b_factor=b_factor)
    moved = make_model([[s * pixel for s in shift]], ["O"], b_factor=b_factor)
    centre = torch.zeros(3)
    difference = centroid_px(potential_from_atoms(moved, 24, pixel, centre)) - centroid_px(
        potential_from_atoms(base, 24, pixel, centre)
    )
    assert torch.allclose(difference, torch.tensor(shift, dtype=torch.float64), atol=tolerance)


def test_atoms_outside_the_box_add_only_what_falls_inside():
    """An atom at the box's face keeps half of its scattering; far away, nothing."""
    pixel, box = 1.0, 16
    # x index 15.5 = the outer face of the last voxel: half of the atom lies inside.
    on_face = make_model([[15.5 - 8.0, 0.0, 0.0]], ["C"], b_factor=10.0)
    volume = potential_from_atoms(on_face, box, pixel, centre_angstrom=torch.zeros(3))
    expected = POTENTIAL_PREFACTOR_VOLT_ANGSTROM2 * sum(PENG1996_REFERENCE["C"][0])
    assert float(volume.double().sum()) == pytest.approx(0.5 * expected, rel=1e-4)
    far = make_model([[100.0, 0.0, 0.0]], ["C"])
    assert float(potential_from_atoms(far, box, pixel, torch.zeros(3)).abs().max()) == 0.0


def test_batches_do_not_change_the_map():
    generator = torch.Generator().manual_seed(2)
    positions = 8.0 * torch.randn((30, 3), generator=generator, dtype=torch.float64)
    model = make_model(positions, ["C"] * 30)
    one = potential_from_atoms(model, 32, 1.0, atoms_per_batch=1000)
    many = potential_from_atoms(model, 32, 1.0, atoms_per_batch=7)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-6)


def test_device_gives_the_same_map(device):
    generator = torch.Generator().manual_seed(3)
    positions = 8.0 * torch.randn((30, 3), generator=generator, dtype=torch.float64)
    model = make_model(positions, ["N"] * 30)
    cpu = potential_from_atoms(model, 32, 1.0)
    other = potential_from_atoms(model, 32, 1.0, device=device)
    assert other.device.type == device.type
    torch.testing.assert_close(other.cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_read_atomic_model_pdb_and_cif(tmp_path: Path):
    structure = gemmi.Structure()
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    residue = gemmi.Residue()
    residue.name = "CYS"
    residue.seqid = gemmi.SeqId(1, " ")
    for name, element, position, b_factor, occupancy in [
        ("CA", "C", (1.0, 2.0, 3.0), 15.0, 1.0),
        ("SG", "S", (-4.0, 0.5, 2.5), 40.0, 0.5),
    ]:
        atom = gemmi.Atom()
        atom.name = name
        atom.element = gemmi.Element(element)
        atom.pos = gemmi.Position(*position)
        atom.b_iso = b_factor
        atom.occ = occupancy
        residue.add_atom(atom)
    chain.add_residue(residue)
    model.add_chain(chain)
    structure.add_model(model)
    structure.setup_entities()
    structure.write_pdb(str(tmp_path / "two.pdb"))
    structure.make_mmcif_document().write_file(str(tmp_path / "two.cif"))
    for name in ("two.pdb", "two.cif"):
        atoms = read_atomic_model(tmp_path / name)
        assert atoms.elements == ("C", "S")
        torch.testing.assert_close(
            atoms.positions_angstrom,
            torch.tensor([[1.0, 2.0, 3.0], [-4.0, 0.5, 2.5]], dtype=torch.float64),
        )
        torch.testing.assert_close(
            atoms.b_factors_angstrom2, torch.tensor([15.0, 40.0], dtype=torch.float64)
        )
        torch.testing.assert_close(atoms.occupancies, torch.tensor([1.0, 0.5], dtype=torch.float64))


def test_read_atomic_model_errors(tmp_path: Path):
    with pytest.raises(CryorefineError, match="not found"):
        read_atomic_model(tmp_path / "missing.pdb")
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\nloop_\n_atom_site.id\n")
    with pytest.raises(CryorefineError, match=str(bad.name)):
        read_atomic_model(bad)


def test_builtin_structure():
    """PDB 4JSV chains B + D: 11097 atoms, fits a 64-px box at 2.5 Å/px, quick to compute."""
    model = read_atomic_model(builtin_structure_path())
    assert len(model) == 11097
    assert set(model.elements) <= {"C", "N", "O", "S", "P", "Mg", "F"}
    start = time.perf_counter()
    volume = potential_from_atoms(model, 64, 2.5)
    elapsed = time.perf_counter() - start
    inside = float(volume.double().sum()) * 2.5**3
    assert inside == pytest.approx(
        total_scattering(model) * POTENTIAL_PREFACTOR_VOLT_ANGSTROM2, rel=1e-4
    )
    assert float(centroid_px(volume).abs().max()) < 0.05
    assert elapsed < 10.0  # ~0.1 s measured on 2 cores; generous bound for busy machines
