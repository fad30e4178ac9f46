"""match-template on simulated micrographs with known particles, and on pure noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cryorefine.cli import app
from cryorefine.engine.peaks import expected_maximum
from cryorefine.engine.so3 import angular_distance, euler_to_matrix
from cryorefine.io.leopard import read_leopard_csv
from cryorefine.io.mrc import read_mrc, write_mrc
from cryorefine.io.star import read_star_particles, write_star_micrographs
from cryorefine.programs import match_template
from cryorefine.programs.template_config import MatchTemplateConfig, load_template_config
from cryorefine.simulate.micrograph import simulate_micrograph
from template_data import (
    PIXEL_SIZE,
    TEMPLATE_SIZE,
    match_config,
    template_volume,
    write_dataset,
    write_yaml,
)

runner = CliRunner()


def _run(folder: Path, config: dict, output: str = "particles.csv", *flags: str) -> pd.DataFrame:
    path = write_yaml(folder / "match.yaml", config)
    result = runner.invoke(
        app, ["match-template", "--config", str(path), "--output", str(folder / output), *flags]
    )
    assert result.exit_code == 0, result.output
    return read_leopard_csv(folder / output)


@pytest.fixture(scope="module")
def matched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("match")
    truth = write_dataset(folder, n_particles=5, snr=0.15, seed=2).particles
    found = _run(folder, match_config(folder))
    return folder, truth, found


def _pair(truth: pd.DataFrame, found: pd.DataFrame) -> list[tuple[int, int, float]]:
    """(truth row, found row, distance px) for each true particle's nearest pick."""
    pairs = []
    for i, row in truth.iterrows():
        distance = np.hypot(found["rlnCoordinateX"] - row["rlnCoordinateX"],
                            found["rlnCoordinateY"] - row["rlnCoordinateY"])  # fmt: skip
        j = int(np.argmin(distance))
        pairs.append((int(i), j, float(distance.iloc[j])))
    return pairs


def test_every_particle_is_found_within_a_pixel(matched: tuple) -> None:
    _, truth, found = matched
    pairs = _pair(truth, found)
    # Positions are continuous (off the pixel grid): the nearest pixel is ≤ 0.71 px away.
    assert all(distance <= 1.0 for _, _, distance in pairs), pairs
    assert len({j for _, j, _ in pairs}) == len(truth)
    # No more than the expected one false alarm besides the particles.
    assert len(found) <= len(truth) + 2


def test_orientations_are_within_the_search_step(matched: tuple) -> None:
    _, truth, found = matched
    for i, j, _ in _pair(truth, found):
        true = euler_to_matrix(
            *torch.tensor(
                truth.loc[i, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)
            ).unbind()
        )
        best = euler_to_matrix(
            *torch.tensor(
                found.loc[j, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)
            ).unbind()
        )
        # 15° grid: a view is within ~0.87 × step of a grid point; allow the step.
        assert float(angular_distance(true, best)) < 15.0


def test_maps_and_tables_agree(matched: tuple) -> None:
    folder, _, found = matched
    z, voxel = read_mrc(folder / "results/scaled_mip.mrc")
    mip, _ = read_mrc(folder / "results/mip.mrc")
    mean, _ = read_mrc(folder / "results/correlation_average.mrc")
    std, _ = read_mrc(folder / "results/correlation_variance.mrc")
    assert voxel == pytest.approx(PIXEL_SIZE)
    for _, row in found.iterrows():
        y, x = int(row["rlnCoordinateY"]), int(row["rlnCoordinateX"])
        assert row["crfZScore"] == pytest.approx(z[y, x], rel=1e-5)
        # The exported z-score is the recomputation (MIP − mean) / std from the maps.
        assert row["crfZScore"] == pytest.approx((mip[y, x] - mean[y, x]) / std[y, x], rel=1e-4)
    star = read_star_particles(folder / "particles.star")
    assert len(star) == len(found)
    np.testing.assert_allclose(star["crfZScore"], found["crfZScore"], rtol=1e-6)
    assert (folder / "particles.config.yaml").exists()


