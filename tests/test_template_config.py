"""Leopard-EM 1.3.0 configs load unchanged; their search grids and filters match the truth."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from cryorefine.config import save_resolved_config
from cryorefine.engine.filters import radial_power_spectrum, radial_shell_mean, whitening_filter
from cryorefine.engine.fourier import radial_frequency
from cryorefine.engine.so3 import euler_to_matrix
from cryorefine.engine.so3_grid import distance_to_grid, global_orientation_grid
from cryorefine.engine.symmetry import symmetry_operators
from cryorefine.errors import CryorefineError
from cryorefine.programs import template_config as tc
from cryorefine.programs.template_config import (
    ArbitraryCurveFilterConfig,
    BandpassFilterConfig,
    ComputationalConfigMatch,
    ComputationalConfigRefine,
    DefocusSearchConfig,
    MatchTemplateConfig,
    MovieConfig,
    MultipleOrientationConfig,
    OptimizeTemplateConfig,
    OrientationSearchConfig,
    PixelSizeSearchConfig,
    PreprocessingFilters,
    RefineOrientationConfig,
    RefineTemplateConfig,
    WhiteningFilterConfig,
    load_template_config,
)
from cryorefine.simulate.noise import coloured_noise, power_law_spectrum, seeded_generator

# ----------------------------------------------------------------------------- fixtures

# Source: github.com/Lucaslab-Berkeley/Leopard-EM,
# programs/match_template/match_template_example_config.yaml (commit fe84c35a55a1).
LEOPARD_MATCH_EXAMPLE = """\
##################################################
### MatchTemplateManager configuration example ###
##################################################
# An example YAML configuration to modify.
# Call `MatchTemplateManager.from_yaml(path)` to load this configuration.
template_volume_path: /some/path/to/template.mrc
micrograph_path:      /some/path/to/micrograph.mrc
match_template_result:
  allow_file_overwrite: true
  mip_path:                   /some/path/to/output_mip.mrc
  scaled_mip_path:            /some/path/to/output_scaled_mip.mrc
  orientation_psi_path:       /some/path/to/output_orientation_psi.mrc
  orientation_theta_path:     /some/path/to/output_orientation_theta.mrc
  orientation_phi_path:       /some/path/to/output_orientation_phi.mrc
  relative_defocus_path:      /some/path/to/output_relative_defocus.mrc
  correlation_average_path:   /some/path/to/output_correlation_average.mrc
  correlation_variance_path:  /some/path/to/output_correlation_variance.mrc
optics_group:
  label: some_label
  voltage: 300.0
  pixel_size: 1.06   # in Angstroms
  defocus_u: 5200.0  # in Angstroms
  defocus_v: 4950.0  # in Angstroms
  astigmatism_angle: 25.0  # in degrees
  spherical_aberration: 2.7  # in millimeters
  amplitude_contrast_ratio: 0.07
  phase_shift: 0.0
  ctf_B_factor: 60.0  # in Angstroms^2
defocus_search_config:
  defocus_max:  1200.0  # in Angstroms, relative to the defocus_u and defocus_v values
  defocus_min: -1200.0  # in Angstroms, relative to the defocus_u and defocus_v values
  defocus_step: 200.0   # in Angstroms
  enabled: true
orientation_search_config:
  base_grid_method: uniform
  psi_step: 1.5      # in degrees
  theta_step: 2.5  # in degrees
  symmetry: C1 
preprocessing_filters:
  whitening_filter:
    enabled: true
    do_power_spectrum: true
    max_freq: 0.5  # In terms of Nyquist frequency
    num_freq_bins: null
  bandpass_filter:
    enabled: false
    falloff: null
    high_freq_cutoff: null  # Both in terms of Nyquist frequency (e.g. low-pass to 3 Å @ 1.06 Å/px would be high_freq_cutoff=0.353)
    low_freq_cutoff: null
computational_config:
  gpu_ids:
  - 0
  num_cpus: 1
"""  # noqa: E501, W291

# Source: github.com/Lucaslab-Berkeley/Leopard-EM,
# programs/refine_template/refine_template_example_config.yaml (commit 5f683ed843ad).
LEOPARD_REFINE_EXAMPLE = """\
###################################################
### RefineTemplateManager configuration example ###
###################################################
# An example YAML configuration to modify.
# Call `RefineTemplateManager.from_yaml(path)` to load this configuration.
template_volume_path: /some/path/to/template.mrc
particle_stack:
  df_path: /some/path/to/particles.csv  # Needs to be readable by pandas
  extracted_box_size: [528, 528]
  original_template_size: [512, 512]
defocus_refinement_config:
  enabled: true
  defocus_max:  100.0  # in Angstroms, relative to "best" defocus value in particle stack dataframe
  defocus_min: -100.0  # in Angstroms, relative to "best" defocus value in particle stack dataframe
  defocus_step: 20.0   # in Angstroms
orientation_refinement_config:
  enabled: true
  psi_step_coarse:   1.5   # in degrees
  psi_step_fine:     0.15  # in degrees
  theta_step_coarse: 2.5   # in degrees
  theta_step_fine:   0.25  # in degrees
pixel_size_refinement_config:
  enabled: false
  pixel_size_min: -0.005
  pixel_size_max:  0.005
  pixel_size_step: 0.001
preprocessing_filters:
  whitening_filter:
    do_power_spectrum: true
    enabled: true
    max_freq: 0.5  # In terms of Nyquist frequency
    num_freq_bins: null
  bandpass_filter:
    enabled: false
    falloff: null
    high_freq_cutoff: null
    low_freq_cutoff: null
