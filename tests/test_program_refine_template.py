"""refine-template on match-template's picks of a simulated micrograph with known truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cryorefine.cli import app
from cryorefine.engine.so3 import angular_distance, euler_to_matrix
from cryorefine.io.leopard import read_leopard_csv
from cryorefine.io.mrc import write_mrc
from cryorefine.programs.demo import leopard_refine_yaml
from cryorefine.simulate.atoms import (
    builtin_structure_path,
    potential_from_atoms,
    read_atomic_model,
)
from cryorefine.simulate.micrograph import simulate_micrograph
from template_data import (
    DEFOCUS,
    PIXEL_SIZE,
    TEMPLATE_SIZE,
    match_config,
    template_volume,
    write_dataset,
    write_true_particles,
    write_yaml,
)

runner = CliRunner()


def _refine(folder: Path, config: dict) -> pd.DataFrame:
    """Run `cryorefine refine-template` on a config in `folder`; its refined table."""
    path = write_yaml(folder / "refine.yaml", config)
    out = folder / "refined.csv"
    result = runner.invoke(app, ["refine-template", "--config", str(path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    return read_leopard_csv(out)


def _matrices(table: pd.DataFrame, columns: list[str]) -> torch.Tensor:
    angles = torch.tensor(table[columns].to_numpy(float))
    return euler_to_matrix(*angles.unbind(-1))


@pytest.fixture(scope="module")
def refined(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("refine")
    truth = write_dataset(folder, n_particles=4, snr=0.2, seed=7).particles
    match = write_yaml(folder / "match.yaml", match_config(folder))
    result = runner.invoke(
        app, ["match-template", "--config", str(match), "--output", str(folder / "found.csv")]
    )
    assert result.exit_code == 0, result.output
    refine = leopard_refine_yaml(
        "found.csv",
        TEMPLATE_SIZE,
        96,
        defocus={"defocus_min": -900, "defocus_max": 900, "defocus_step": 100},
        orientation={
            "theta_step_coarse": 9.0,
            "theta_step_fine": 1.5,
            "psi_step_coarse": 9.0,
            "psi_step_fine": 1.5,
        },
    )
    refined = _refine(folder, refine)
    return truth, read_leopard_csv(folder / "found.csv"), refined


def _nearest(truth: pd.DataFrame, table: pd.DataFrame, x: str, y: str) -> list[int]:
    return [
        int(np.argmin(np.hypot(table[x] - row["rlnCoordinateX"], table[y] - row["rlnCoordinateY"])))
        for _, row in truth.iterrows()
    ]


def test_refined_orientations_beat_the_search_step(refined) -> None:
    truth, _, table = refined
    rows = _nearest(truth, table, "crfRefinedCoordinateX", "crfRefinedCoordinateY")
    true = _matrices(truth, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    before = _matrices(table.iloc[rows], ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    after = _matrices(
        table.iloc[rows], ["crfRefinedAngleRot", "crfRefinedAngleTilt", "crfRefinedAnglePsi"]
    )
    error_before = angular_distance(true, before)
    error_after = angular_distance(true, after)
    # The global search used 15° steps; refined to 1.5° steps the error is a few degrees.
    assert float(error_after.max()) < 4.0, (error_before, error_after)
    assert float(error_after.mean()) < float(error_before.mean())


def test_refined_defocus_and_position_match_the_truth(refined) -> None:
    truth, _, table = refined
    rows = _nearest(truth, table, "crfRefinedCoordinateX", "crfRefinedCoordinateY")
    chosen = table.iloc[rows].reset_index(drop=True)
    true_relative = truth["crfRelativeDefocus"].to_numpy()
    # Refinement step 100 Å. At 2.5 Å/px and SNR 0.2 (z ≈ 7) the defocus precision is
    # about ±150 Å (noise, not bias: see the noise-free test below), so errors of one
    # or two steps are the data's limit here, not the program's.
    error = np.abs(chosen["crfRefinedRelativeDefocus"].to_numpy() - true_relative)
    assert error.max() <= 250.0 and error.mean() <= 150.0
    dx = chosen["crfRefinedCoordinateX"] - truth["rlnCoordinateX"].to_numpy()
    dy = chosen["crfRefinedCoordinateY"] - truth["rlnCoordinateY"].to_numpy()
    distance = np.hypot(dx, dy)
    assert distance.max() <= 1.0


def test_refined_z_score_is_normalised_by_the_search_statistics(refined) -> None:
    _, _, table = refined
    # z = (refined score − mean) / std with the search's own mean/std at that pixel: it
    # can only grow with the score (no division by √std, as Leopard-EM 1.3.0 does).
    assert (table["crfRefinedMip"] >= table["crfMip"] - 0.3).all()
    assert (table["crfRefinedZScore"] >= table["crfZScore"] - 0.3).all()


def test_pixel_size_refinement_finds_the_true_sampling(tmp_path: Path) -> None:
    """Data recorded at 2.56 Å/px while the header and template say 2.5: refine finds +0.06."""

    true_pixel = 2.56
    model = read_atomic_model(builtin_structure_path())
    physical = potential_from_atoms(model, TEMPLATE_SIZE, true_pixel)
    micrograph = simulate_micrograph(
        physical, true_pixel, (256, 256), n_particles=4, snr=1.0, defocus_u_angstrom=DEFOCUS,
        invert_contrast=True, min_distance_px=1.2 * TEMPLATE_SIZE, seed=21,
    )  # fmt: skip
    write_mrc(tmp_path / "micrograph.mrc", micrograph.image, PIXEL_SIZE)
    write_mrc(tmp_path / "template.mrc", template_volume(), PIXEL_SIZE)
    write_true_particles(tmp_path, micrograph.particles)
    pixel_size = {"pixel_size_min": -0.1, "pixel_size_max": 0.15, "pixel_size_step": 0.02}
    config = leopard_refine_yaml(
        "particles.csv", TEMPLATE_SIZE, TEMPLATE_SIZE + 16, pixel_size=pixel_size
    )
    refined = _refine(tmp_path, config)
    # The median over particles is within one step (0.02 Å) of the truth.
    assert float(refined["crfRefinedPixelSize"].median()) == pytest.approx(true_pixel, abs=0.021)


def test_defocus_refinement_is_unbiased_without_noise(tmp_path: Path) -> None:
    """Noise-free particles at their true poses: every defocus comes back exactly (50 Å grid).

    With noise the error is noise, not bias: the same noise pattern at SNR 0.2, 0.6 and 2
    gave errors of 150, 100 and 50 Å (shrinking as 1/√SNR).
    """
    micrograph = write_dataset(tmp_path, n_particles=3, snr=None, seed=8)
    # Start 300 Å off the truth.
    start = micrograph.particles.assign(crfRelativeDefocus=300.0)
    start["rlnDefocusU"] += 300.0
    start["rlnDefocusV"] += 300.0
    write_true_particles(tmp_path, start)
    defocus = {"defocus_min": -500.0, "defocus_max": 500.0, "defocus_step": 50.0}
    config = leopard_refine_yaml("particles.csv", TEMPLATE_SIZE, TEMPLATE_SIZE + 16, defocus)
    refined = _refine(tmp_path, config)
    np.testing.assert_array_equal(refined["crfRefinedRelativeDefocus"].to_numpy(), 0.0)


def test_leopard_valid_crops_are_laid_back_at_the_particle_centres(tmp_path: Path) -> None:
    """Leopard-EM's maps are (H − D + 1)² crops indexed by the top-left corner."""
    from cryorefine.programs.refine_template import _map

    full = np.zeros((40, 50), np.float32)
    full[10:31, 10:41] = np.arange(21 * 31, dtype=np.float32).reshape(21, 31) + 1
    write_mrc(tmp_path / "ours.mrc", full, 1.0)
    write_mrc(tmp_path / "leopard.mrc", full[10:31, 10:41], 1.0)  # D = 20: crop from D // 2
    for name in ("ours.mrc", "leopard.mrc"):
        table = pd.DataFrame({"crfCorrelationStdMapName": [str(tmp_path / name)]})
        restored = _map(table, "crfCorrelationStdMapName", table.index, (40, 50), 20)
        assert restored is not None
        np.testing.assert_array_equal(restored.numpy(), full)
