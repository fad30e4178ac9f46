"""optimize-template recovers the true pixel size of a simulated micrograph."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cryorefine.cli import app
from cryorefine.simulate.atoms import builtin_structure_path
from template_data import PIXEL_SIZE, TEMPLATE_SIZE, write_dataset, write_true_particles, write_yaml


def test_the_true_pixel_size_gives_the_highest_mean_snr(tmp_path: Path) -> None:
    micrograph = write_dataset(tmp_path, n_particles=4, snr=0.3, seed=11)
    # The true poses, positions and defoci: the search is over pixel size only.
    write_true_particles(tmp_path, micrograph.particles)
    config = {
        "particle_stack": {
            "df_path": "particles.csv",
            "extracted_box_size": [TEMPLATE_SIZE + 8, TEMPLATE_SIZE + 8],
            "original_template_size": [TEMPLATE_SIZE, TEMPLATE_SIZE],
        },
        # Nominal 2.4 Å: 4 % off the truth (2.5 Å).
        "pixel_size_coarse_search": {
            "enabled": True,
            "pixel_size_min": -0.2,
            "pixel_size_max": 0.3,
            "pixel_size_step": 0.1,
        },
        "pixel_size_fine_search": {
            "enabled": True,
            "pixel_size_min": -0.05,
            "pixel_size_max": 0.05,
            "pixel_size_step": 0.025,
        },
        "preprocessing_filters": {"whitening_filter": {"enabled": True}},
        "computational_config": {"gpu_ids": "cpu", "num_cpus": 1},
        "simulator": {
            "pixel_spacing": 2.4,
            "volume_shape": [TEMPLATE_SIZE] * 3,
            "pdb_filepath": str(builtin_structure_path()),
            "simulator_config": {},
        },
    }
    path = write_yaml(tmp_path / "optimize.yaml", config)
    result = CliRunner().invoke(
        app,
        ["optimize-template", "--config", str(path), "--output", str(tmp_path / "optimize.csv")],
    )
    assert result.exit_code == 0, result.output
    report = yaml.safe_load((tmp_path / "optimize.report.yaml").read_text())
    table = pd.read_csv(tmp_path / "optimize.csv")
    assert report["best_pixel_size_angstrom"] == pytest.approx(PIXEL_SIZE, abs=0.026), table
    # The SNR falls off on both sides of the optimum.
    coarse = table[table["stage"] == "coarse"].set_index("pixel_size")["mean_snr"]
    assert coarse.idxmax() == pytest.approx(PIXEL_SIZE, abs=0.05)
    assert coarse.iloc[0] < coarse.max() and coarse.iloc[-1] < coarse.max()