computational_config:
  gpu_ids: 0
  num_cpus: 1
apply_global_filtering: true
movie_config:
  enabled: false
  movie_path: path/to//aligned_movie.mrc
  deformation_field_path: path/to/deformation_field.csv
  pre_exposure: 0.0
  fluence_per_frame: 1.0"""

# Source: github.com/Lucaslab-Berkeley/Leopard-EM, docs/tutorials/match_template_intro.md
# (match_template_config_crop_intro.yaml; relative paths, no symmetry key).
TUTORIAL_MATCH = """\
micrograph_path: xenon_131_000_0.0_DWS_cropped_4.mrc
template_volume_path: 60S_map_px0.95_bscale0.5_intro.mrc
computational_config:
  gpu_ids: "all"  # Use all available GPUs
  num_cpus: 4     # 4 CPUs per GPU
defocus_search_config:
  enabled: true
  defocus_max: 1200.0
  defocus_min: -1200.0
  defocus_step: 200.0
match_template_result:
  allow_file_overwrite: true
  correlation_average_path:  cropped_correlation_average_intro.mrc
  correlation_variance_path: cropped_correlation_variance_intro.mrc
  mip_path:                  cropped_mip_intro.mrc
  orientation_phi_path:      cropped_orientation_phi_intro.mrc
  orientation_psi_path:      cropped_orientation_psi_intro.mrc
  orientation_theta_path:    cropped_orientation_theta_intro.mrc
  relative_defocus_path:     cropped_relative_defocus_intro.mrc
  scaled_mip_path:           cropped_scaled_mip_intro.mrc
optics_group:
  label: micrograph_1
  amplitude_contrast_ratio: 0.07
  ctf_B_factor: 0.0
  astigmatism_angle: 39.417260
  defocus_u: 5978.758301
  defocus_v: 5617.462402
  phase_shift: 0.0
  pixel_size: 0.95
  spherical_aberration: 2.7
  voltage: 300.0
orientation_search_config:
  base_grid_method: uniform
  psi_step: 1.5    # in degrees
  theta_step: 2.5  # in degrees
preprocessing_filters:
  whitening_filter:
    enabled: true
    do_power_spectrum: true
    max_freq: 1.0
"""

# Source: as above (refine_template_config_60S_intro.yaml; no movie_config).
TUTORIAL_REFINE = """\
template_volume_path: 60S_map_px0.936_bscale0.5_intro.mrc
particle_stack:
  df_path: results_match_template_60S_intro.csv
  extracted_box_size: [518, 518]
  original_template_size: [512, 512]
defocus_refinement_config:
  enabled: true

  defocus_max:  100.0  # in Angstroms, relative to "best" particle defocus value
  defocus_min: -100.0  # in Angstroms, relative to "best" particle defocus value
  defocus_step: 20.0   # in Angstroms
orientation_refinement_config:
  enabled: true
  psi_step_coarse:     1.5  # in degrees
  psi_step_fine:       0.1  # in degrees
  theta_step_coarse:   2.5  # in degrees
  theta_step_fine:     0.1  # in degrees
pixel_size_refinement_config:
  enabled: false
preprocessing_filters:
  whitening_filter:
    do_power_spectrum: true
    enabled: true
    max_freq: 1.0
    num_freq_bins: null
computational_config:
  gpu_ids: "all"
  num_cpus: 1  # 1 CPU per GPU
"""

# Source: as above (optimize_template_config_intro.yaml).
TUTORIAL_OPTIMIZE = """\
particle_stack:
  df_path: results_match_template_crop_intro.csv
  extracted_box_size: [528, 528]
  original_template_size: [512, 512]
pixel_size_coarse_search:
  enabled: true
  pixel_size_min: -0.05
  pixel_size_max: 0.05
  pixel_size_step: 0.01
pixel_size_fine_search:
  enabled: true
  pixel_size_min: -0.008
  pixel_size_max: 0.008
  pixel_size_step: 0.001
preprocessing_filters:
  whitening_filter:
    do_power_spectrum: true
    enabled: true
    max_freq: 1.0
    num_freq_bins: null
computational_config:
  gpu_ids: 0
  num_cpus: 2
simulator:
  simulator_config:
    voltage: 300.0
    apply_dose_weighting: true
    dose_start: 0.0
    dose_end: 50.0
    dose_filter_modify_signal: "rel_diff"
    upsampling: -1  
    mtf_reference: "falcon4EC_300kv"
  pdb_filepath: "60S_aligned.pdb"
  volume_shape: [512, 512, 512]
  b_factor_scaling: 0.5
  additional_b_factor: 0
  pixel_spacing: 0.95
  center_atoms: true
  remove_hydrogens: true
"""  # noqa: W291


def _write(folder: Path, text: str, inputs: tuple[str, ...], name: str = "job.yaml") -> Path:
    """The config in `folder`, with empty files standing in for its inputs."""
    folder.mkdir(parents=True, exist_ok=True)
    for relative in inputs:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(b"")
    path = folder / name
    path.write_text(text)
    return path


def _leopard_example(text: str, folder: Path) -> str:
    """Leopard-EM's example with its placeholder folder pointed at `folder`."""
    return text.replace("/some/path/to", str(folder))


