"""`cryorefine demo` end to end on a small micrograph: it finds and refines real particles."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cryorefine.cli import app
from cryorefine.programs.demo import DemoConfig, run


def test_demo_finds_and_refines_the_simulated_particles(tmp_path: Path) -> None:
    config = DemoConfig(
        output=tmp_path / "demo", micrograph_size=256, n_particles=3, snr=0.4, seed=3
    )
    result = run(config)
    found = result.summary[result.summary["found"]]
    assert len(found) >= 2
    assert found["position_error_px"].max() <= 1.0
    # Refinement (±9°, 1.5° lattice) beats the 15° global grid: all within half a step,
    # typically within 2°.
    assert found["refined_angle_error_deg"].max() < 7.5
    assert found["refined_angle_error_deg"].median() < 3.0
    assert (found["refined_angle_error_deg"] < found["search_angle_error_deg"]).all()
    for name in ("match.yaml", "refine.yaml", "particles.csv", "refined.csv", "summary.csv"):
        assert (tmp_path / "demo" / name).exists()


def test_demo_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "--output", str(tmp_path)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "keep.txt").read_text() == "mine"
