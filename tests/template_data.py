"""Small simulated 2DTM datasets with known truth, and Leopard-EM-style YAMLs for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from cryorefine.io.mrc import write_mrc
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
    """A Leopard-EM match_template YAML (as a dict) for `write_dataset`'s files."""
    config: dict[str, Any] = {
        "template_volume_path": "template.mrc",
        "micrograph_path": "micrograph.mrc",
        "match_template_result": {
            "allow_file_overwrite": True,
            **{
                f"{name}_path": f"results/{name}.mrc"
                for name in (
                    "mip",
                    "scaled_mip",
                    "correlation_average",
                    "correlation_variance",
                    "orientation_psi",
                    "orientation_theta",
                    "orientation_phi",
                    "relative_defocus",
                )
            },
        },
        "optics_group": {
            "label": "simulated",
            "pixel_size": PIXEL_SIZE,
            "voltage": 300.0,
            "spherical_aberration": 2.7,
            "amplitude_contrast_ratio": 0.07,
            "phase_shift": 0.0,
            "defocus_u": DEFOCUS,
            "defocus_v": DEFOCUS,
            "astigmatism_angle": 0.0,
            "ctf_B_factor": 0.0,
        },
        "defocus_search_config": {
            "enabled": True,
            "defocus_min": -600.0,
            "defocus_max": 600.0,
            "defocus_step": 600.0,
        },
        "orientation_search_config": {"psi_step": 15.0, "theta_step": 15.0},
        "preprocessing_filters": {"whitening_filter": {"enabled": True}},
        "computational_config": {"gpu_ids": "cpu", "num_cpus": 1},
    }
    for key, value in changes.items():
        config[key] = value
    (folder / "results").mkdir(exist_ok=True)
    return config


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