def _match_values(folder: Path) -> dict[str, Any]:
    """A valid match-template mapping (the Leopard-EM example) with inputs in `folder`."""
    values: dict[str, Any] = yaml.safe_load(_leopard_example(LEOPARD_MATCH_EXAMPLE, folder))
    for name in ("template.mrc", "micrograph.mrc"):
        (folder / name).write_bytes(b"")
    return values


def _load(model: Any, folder: Path, values: dict[str, Any]) -> Any:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(values))
    return load_template_config(model, path)


# ----------------------------------------------------------------------------- loading


def test_leopard_match_example_loads_unchanged(tmp_path: Path) -> None:
    text = _leopard_example(LEOPARD_MATCH_EXAMPLE, tmp_path)
    path = _write(tmp_path, text, ("template.mrc", "micrograph.mrc"))
    config = load_template_config(MatchTemplateConfig, path)
    assert config.micrograph_path == tmp_path / "micrograph.mrc"
    assert config.optics_group is not None
    assert config.optics_group.pixel_size == 1.06
    assert config.optics_group.ctf_B_factor == 60.0
    assert config.match_template_result.mip_path == tmp_path / "output_mip.mrc"
    assert config.match_template_result.allow_file_overwrite
    assert isinstance(config.orientation_search_config, OrientationSearchConfig)
    assert config.orientation_search_config.theta_step == 2.5
    assert config.computational_config.gpu_ids == [0]
    assert config.defocus_search_config.defocus_values().tolist() == [
        float(v) for v in range(-1200, 1201, 200)
    ]
    # cryorefine's extensions take their defaults.
    assert config.false_alarms_per_micrograph == 1.0
    assert config.micrographs_star is None
    assert config.checkpoint_every_seconds == 60.0
    assert config.particle_contrast == "dark"


def test_leopard_refine_example_loads_unchanged(tmp_path: Path) -> None:
    text = _leopard_example(LEOPARD_REFINE_EXAMPLE, tmp_path)
    path = _write(tmp_path, text, ("template.mrc", "particles.csv"))
    config = load_template_config(RefineTemplateConfig, path)
    assert config.particle_stack.df_path == tmp_path / "particles.csv"
    assert config.particle_stack.extracted_box_size == (528, 528)
    assert config.computational_config.gpu_ids == 0
    assert config.computational_config.backend == "batched"
    assert not config.pixel_size_refinement_config.enabled
    assert config.pixel_size_refinement_config.pixel_size_values().tolist() == [0.0]
    assert config.defocus_refinement_config.defocus_values().tolist() == [
        float(v) for v in range(-100, 101, 20)
    ]
    assert config.orientation_refinement_config.psi_step_fine == 0.15
    assert not config.movie_config.enabled
    assert config.particle_contrast == "dark"


def test_leopard_tutorial_configs_load_unchanged_with_relative_paths(tmp_path: Path) -> None:
    match_path = _write(
        tmp_path,
        TUTORIAL_MATCH,
        ("xenon_131_000_0.0_DWS_cropped_4.mrc", "60S_map_px0.95_bscale0.5_intro.mrc"),
        "match.yaml",
    )
    match = load_template_config(MatchTemplateConfig, match_path)
    assert match.template_volume_path == tmp_path / "60S_map_px0.95_bscale0.5_intro.mrc"
    assert match.match_template_result.scaled_mip_path == tmp_path / "cropped_scaled_mip_intro.mrc"
    assert match.orientation_search_config.symmetry == "C1"  # Leopard-EM's default
    assert match.preprocessing_filters.whitening_filter.max_freq == 1.0

    refine_path = _write(
        tmp_path,
        TUTORIAL_REFINE,
        ("60S_map_px0.936_bscale0.5_intro.mrc", "results_match_template_60S_intro.csv"),
        "refine.yaml",
    )
    refine = load_template_config(RefineTemplateConfig, refine_path)
    assert refine.particle_stack.extracted_box_size == (518, 518)
    assert refine.computational_config.gpu_ids == "all"

    optimize_path = _write(
        tmp_path,
        TUTORIAL_OPTIMIZE,
        ("results_match_template_crop_intro.csv", "60S_aligned.pdb"),
        "optimize.yaml",
    )
    optimize = load_template_config(OptimizeTemplateConfig, optimize_path)
    assert optimize.simulator.pdb_filepath == tmp_path / "60S_aligned.pdb"
    assert optimize.simulator.simulator_config.mtf_reference == "falcon4EC_300kv"
    assert optimize.simulator.simulator_config.dose_end == 50.0
    assert optimize.pixel_size_coarse_search.pixel_size_values() == pytest.approx(
        [0.01 * i for i in range(-5, 6)], abs=1e-12
    )
    assert len(optimize.pixel_size_fine_search.pixel_size_values()) == 17


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    values = _match_values(tmp_path)  # absolute input paths in tmp_path
    values["template_volume_path"] = "../maps/template.mrc"
    (tmp_path / "project" / "maps").mkdir()
    (tmp_path / "project" / "maps" / "template.mrc").write_bytes(b"")
    values["match_template_result"]["mip_path"] = "out/mip.mrc"
    config = _load(MatchTemplateConfig, folder, values)
    assert config.template_volume_path == folder / "../maps/template.mrc"
    assert config.template_volume_path.resolve() == (tmp_path / "project/maps/template.mrc")
    assert config.match_template_result.mip_path == folder / "out/mip.mrc"
    assert config.micrograph_path == tmp_path / "micrograph.mrc"  # absolute: untouched


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = _load(MatchTemplateConfig, tmp_path, _match_values(tmp_path))
    saved = save_resolved_config(config, tmp_path / "resolved" / "match.yaml")
    assert load_template_config(MatchTemplateConfig, saved) == config


