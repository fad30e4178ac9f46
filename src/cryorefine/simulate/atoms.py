"""Electrostatic potential maps from atomic models (PDB / mmCIF read with gemmi).

Each atom contributes the Peng (1996) five-Gaussian potential blurred by its
isotropic B-factor (see `scattering`): sum_i a_i (4π/(b_i+B))^{3/2}
exp(-4π² r²/(b_i+B)), times the occupancy and h²/(2π m₀ e), in volts.

A voxel holds the *mean* potential over its cube (the Gaussians are integrated over
each voxel exactly, one erf difference per axis), not a point sample: the map's sum
times the voxel volume is then the model's total scattering, sum occupancy · fe(0),
at any pixel size and B-factor, and narrow Gaussians are not aliased.

We compute this ourselves with torch instead of calling ttsim3d: it needs only gemmi
(already a dependency) and any torch, runs on the device of the caller, and is a
separable per-atom sum that is short enough to test against closed forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import gemmi
import torch

from cryorefine.errors import CryorefineError, require_file
from cryorefine.simulate.scattering import (
    POTENTIAL_PREFACTOR_VOLT_ANGSTROM2,
    scattering_coefficients,
)

BUILTIN_STRUCTURE = "4jsv_mtor_mlst8.pdb.gz"

# Gaussian tails beyond this many standard deviations are dropped (erf(4/√2) ≈ 1 - 6e-5).
_WINDOW_SIGMAS = 4.0


def builtin_structure_path() -> Path:
    """Path of the structure shipped with the package (PDB 4JSV chains B and D, see data/)."""
    return Path(str(resources.files("cryorefine.simulate") / "data" / BUILTIN_STRUCTURE))


@dataclass(frozen=True)
class AtomicModel:
    """Atoms of one model of a structure.

    Attributes:
        positions_angstrom: (n, 3) float64 coordinates ordered (x, y, z), Å.
        elements: n element symbols.
        b_factors_angstrom2: (n,) isotropic B-factors, Å².
        occupancies: (n,) occupancies in [0, 1].
    """

    positions_angstrom: torch.Tensor
    elements: tuple[str, ...]
    b_factors_angstrom2: torch.Tensor
    occupancies: torch.Tensor

    def __len__(self) -> int:
        return len(self.elements)


def read_atomic_model(
    path: str | Path, model_index: int = 0, remove_waters: bool = True
) -> AtomicModel:
    """Read one model of a PDB or mmCIF file (optionally gzipped).

    Args:
        path: .pdb, .ent, .cif, .mmcif, possibly .gz.
        model_index: which model (0-based) of a multi-model file.
        remove_waters: drop water molecules (usually not part of a particle's density).

    Raises:
        CryorefineError: the file is missing, unreadable, or holds no atoms.
    """
    path = Path(path)
    path = require_file(path, "atomic model")
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError) as error:
        raise CryorefineError(
            f"cannot read the atomic model ({error}).",
            path=path,
            fix="give a valid PDB or mmCIF file.",
        ) from None
    if remove_waters:
        structure.remove_waters()
    if len(structure) <= model_index:
        raise CryorefineError(
            f"the file has {len(structure)} model(s); model {model_index} was asked for.",
            path=path,
            fix="choose an existing model index.",
        )
    positions, elements, b_factors, occupancies = [], [], [], []
    for chain in structure[model_index]:
        for residue in chain:
            for atom in residue:
                positions.append((atom.pos.x, atom.pos.y, atom.pos.z))
                elements.append(atom.element.name)
                b_factors.append(atom.b_iso)
                occupancies.append(atom.occ)
    if not positions:
        raise CryorefineError(
            "the atomic model holds no atoms.", path=path, fix="give a model with atoms."
        )
    return AtomicModel(
        positions_angstrom=torch.tensor(positions, dtype=torch.float64),
        elements=tuple(elements),
        b_factors_angstrom2=torch.tensor(b_factors, dtype=torch.float64),
        occupancies=torch.tensor(occupancies, dtype=torch.float64),
    )


def total_scattering(model: AtomicModel) -> float:
    """sum over atoms of occupancy · fe(0), in Å: the integral of the map / the prefactor."""
    a, _ = scattering_coefficients(model.elements)
    return float((model.occupancies * a.sum(dim=-1)).sum())


def scattering_centre(model: AtomicModel) -> torch.Tensor:
    """(3,) centroid of the atoms weighted by occupancy · fe(0), Å, ordered (x, y, z).

    The potential map's own centroid, so a map centred here has its centroid at the
    box origin.
    """
    a, _ = scattering_coefficients(model.elements)
    weights = model.occupancies * a.sum(dim=-1)
    return (weights[:, None] * model.positions_angstrom).sum(dim=0) / weights.sum()


def _bin_integrals(offsets_px: torch.Tensor, sigma_px: torch.Tensor, window: int) -> torch.Tensor:
    """Fraction of a 1D normalised Gaussian falling in each of `window` unit bins.

    Args:
        offsets_px: (n,) position of the Gaussian's centre relative to the centre of
            the window's first bin, in pixels.
        sigma_px: (n, g) standard deviations in pixels.

    Returns:
        (n, g, window) bin integrals.
    """
    edges = torch.arange(window + 1, dtype=offsets_px.dtype, device=offsets_px.device) - 0.5
    z = (edges - offsets_px[:, None, None]) / (sigma_px[..., None] * math.sqrt(2.0))
    cdf = 0.5 * torch.erf(z)
    return cdf[..., 1:] - cdf[..., :-1]


def potential_from_atoms(
    model: AtomicModel,
    box_size: int,
    pixel_size_angstrom: float,
    centre_angstrom: torch.Tensor | None = None,
    b_factor_offset_angstrom2: float = 0.0,
    atoms_per_batch: int = 2048,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Electrostatic potential of an atomic model on a cubic grid, in volts.

    Args:
        model: atoms, positions in Å.
        box_size: D, the grid is (D, D, D) with axes (z, y, x).
        pixel_size_angstrom: voxel size in Å.
        centre_angstrom: (3,) model coordinate (x, y, z) placed at the box origin
            (voxel D // 2); by default `scattering_centre(model)`.
        b_factor_offset_angstrom2: added to every atom's B-factor (extra blur).
        atoms_per_batch: atoms whose neighbourhoods are computed at once (memory).
        device, dtype: of the returned map.

    Returns:
        (D, D, D) mean potential of every voxel (V). Atoms partly outside the box
        contribute only what falls inside it.
    """
    if centre_angstrom is None:
        centre_angstrom = scattering_centre(model)
    centre = torch.as_tensor(centre_angstrom, dtype=torch.float64).reshape(3)
    a, b = scattering_coefficients(model.elements)
    b_total = b + (model.b_factors_angstrom2[:, None] + b_factor_offset_angstrom2)
    if bool((b_total <= 0).any()):
        raise CryorefineError(
            "an atom has a non-positive total Gaussian width b + B.",
            fix="use B-factors (plus any offset) larger than -0.2 Å².",
        )
    # Per-axis standard deviation of exp(-4π² r² / b): σ² = b / (8π²).
    sigma_px = torch.sqrt(b_total / (8.0 * math.pi**2)) / pixel_size_angstrom
    weights = (model.occupancies[:, None] * a) * (
        POTENTIAL_PREFACTOR_VOLT_ANGSTROM2 / pixel_size_angstrom**3
    )
    # Continuous voxel index of every atom, per axis (x, y, z).
    index = (model.positions_angstrom - centre) / pixel_size_angstrom + box_size // 2

    radius = math.ceil(_WINDOW_SIGMAS * float(sigma_px.max())) + 1
    window = 2 * radius + 1
    # Pad the grid by a window on each side so that partly outside atoms need no clipping.
    padded = box_size + 2 * window
    first = torch.floor(index).long() - radius  # first voxel of each atom's window
    inside = ((first + window > 0) & (first < box_size)).all(dim=-1)

    volume = torch.zeros(padded**3, dtype=dtype, device=device)
    steps = torch.arange(window, device=device)
    keep = torch.nonzero(inside).flatten()
    for start in range(0, len(keep), atoms_per_batch):
        atoms = keep[start : start + atoms_per_batch]
        corner = first[atoms].to(device) + window  # in padded coordinates
        offsets = (index[atoms] - first[atoms]).to(device)  # (n, 3) within the window
        s = sigma_px[atoms].to(device)
        # Bin integrals in float64 (erf differences cancel), the outer products in `dtype`.
        px, py, pz = (_bin_integrals(offsets[:, axis], s, window).to(dtype) for axis in range(3))
        w = weights[atoms].to(device=device, dtype=dtype)
        block = torch.einsum("ng,ngz,ngy,ngx->nzyx", w, pz, py, px)
        # Flat index (z * padded + y) * padded + x of every voxel of every window.
        flat = (
            (corner[:, 2, None, None, None] + steps[:, None, None]) * padded
            + (corner[:, 1, None, None, None] + steps[None, :, None])
        ) * padded + (corner[:, 0, None, None, None] + steps[None, None, :])
        volume.index_add_(0, flat.reshape(-1), block.reshape(-1))
    volume = volume.reshape(padded, padded, padded)
    return volume[window:-window, window:-window, window:-window].contiguous()
