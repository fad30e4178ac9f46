"""Elastic electron scattering factors of neutral atoms: Peng et al. (1996) five Gaussians.

fe(s) = sum_i a_i exp(-b_i s²), with s = sin(θ)/λ = |q|/2 (q the spatial frequency in
1/Å), a_i in Å and b_i in Å² (Peng, Ren, Dudarev & Whelan 1996, Acta Cryst. A52,
257-276, Table 1, fit range 0 <= s <= 2 Å⁻¹). The same table is International Tables
for Crystallography Vol. C, Table 4.3.2.2; gemmi ships it as `Element.c4322`, and that
is the table used here for every element. `PENG1996_REFERENCE` repeats a few rows from
the paper so that a test notices if gemmi's table ever changes.

The potential of an atom is V(r) = (h² / (2π m₀ e)) · ∫ fe(|q|/2) exp(2πi q·r) d³q,
i.e. (h² / (2π m₀ e)) · sum_i a_i (4π / b_i)^{3/2} exp(-4π² r² / b_i), in volts when
fe is in Å and r in Å; an isotropic B-factor adds B to every b_i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gemmi
import torch

from cryorefine.errors import CryorefineError

PLANCK_J_S = 6.62607015e-34
ELECTRON_MASS_KG = 9.1093837015e-31
ELEMENTARY_CHARGE_C = 1.602176634e-19

# h² / (2π m₀ e) in V·Å²: turns the scattering factor (Å) into the potential (V·Å³).
POTENTIAL_PREFACTOR_VOLT_ANGSTROM2 = (
    PLANCK_J_S**2 / (2.0 * math.pi * ELECTRON_MASS_KG * ELEMENTARY_CHARGE_C) * 1e20
)

# Peng et al. (1996) Table 1 (elastic, 0-2 Å⁻¹): element -> ((a1..a5) Å, (b1..b5) Å²).
PENG1996_REFERENCE: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "H": ((0.0349, 0.1201, 0.1970, 0.0573, 0.1195), (0.5347, 3.5867, 12.3471, 18.9525, 38.6269)),
    "C": ((0.0893, 0.2563, 0.7570, 1.0487, 0.3575), (0.2465, 1.7100, 6.4094, 18.6113, 50.2523)),
    "N": ((0.1022, 0.3219, 0.7982, 0.8197, 0.1715), (0.2451, 1.7481, 6.1925, 17.3894, 48.1431)),
    "O": ((0.0974, 0.2921, 0.6910, 0.6990, 0.2039), (0.2067, 1.3815, 4.6943, 12.7105, 32.4726)),
    "P": ((0.2548, 0.6106, 1.4541, 2.3204, 0.8477), (0.2908, 1.8740, 8.5176, 24.3434, 63.2996)),
    "S": ((0.2497, 0.5628, 1.3899, 2.1865, 0.7715), (0.2681, 1.6711, 7.0267, 19.5377, 50.3888)),
}


def scattering_coefficients(
    elements: Sequence[str],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Peng (1996) five-Gaussian coefficients of each atom's element.

    Args:
        elements: n element symbols as in PDB/mmCIF ("C", "FE", "Zn", "D" = hydrogen).

    Returns:
        a: (n, 5) amplitudes in Å; b: (n, 5) widths in Å².

    Raises:
        CryorefineError: for a symbol that names no element.
    """
    table: dict[str, tuple[list[float], list[float]]] = {}
    for symbol in set(elements):
        element = gemmi.Element(symbol)
        if element.atomic_number == 0:
            raise CryorefineError(
                f"unknown element symbol {symbol!r} in the atomic model.",
                fix="give every atom a chemical element (PDB columns 77-78).",
            )
        table[symbol] = (list(element.c4322.a), list(element.c4322.b))
    a = torch.tensor([table[s][0] for s in elements], dtype=dtype, device=device)
    b = torch.tensor([table[s][1] for s in elements], dtype=dtype, device=device)
    return a.reshape(-1, 5), b.reshape(-1, 5)


def electron_scattering_factor(
    s_per_angstrom: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """fe(s) = sum_i a_i exp(-b_i s²) in Å.

    Args:
        s_per_angstrom: (...) s = sin(θ)/λ = |q|/2 in 1/Å.
        a, b: (5,) coefficients of one element (Å, Å²).

    Returns:
        (...) scattering factor in Å.
    """
    s2 = s_per_angstrom.unsqueeze(-1) ** 2
    return (a * torch.exp(-b * s2)).sum(dim=-1)