def test_defaults_equal_leopard_em() -> None:
    # Leopard-EM 1.3.0 pydantic_models/config/*.py and data_structures/optics_group.py.
    assert DefocusSearchConfig().model_dump() == {
        "enabled": True,
        "defocus_min": -1000.0,
        "defocus_max": 1000.0,
        "defocus_step": 200.0,
        "skip_enforce_zero": False,
    }
    assert PixelSizeSearchConfig().model_dump() == {
        "enabled": False,
        "pixel_size_min": 0.0,
        "pixel_size_max": 0.0,
        "pixel_size_step": 0.0,
        "skip_enforce_zero": False,
    }
    orientation = OrientationSearchConfig().model_dump()
    assert orientation == {
        "psi_step": 1.5,
        "theta_step": 2.5,
        **dict.fromkeys(
            ("phi_min", "phi_max", "theta_min", "theta_max", "psi_min", "psi_max"), None
        ),
        "base_grid_method": "uniform",
        "symmetry": "C1",
    }
    assert RefineOrientationConfig().model_dump() == {
        "enabled": True,
        "phi_step_coarse": 2.5,
        "phi_step_fine": 0.25,
        "theta_step_coarse": 2.5,
        "theta_step_fine": 0.25,
        "psi_step_coarse": 1.5,
        "psi_step_fine": 0.1,
        "base_grid_method": "uniform",
    }
    filters = PreprocessingFilters().model_dump()
    assert filters["whitening_filter"] == {
        "enabled": True,
        "num_freq_bins": None,
        "max_freq": 0.5,
        "do_power_spectrum": True,
    }
    assert filters["bandpass_filter"] == {
        "enabled": False,
        "low_freq_cutoff": None,
        "high_freq_cutoff": None,
        "falloff": None,
    }
    assert filters["phase_randomization_filter"] == {"enabled": False, "cuton": None}
    assert filters["arbitrary_curve_filter"] == {
        "enabled": False,
        "frequencies": None,
        "amplitudes": None,
    }
    assert filters["random_fourier_dropout"] == {
        "enabled": False,
        "dropout_fraction": 0.1,
        "seed": 0,
    }
    assert ComputationalConfigMatch().model_dump() == {
        "gpu_ids": [0],
        "num_cpus": 1,
        "backend": "streamed",
    }
    assert ComputationalConfigRefine().backend == "batched"
    optics = tc.OpticsGroup(
        label="g", pixel_size=1.0, voltage=300, defocus_u=1, defocus_v=1, astigmatism_angle=0
    )
    assert (
        optics.spherical_aberration,
        optics.amplitude_contrast_ratio,
        optics.phase_shift,
        optics.ctf_B_factor,
        optics.chromatic_aberration,
    ) == (2.7, 0.07, 0.0, 0.0, 0.0)
    assert MovieConfig().model_dump() == {
        "enabled": False,
        "movie_path": "",
        "deformation_field_path": "",
        "particle_shifts_path": "",
        "pre_exposure": 0.0,
        "fluence_per_frame": 1.0,
    }


# ----------------------------------------------------------------------------- 1D searches


def test_defocus_values_follow_leopard_em() -> None:
    # Leopard-EM: arange(min, max + step, step), then 0 added (sorted) when missing.
    search = DefocusSearchConfig(defocus_min=-1000, defocus_max=1000, defocus_step=300)
    values = search.defocus_values()
    assert values.dtype == torch.float64
    assert values.tolist() == [-1000, -700, -400, -100, 0, 200, 500, 800, 1100]
    skipped = search.model_copy(update={"skip_enforce_zero": True}).defocus_values()
    assert skipped.tolist() == [-1000, -700, -400, -100, 200, 500, 800, 1100]
    assert DefocusSearchConfig(defocus_min=100, defocus_max=500).defocus_values().tolist() == [
        0,
        100,
        300,
        500,
    ]
    assert DefocusSearchConfig(enabled=False).defocus_values().tolist() == [0.0]


def test_pixel_size_values_are_offsets() -> None:
    search = PixelSizeSearchConfig(
        enabled=True, pixel_size_min=-0.005, pixel_size_max=0.005, pixel_size_step=0.001
    )
    values = search.pixel_size_values()
    assert values.dtype == torch.float64
    assert values.tolist() == pytest.approx([0.001 * i for i in range(-5, 6)], abs=1e-15)
    assert values[5].item() == 0.0  # the nominal pixel size itself, exactly
    assert PixelSizeSearchConfig().pixel_size_values().tolist() == [0.0]


# ----------------------------------------------------------------------------- orientations


def _random_rotations(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 3) uniformly distributed rotations (uniform rot, psi; cos tilt uniform)."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    tilt = torch.rad2deg(torch.acos(1.0 - 2.0 * u[:, 1]))
    return euler_to_matrix(360.0 * u[:, 0], tilt, 360.0 * u[:, 2])


def test_orientations_are_the_global_grid_and_cover_so3() -> None:
    search = OrientationSearchConfig(theta_step=15.0, psi_step=20.0)
    grid = search.orientations()
    assert grid.dtype == torch.float64
    assert torch.equal(grid, global_orientation_grid(15.0, "C1", in_plane_step_degrees=20.0))
    matrices = euler_to_matrix(*grid.unbind(-1))
    errors = distance_to_grid(_random_rotations(2000, seed=1), matrices)
    # engine/so3_grid.py: error ≤ step + psi_step / 2.
    assert errors.max() <= 15.0 + 10.0