def test_noise_statistics_follow_the_gaussian_extreme_value_law(tmp_path: Path) -> None:
    """On pure noise the correlations are standard normal and the MIP is their maximum."""
    write_dataset(tmp_path, n_particles=1, snr=0.15, seed=5)
    noise = torch.randn(192, 192, generator=torch.Generator().manual_seed(9))
    write_mrc(tmp_path / "micrograph.mrc", noise, PIXEL_SIZE, overwrite=True)
    config = match_config(tmp_path)
    config["orientation_search_config"] = {"psi_step": 30.0, "theta_step": 30.0}
    config["defocus_search_config"] = {"enabled": False}
    found = _run(tmp_path, config)
    settings = load_template_config(MatchTemplateConfig, write_yaml(tmp_path / "m.yaml", config))
    n_search = settings.orientation_search_config.orientations().shape[0]
    mip, _ = read_mrc(tmp_path / "results/mip.mrc")
    mean, _ = read_mrc(tmp_path / "results/correlation_average.mrc")
    std, _ = read_mrc(tmp_path / "results/correlation_variance.mrc")
    inside = slice(TEMPLATE_SIZE // 2, 192 - TEMPLATE_SIZE // 2)
    mip, mean, std = mip[inside, inside], mean[inside, inside], std[inside, inside]
    # Pooled over pixels and views, the correlations have mean 0 and a variance near 1
    # (exactly 1 for a perfectly whitened micrograph; the whitening filter of a
    # 192² image is estimated from few Fourier samples near the origin).
    pooled_variance = float((std.astype(np.float64) ** 2).mean() + mean.var())
    assert abs(float(mean.mean())) < 0.1 and pooled_variance == pytest.approx(1.0, abs=0.15)
    # Per pixel, (MIP − mean) / std is the maximum of n_search standard normal
    # variables; neighbouring views correlate, so it falls a little below the
    # independent-trial expectation: within 10 %.
    z = (mip - mean) / std
    assert float(z.mean()) == pytest.approx(expected_maximum(n_search), rel=0.10)
    # Expected false alarms: 1 by default; Poisson(1) gives ≤ 4 with 99.6 %.
    assert len(found) <= 4


def test_batch_size_does_not_change_the_result(tmp_path: Path) -> None:
    write_dataset(tmp_path, shape=(128, 128), n_particles=1, snr=0.3, seed=3)
    config = match_config(tmp_path, orientation_batch_size=5)
    config["orientation_search_config"] = {"psi_step": 30.0, "theta_step": 30.0}
    small = _run(tmp_path, config, "small.csv")
    mip_small, _ = read_mrc(tmp_path / "results/mip.mrc")
    best_small, _ = read_mrc(tmp_path / "results/orientation_psi.mrc")
    config["orientation_batch_size"] = 64
    large = _run(tmp_path, config, "large.csv")
    mip_large, _ = read_mrc(tmp_path / "results/mip.mrc")
    best_large, _ = read_mrc(tmp_path / "results/orientation_psi.mrc")
    # Batched FFTs round differently: equal to float32 precision of the scores.
    np.testing.assert_allclose(mip_small, mip_large, atol=5e-4)
    assert (best_small == best_large).mean() > 0.999
    pd.testing.assert_frame_equal(
        small[["rlnCoordinateX", "rlnCoordinateY"]], large[["rlnCoordinateX", "rlnCoordinateY"]]
    )


def test_continue_after_a_kill_gives_identical_results(tmp_path: Path, monkeypatch) -> None:
    write_dataset(tmp_path, shape=(128, 128), n_particles=1, snr=0.3, seed=4)
    config = match_config(tmp_path, orientation_batch_size=8, checkpoint_every_seconds=1e-6)
    config["orientation_search_config"] = {"psi_step": 30.0, "theta_step": 30.0}
    full = _run(tmp_path, config, "full.csv")
    reference = {
        name: read_mrc(tmp_path / f"results/{name}.mrc")[0]
        for name in ("mip", "correlation_average", "correlation_variance")
    }

    original = match_template.search
    calls = {"n": 0}

    def killed(*args, **kwargs):
        on_batch = kwargs["on_batch"]

        def dying(next_batch, statistics):
            on_batch(next_batch, statistics)
            if next_batch == 3:
                raise KeyboardInterrupt

        kwargs["on_batch"] = dying
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(match_template, "search", killed)
    settings = load_template_config(
        MatchTemplateConfig, write_yaml(tmp_path / "match.yaml", config)
    )
    with pytest.raises(KeyboardInterrupt):
        match_template.run(settings, tmp_path / "resumed.csv")
    checkpoint = tmp_path / "results/mip.mrc.checkpoint.pt"
    assert checkpoint.exists()
    monkeypatch.setattr(match_template, "search", original)
    resumed = _run(tmp_path, config, "resumed.csv", "--continue")
    assert not checkpoint.exists()
    for name, values in reference.items():
        assert np.array_equal(read_mrc(tmp_path / f"results/{name}.mrc")[0], values), name
    pd.testing.assert_frame_equal(full, resumed)


def _fails(folder: Path, config: dict, *words: str) -> str:
    path = write_yaml(folder / "bad.yaml", config)
    output = folder / "bad.csv"
    result = runner.invoke(app, ["match-template", "--config", str(path), "--output", str(output)])
    assert result.exit_code == 2, result.output
    assert not output.exists()
    message = " ".join(result.output.split())
    for word in words:
        assert word in message, message
    return message


def test_bad_inputs_stop_before_compute_with_one_clear_message(tmp_path: Path) -> None:
    write_dataset(tmp_path, shape=(128, 128), n_particles=1, snr=0.3, seed=6)
    base = match_config(tmp_path)
    write_mrc(tmp_path / "flat.mrc", np.zeros((32, 64, 64), np.float32), 2.5, overwrite=True)
    _fails(tmp_path, {**base, "template_volume_path": "flat.mrc"}, "cubic", "template_volume_path")
    write_mrc(tmp_path / "coarse.mrc", np.zeros((64, 64, 64), np.float32), 3.0, overwrite=True)
    _fails(tmp_path, {**base, "template_volume_path": "coarse.mrc"}, "pixel size", "rebox")
    write_mrc(tmp_path / "small.mrc", np.zeros((48, 48), np.float32), 2.5, overwrite=True)
    _fails(tmp_path, {**base, "micrograph_path": "small.mrc"}, "smaller than the template")
    nan = np.random.default_rng(0).normal(size=(128, 128)).astype(np.float32)
    nan[5, 7] = np.nan
    write_mrc(tmp_path / "nan.mrc", nan, 2.5, overwrite=True)
    _fails(tmp_path, {**base, "micrograph_path": "nan.mrc"}, "NaN", "micrograph_path")
    _fails(tmp_path, {**base, "false_alarm_rate": 1.0}, "false_alarm_rate")
    # Nothing was written by any of them.
    assert not any((tmp_path / "results").iterdir())


def test_many_micrographs_from_a_star_file_with_their_own_ctf(tmp_path: Path) -> None:
    volume = template_volume()
    write_mrc(tmp_path / "template.mrc", volume, PIXEL_SIZE)
    rows, truths = [], []
    for index, defocus in enumerate((12000.0, 20000.0)):
        name = f"mics/mic_{index}.mrc"
        micrograph = simulate_micrograph(
            volume, PIXEL_SIZE, (160, 160), n_particles=1, snr=0.6, seed=30 + index,
            defocus_u_angstrom=defocus, invert_contrast=True, micrograph_name=name,
        )  # fmt: skip
        (tmp_path / "mics").mkdir(exist_ok=True)
        write_mrc(tmp_path / name, micrograph.image, PIXEL_SIZE)
        rows.append(micrograph.ctf)
        truths.append(micrograph.particles)
    write_star_micrographs(tmp_path / "micrographs.star", pd.concat(rows, ignore_index=True))
    config = match_config(tmp_path, micrographs_star="micrographs.star")
    del config["micrograph_path"], config["optics_group"]
    config["defocus_search_config"] = {"enabled": False}
    found = _run(tmp_path, config)
    for index, truth in enumerate(truths):
        name = f"mics/mic_{index}.mrc"
        assert (tmp_path / f"results/mic_{index}_mip.mrc").exists()
        picks = found[found["rlnMicrographName"] == name]
        best = picks.sort_values("crfZScore").iloc[-1]
        distance = np.hypot(best["rlnCoordinateX"] - truth["rlnCoordinateX"].iloc[0],
                            best["rlnCoordinateY"] - truth["rlnCoordinateY"].iloc[0])  # fmt: skip
        # One particle per small micrograph, searched on a 15° grid: its peak may sit a
        # pixel or two off when the nearest grid view is far (refine-template fixes
        # that); the detection test above holds ≤ 1 px on larger micrographs.
        assert distance <= 3.0
        # Each particle carries its own micrograph's CTF from the STAR file.
        assert best["rlnDefocusU"] == pytest.approx(rows[index]["rlnDefocusU"].iloc[0])


def test_a_bad_micrograph_in_a_star_stops_the_run_before_any_search(tmp_path: Path) -> None:
    write_mrc(tmp_path / "template.mrc", template_volume(), PIXEL_SIZE)
    rows = []
    for index in range(2):
        name = f"mic_{index}.mrc"
        image = np.random.default_rng(index).normal(size=(128, 128)).astype(np.float32)
        if index == 1:
            image[3, 4] = np.nan
        write_mrc(tmp_path / name, image, PIXEL_SIZE)
        rows.append(
            {"rlnMicrographName": name, "rlnDefocusU": 15000.0, "rlnDefocusV": 15000.0,
             "rlnDefocusAngle": 0.0, "rlnVoltage": 300.0, "rlnSphericalAberration": 2.7,
             "rlnAmplitudeContrast": 0.07, "rlnMicrographPixelSize": PIXEL_SIZE}
        )  # fmt: skip
    write_star_micrographs(tmp_path / "micrographs.star", pd.DataFrame(rows))
    config = match_config(tmp_path, micrographs_star="micrographs.star")
    del config["micrograph_path"], config["optics_group"]
    _fails(tmp_path, config, "NaN", "mic_1.mrc")
    assert not any((tmp_path / "results").iterdir())
