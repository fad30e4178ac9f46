"""Small simulated 2DTM datasets with known truth, and Leopard-EM-style YAMLs for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from cryorefine.io.leopard import write_leopard_csv
from cryorefine.io.mrc import write_mrc
from cryorefine.programs.demo import leopard_match_yaml
from cryorefine.simulate.atoms import (
    builtin_structure_path,
    potential_from_atoms,
    read_atomic_model,
)
from cryorefine.simulate.micrograph import Micrograph, simulate_micrograph

PIXEL_SIZE = 2.5
TEMPLATE_SIZE = 64
DEFOCUS = 15000.0


def template_volume() -> torch.Tensor:
    """The built-in structure (4JSV) at 2.5 Å/px in a 64³ box."""
    return potential_from_atoms(
        read_atomic_model(builtin_structure_path()), TEMPLATE_SIZE, PIXEL_SIZE
    )


def write_dataset(
    folder: Path,
    shape: tuple[int, int] = (256, 256),
    n_particles: int = 4,
    snr: float | None = 0.15,
    seed: int = 0,
    defocus_offsets: torch.Tensor | None = None,
) -> Micrograph:
    """template.mrc and micrograph.mrc (dark particles, as recorded) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = template_volume()
    write_mrc(folder / "template.mrc", volume, PIXEL_SIZE, overwrite=True)
    micrograph = simulate_micrograph(
        volume,
        PIXEL_SIZE,
        shape,
        n_particles=n_particles,
        snr=snr,
        defocus_u_angstrom=DEFOCUS,
        defocus_offsets_angstrom=defocus_offsets,
        invert_contrast=True,
        min_distance_px=TEMPLATE_SIZE * 1.2,
        seed=seed,
    )
    write_mrc(folder / "micrograph.mrc", micrograph.image, PIXEL_SIZE, overwrite=True)
    return micrograph


def match_config(folder: Path, **changes: Any) -> dict[str, Any]:
    """A Leopard-EM match_template YAML (as a dict) for `write_dataset`'s files.

    15° steps, defocus planes −600/0/+600 Å, maps in folder/results; `changes`
    replace top-level keys.
    """
    config = leopard_match_yaml(PIXEL_SIZE, DEFOCUS, 15.0, "results", overwrite=True)
    config.update(changes)
    (folder / "results").mkdir(exist_ok=True)
    return config


def write_true_particles(folder: Path, particles: pd.DataFrame) -> Path:
    """folder/particles.csv: the true particles of micrograph.mrc, centres on whole pixels."""
    table = particles.assign(
        rlnMicrographName="micrograph.mrc",
        rlnMicrographPixelSize=PIXEL_SIZE,
        rlnCoordinateX=particles["rlnCoordinateX"].round(),
        rlnCoordinateY=particles["rlnCoordinateY"].round(),
    )
    return write_leopard_csv(folder / "particles.csv", table, template_size=TEMPLATE_SIZE)


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