def test_orientations_honour_symmetry_and_ranges() -> None:
    c1 = OrientationSearchConfig(theta_step=15.0, psi_step=20.0).orientations()
    c4_search = OrientationSearchConfig(theta_step=15.0, psi_step=20.0, symmetry="c4")
    c4 = c4_search.orientations()
    assert 0.2 < len(c4) / len(c1) < 0.3
    assert c4[:, 0].max() <= 90.0  # rot within the C4 unit's 0..90 wedge
    errors = distance_to_grid(
        _random_rotations(1000, seed=2),
        euler_to_matrix(*c4.unbind(-1)),
        symmetry_operators("C4").to(torch.float64),
    )
    assert errors.max() <= 15.0 + 10.0

    ranged = OrientationSearchConfig(
        symmetry=None, theta_step=10.0, psi_step=10.0, theta_min=30.0, theta_max=60.0
    ).orientations()
    assert ranged[:, 1].min() >= 30.0
    assert ranged[:, 1].max() <= 60.0
    assert ranged[:, 2].max() < 360.0

    multiple = MultipleOrientationConfig.model_validate(
        {
            "orientation_configs": [
                {"theta_step": 15.0, "psi_step": 20.0},
                {"theta_step": 15.0, "psi_step": 20.0, "symmetry": "C4"},
            ]
        }
    )
    assert torch.equal(multiple.orientations(), torch.cat([c1, c4]))


def _rotations_within(radius_degrees: float, n: int, seed: int) -> torch.Tensor:
    """(n, 3, 3) rotations of angle ≤ radius about random axes (Rodrigues), some at radius."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    angle = torch.deg2rad(radius_degrees * torch.rand(n, generator=generator, dtype=torch.float64))
    angle[: n // 10] = math.radians(radius_degrees)
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack(
        [
            torch.stack([zero, -z, y], -1),
            torch.stack([z, zero, -x], -1),
            torch.stack([-y, x, zero], -1),
        ],
        -2,
    )
    s, c = angle.sin()[:, None, None], angle.cos()[:, None, None]
    return torch.eye(3, dtype=torch.float64) + s * skew + (1.0 - c) * skew @ skew


@pytest.mark.parametrize(
    ("coarse", "fine"),
    [((2.5, 1.5), (0.25, 0.1)), ((3.0, 2.0), (0.6, 0.3))],  # Leopard-EM defaults, coarser
)
def test_rotation_offsets_cover_the_coarse_neighbourhood(
    coarse: tuple[float, float], fine: tuple[float, float]
) -> None:
    config = RefineOrientationConfig(
        theta_step_coarse=coarse[0],
        psi_step_coarse=coarse[1],
        theta_step_fine=fine[0],
        psi_step_fine=fine[1],
    )
    offsets = config.rotation_offsets()
    assert offsets.dtype == torch.float64
    assert torch.equal(offsets[0], torch.eye(3, dtype=torch.float64))
    identity = torch.eye(3, dtype=torch.float64).expand(len(offsets), 3, 3)
    radius = config.search_radius_degrees()
    assert radius == max(coarse)
    assert distance_to_grid(offsets, identity[:1]).max() <= radius + 1e-6
    step = config.lattice_step_degrees()
    assert step == pytest.approx(math.sqrt((2 * fine[0] ** 2 + fine[1] ** 2) / 3))
    errors = distance_to_grid(_rotations_within(radius, 3000, seed=3), offsets)
    assert errors.max() <= step * math.sqrt(3.0) / 2.0 + 1e-6
    assert step * math.sqrt(3.0) / 2.0 <= max(fine)  # "within about a fine step"


def test_disabled_orientation_refinement_is_the_identity() -> None:
    offsets = RefineOrientationConfig(enabled=False).rotation_offsets()
    assert offsets.shape == (1, 3, 3)
    assert torch.equal(offsets[0], torch.eye(3, dtype=torch.float64))


# ----------------------------------------------------------------------------- filters


def _coloured(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return coloured_noise(
        shape, 1.0, power_law_spectrum(2.0, 0.02), seeded_generator(seed), dtype=torch.float64
    )


def _shell_flatness(image: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
    """(rms of p / median − 1, |mean of upper half / mean of lower half − 1|) over shells."""
    power = radial_power_spectrum(image)
    k = torch.arange(len(power), dtype=torch.float64) / max(image.shape)
    p = power[(k > lo) & (k < hi)]
    p = p / p.median()
    half = len(p) // 2
    return float((p - 1).square().mean().sqrt()), float(abs(p[half:].mean() / p[:half].mean() - 1))


def test_whitening_flattens_coloured_noise() -> None:
    shape = (256, 256)
    independent = _coloured(shape, seed=5)
    before, _ = _shell_flatness(independent, 0.02, 0.45)
    assert before > 3.0  # the power law spans decades
    cases = [
        (WhiteningFilterConfig(max_freq=None), _coloured(shape, seed=4)),
        (WhiteningFilterConfig(max_freq=None, num_freq_bins=150), _coloured(shape, seed=4)),
        (WhiteningFilterConfig(max_freq=None, do_power_spectrum=False), _coloured(shape, seed=4)),
        # A larger micrograph's filter laid on the smaller grid (as for templates).
        (WhiteningFilterConfig(max_freq=None), _coloured((512, 384), seed=4)),
    ]
    for whitening, source in cases:
        filters = PreprocessingFilters(whitening_filter=whitening)
        filtered = torch.fft.irfftn(
            torch.fft.rfftn(independent) * filters.combined_filter(source, shape), s=shape
        )
        spread, trend = _shell_flatness(filtered, 0.02, 0.45)
        # Shell means of a few dozen exponential samples scatter by ~10 % (twice: the
        # filter's source and the filtered image are independent draws).
        assert spread < 0.2, whitening
        assert trend < 0.06, whitening


def test_whitening_is_the_engine_filter_normalised_and_capped() -> None:
    micrograph = _coloured((96, 128), seed=6) + 3.0
    for shape in ((96, 128), (48, 48)):
        ours = WhiteningFilterConfig(max_freq=None).fourier_filter(micrograph, shape)
        engine = whitening_filter(micrograph - micrograph.mean(), shape)
        assert ours[0, 0] == 0.0  # the DC term, zeroed as Leopard-EM does
        ratio = (ours / engine).flatten()[1:]
        assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-9)
        assert ours.max() <= 1.0 + 1e-12  # normalised at the profile's largest node
    capped = WhiteningFilterConfig(max_freq=0.25).fourier_filter(micrograph, (96, 128))
    radius = radial_frequency((96, 128), dtype=torch.float64)
    assert torch.all(capped[radius > 0.25 + 1.0 / 128] == 1.0)
    assert capped[radius <= 0.25].max() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "whitening",
    [
        WhiteningFilterConfig(),
        WhiteningFilterConfig(num_freq_bins=100),
        WhiteningFilterConfig(do_power_spectrum=False),
    ],
)
def test_whitening_ignores_the_mean_of_a_float32_micrograph(
    whitening: WhiteningFilterConfig,
) -> None:
    # float32 rounding leaves a tiny DC after the mean is removed; its inverse must not
    # become the filter's maximum (which would scale every other frequency to ~0).
    micrograph = (_coloured((128, 128), seed=9) + 100.0).to(torch.float32)
    filtered = whitening.fourier_filter(micrograph, (128, 128))
    radius = radial_frequency((128, 128))
    assert filtered[0, 0] == 0.0
    # 1 at the profile's largest node; grid samples fall between nodes.
    assert 0.95 < filtered[radius <= 0.5].max() <= 1.0 + 1e-6
    assert filtered[(radius > 0) & (radius <= 0.5)].min() > 1e-3  # power law: ~30x range


def test_full_plane_shell_mean_matches_the_engine_power_spectrum() -> None:
    image = _coloured((40, 52), seed=7)
    shape = (40, 52)
    n_shells = len(radial_power_spectrum(image))
    power = torch.fft.rfftn(image).abs().square()
    ours = radial_shell_mean(power, shape, 1.0 / 52, n_shells) / (40 * 52)
    assert torch.allclose(ours, radial_power_spectrum(image), rtol=1e-10)


def test_bandpass_matches_leopard_em_edges() -> None:
    shape = (40, 40)  # samples on the x axis at |k| = j / 40
    soft = BandpassFilterConfig(
        enabled=True, low_freq_cutoff=0.1, high_freq_cutoff=0.3, falloff=0.05
    ).fourier_filter(shape, dtype=torch.float64)
    radius = radial_frequency(shape, dtype=torch.float64)
    assert torch.all(soft[(radius > 0.1) & (radius <= 0.3)] == 1.0)
    assert torch.all(soft[(radius <= 0.05) | (radius > 0.35)] == 0.0)
    # Quarter-cosine edges: 0.025 outside a cut-off is cos(π/4).
    assert soft[0, 3].item() == pytest.approx(math.cos(math.pi / 4))  # |k| = 0.075
    assert soft[0, 13].item() == pytest.approx(math.cos(math.pi / 4))  # |k| = 0.325
    hard = BandpassFilterConfig(
        enabled=True, low_freq_cutoff=0.1, high_freq_cutoff=0.3
    ).fourier_filter(shape, dtype=torch.float64)
    assert hard[0, :21].tolist() == [0.0] * 5 + [1.0] * 7 + [hard[0, 12].item()] + [0.0] * 8
    assert hard[0, 0].item() == 0.0  # no falloff: the DC term is outside (low < |k|)
    assert torch.all(BandpassFilterConfig().fourier_filter(shape) == 1.0)


def test_arbitrary_curve_interpolates_and_is_one_outside() -> None:
    curve = ArbitraryCurveFilterConfig(
        enabled=True, frequencies=[0.1, 0.2, 0.4], amplitudes=[2.0, 4.0, 0.5]
    ).fourier_filter((40, 40), dtype=torch.float64)
    row = curve[0, :21].tolist()  # |k| = j / 40
    assert row[3] == 1.0  # below the first point
    assert row[4] == pytest.approx(2.0)
    assert row[6] == pytest.approx(3.0)
    assert row[8] == pytest.approx(4.0)
    assert row[12] == pytest.approx(2.25)
    assert row[16] == 1.0  # from the last point on, as Leopard-EM
    assert row[20] == 1.0


def test_combined_filter_is_the_product_on_the_requested_grid(device: torch.device) -> None:
    micrograph = _coloured((64, 80), seed=8).to(torch.float32)
    filters = PreprocessingFilters(
        bandpass_filter=BandpassFilterConfig(
            enabled=True, low_freq_cutoff=0.02, high_freq_cutoff=0.4, falloff=0.02
        ),
        arbitrary_curve_filter=ArbitraryCurveFilterConfig(
            enabled=True, frequencies=[0.0, 0.5], amplitudes=[1.0, 0.5]
        ),
    )
    combined = filters.combined_filter(micrograph, (32, 30))
    assert combined.shape == (32, 16)
    assert combined.dtype == torch.float32
    product = (
        filters.whitening_filter.fourier_filter(micrograph, (32, 30))
        * filters.bandpass_filter.fourier_filter((32, 30))
        * filters.arbitrary_curve_filter.fourier_filter((32, 30))
    )
    assert torch.equal(combined, product)
    on_device = filters.combined_filter(micrograph.to(device), (32, 30))
    assert on_device.device.type == device.type
    assert torch.allclose(on_device.cpu(), combined, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- errors


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path: Path) -> None:
    values = _match_values(tmp_path)
    values["optics_group"]["pixel_sise"] = 1.0
    with pytest.raises(CryorefineError) as caught:
        _load(MatchTemplateConfig, tmp_path, values)
    message = caught.value.message
    assert "optics_group.pixel_sise" in message
    assert "unknown key" in message
    assert "pixel_size" in message and "defocus_u" in message
    assert str(tmp_path / "job.yaml") in message


def test_unknown_key_inside_the_orientation_union(tmp_path: Path) -> None:
    values = _match_values(tmp_path)
    values["orientation_search_config"]["psi_stepp"] = 1.0
    with pytest.raises(CryorefineError) as caught:
        _load(MatchTemplateConfig, tmp_path, values)
    assert caught.value.field == "orientation_search_config.psi_stepp"
    assert "psi_step," in caught.value.message and "theta_step" in caught.value.message
    values = _match_values(tmp_path)
    values["orientation_search_config"] = {"orientation_configs": [{"psi_stepp": 1.0}]}
    with pytest.raises(CryorefineError) as caught:
        _load(MatchTemplateConfig, tmp_path, values)
    assert caught.value.field == "orientation_search_config.orientation_configs.0.psi_stepp"
    assert "theta_step" in caught.value.message


def _set(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        values = values.setdefault(part, {})
    if value is _DELETE:
        del values[last]
    else:
        values[last] = value


_DELETE = object()

MATCH_ERRORS = [
    ("micrograph_path", "absent.mrc", "micrograph_path", "absent.mrc"),
    ("micrographs_star", "micrograph.mrc", "micrograph_path", "both"),
    ("micrograph_path", _DELETE, "micrograph_path", "neither"),
    ("optics_group", _DELETE, "optics_group", "optics_group"),
    ("optics_group.mtf_values", [1.0, 0.9], "optics_group.mtf_values", "MTF"),
    ("optics_group.mag_matrix", [1.01, 0, 0, 1], "optics_group.mag_matrix", "magnification"),
    ("optics_group.beam_tilt_x", 0.3, "optics_group.beam_tilt_x", "beam tilt"),
    ("optics_group.odd_zernikes", {"Z31c": 0.1}, "optics_group.odd_zernikes", "Zernike"),
    ("optics_group.chromatic_aberration", 2.7, "optics_group.chromatic_aberration", "chromatic"),
    ("optics_group.pixel_size", -1.0, "optics_group.pixel_size", "greater than 0"),
    ("match_template_result", {"hdf5_path": "r.h5"}, "match_template_result", "HDF5"),
    ("orientation_search_config.psi_min", 0.0, "orientation_search_config", "symmetry"),
    ("orientation_search_config.symmetry", "X5", "orientation_search_config.symmetry", "X5"),
    ("orientation_search_config.theta_step", 0.0, "orientation_search_config.theta_step", "> 0"),
    ("defocus_search_config.defocus_min", 2000.0, "defocus_search_config.defocus_max", "below"),
    ("false_alarms_per_micrograph", 0.0, "false_alarms_per_micrograph", "greater than 0"),
    (
        "preprocessing_filters.phase_randomization_filter",
        {"enabled": True, "cuton": 0.3},
        "preprocessing_filters.phase_randomization_filter.enabled",
        "phase randomisation",
    ),
    (
        "preprocessing_filters.random_fourier_dropout",
        {"enabled": True, "seed": 1},
        "preprocessing_filters.random_fourier_dropout.enabled",
        "dropout",
    ),
    (
        "preprocessing_filters.bandpass_filter",
        {"enabled": True, "low_freq_cutoff": 0.3, "high_freq_cutoff": 0.1},
        "preprocessing_filters.bandpass_filter.low_freq_cutoff",
        "below",
    ),
    (
        "preprocessing_filters.arbitrary_curve_filter",
        {"enabled": True, "frequencies": [0.2, 0.1], "amplitudes": [1, 2]},
        "preprocessing_filters.arbitrary_curve_filter.frequencies",
        "increase",
    ),
    ("computational_config.gpu_ids", "gpu7", "computational_config.gpu_ids", "gpu7"),
    ("particle_contrast", "grey", "particle_contrast", "'dark' or 'bright'"),
]


@pytest.mark.parametrize(("dotted", "value", "field", "words"), MATCH_ERRORS)
def test_bad_match_values_name_their_field(
    tmp_path: Path, dotted: str, value: Any, field: str, words: str
) -> None:
    values = _match_values(tmp_path)
    _set(values, dotted, value)
    with pytest.raises(CryorefineError) as caught:
        _load(MatchTemplateConfig, tmp_path, values)
    message = caught.value.message
    assert f"field '{field}'" in message, message
    assert words in message, message
    assert "Fix:" in message


def test_harmless_defaults_of_unsupported_optics_are_accepted(tmp_path: Path) -> None:
    values = _match_values(tmp_path)
    values["optics_group"].update(
        mag_matrix=[1.0, 0.0, 0.0, 1.0],
        beam_tilt_x=0.0,
        even_zernikes={"Z44c": 0.0},
        chromatic_aberration=None,
    )
    assert _load(MatchTemplateConfig, tmp_path, values).optics_group is not None


def test_micrographs_star_replaces_micrograph_and_optics(tmp_path: Path) -> None:
    values = _match_values(tmp_path)
    del values["micrograph_path"], values["optics_group"]
    values["micrographs_star"] = "micrographs.star"
    (tmp_path / "micrographs.star").write_text("")
    values["peak_exclusion_radius_pixels"] = 12.5
    config = _load(MatchTemplateConfig, tmp_path, values)
    assert config.micrographs_star == tmp_path / "micrographs.star"
    assert config.peak_exclusion_radius(64) == 12.5
    config.peak_exclusion_radius_pixels = None
    assert config.peak_exclusion_radius(65) == 32.0
    values["optics_group"] = _match_values(tmp_path)["optics_group"]
    with pytest.raises(CryorefineError, match="field 'optics_group'"):
        _load(MatchTemplateConfig, tmp_path, values)


def _refine_values(folder: Path) -> dict[str, Any]:
    for name in ("template.mrc", "particles.csv"):
        (folder / name).write_bytes(b"")
    values: dict[str, Any] = yaml.safe_load(_leopard_example(LEOPARD_REFINE_EXAMPLE, folder))
    return values


REFINE_ERRORS = [
    ("particle_stack.extracted_box_size", [517, 518], "particle_stack.extracted_box_size"),
    ("particle_stack.extracted_box_size", [512, 512], "particle_stack.extracted_box_size"),
    ("particle_stack", {"hdf5_path": "p.h5"}, "particle_stack"),
    ("particle_stack.df_path", "missing.csv", "particle_stack.df_path"),
    ("template_volume_path", "missing.mrc", "template_volume_path"),
    ("movie_config.enabled", True, "movie_config.enabled"),
    ("orientation_refinement_config.psi_step_fine", 0.0, "psi_step_fine"),
    ("pixel_size_refinement_config.enabled", True, "pixel_size_refinement_config"),
]


@pytest.mark.parametrize(("dotted", "value", "field"), REFINE_ERRORS)
def test_bad_refine_values_name_their_field(
    tmp_path: Path, dotted: str, value: Any, field: str
) -> None:
    values = _refine_values(tmp_path)
    _set(values, dotted, value)
    if dotted == "pixel_size_refinement_config.enabled":
        values["pixel_size_refinement_config"] = {"enabled": True}  # step left at 0
    with pytest.raises(CryorefineError) as caught:
        _load(RefineTemplateConfig, tmp_path, values)
    assert field in (caught.value.field or ""), caught.value.message
    assert "Fix:" in caught.value.message


def test_movie_config_may_be_left_out(tmp_path: Path) -> None:
    values = _refine_values(tmp_path)
    del values["movie_config"]
    assert not _load(RefineTemplateConfig, tmp_path, values).movie_config.enabled


def test_missing_simulator_inputs_name_their_field(tmp_path: Path) -> None:
    path = _write(tmp_path, TUTORIAL_OPTIMIZE, ("results_match_template_crop_intro.csv",))
    with pytest.raises(CryorefineError) as caught:
        load_template_config(OptimizeTemplateConfig, path)
    assert caught.value.field == "simulator.pdb_filepath"
    assert "60S_aligned.pdb" in caught.value.message
    (tmp_path / "60S_aligned.pdb").write_bytes(b"")
    path.write_text(TUTORIAL_OPTIMIZE.replace('"falcon4EC_300kv"', "my_mtf.star"))
    with pytest.raises(CryorefineError) as caught:
        load_template_config(OptimizeTemplateConfig, path)
    assert caught.value.field == "simulator.simulator_config.mtf_reference"
    (tmp_path / "my_mtf.star").write_text("")
    config = load_template_config(OptimizeTemplateConfig, path)
    assert config.simulator.simulator_config.mtf_file() == tmp_path / "my_mtf.star"


# ----------------------------------------------------------------------------- devices, outputs


def test_devices_from_gpu_ids() -> None:
    assert ComputationalConfigMatch(gpu_ids="cpu").devices() == [torch.device("cpu")]
    assert ComputationalConfigMatch(gpu_ids=None).devices() == [torch.device("cpu")]
    if torch.cuda.is_available():
        assert ComputationalConfigMatch(gpu_ids=0).devices() == [torch.device("cuda:0")]
        return
    for gpu_ids in (0, [0], "cuda:0", "all"):
        with pytest.raises(CryorefineError) as caught:
            ComputationalConfigMatch(gpu_ids=gpu_ids).devices()
        assert caught.value.field == "computational_config.gpu_ids"
        assert "CUDA" in caught.value.message


def test_check_overwrite_refuses_existing_results(tmp_path: Path) -> None:
    values = _match_values(tmp_path)
    values["match_template_result"]["allow_file_overwrite"] = False
    config = _load(MatchTemplateConfig, tmp_path, values)
    config.match_template_result.check_overwrite()  # nothing written yet
    (tmp_path / "output_mip.mrc").write_bytes(b"")
    with pytest.raises(CryorefineError, match="allow_file_overwrite"):
        config.match_template_result.check_overwrite()
    assert len(config.match_template_result.output_paths()) == 8
