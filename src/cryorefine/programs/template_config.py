"""Leopard-EM 1.3.0 configuration files for match-template, refine-template and optimize-template.

A YAML written for Leopard-EM 1.3.0's `MatchTemplateManager`, `RefineTemplateManager`
or `OptimizeTemplateManager` loads here unchanged: the same keys, nesting, defaults and
checks, re-implemented as strict `cryorefine.config.Config` models. On top of them:

* Paths are relative to the config file's folder when not absolute
  (`load_template_config`), and input files must exist when the config is loaded.
* Values Leopard-EM accepts but cannot use (a zero angular step, min > max, a bad
  symmetry name) fail at load, naming the field, instead of during compute.
* Options cryorefine cannot honour (detector MTF, beam tilt, Zernike aberrations, a
  magnification matrix, chromatic aberration, phase randomisation, random Fourier
  dropout, movie refinement, HDF5 result/particle files) are accepted at their
  default (off) values and rejected with a clear error otherwise.
* A few optional extension keys: on `MatchTemplateConfig` micrographs_star,
  false_alarms_per_micrograph, peak_exclusion_radius_pixels, orientation_batch_size,
  checkpoint_every_seconds; on all three program configs particle_contrast.
* Deliberate leniency: `movie_config` may be left out of a refine config (Leopard-EM
  1.3.0 requires the key, though older Leopard-EM examples and its tutorial omit it).

Conventions: lengths in Å, angles in degrees, frequencies in cycles per pixel
(0.5 = Nyquist; Leopard-EM's docs say "fraction of Nyquist" for max_freq, the band-pass
cut-offs and the arbitrary-curve frequencies, but its code compares them with
|k| in cycles per pixel, and so does this module). Leopard-EM's Euler angles
(phi, theta, psi) are the same numbers as RELION's (rot, tilt, psi) for the same view
(engine/so3.py), so orientations here are RELION (rot, tilt, psi).
"""

from __future__ import annotations

import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cryorefine.config import Config, read_yaml
from cryorefine.engine.filters import (
    radial_power_spectrum,
    radial_profile_on_grid,
    radial_shell_frequencies,
    radial_shell_mean,
)
from cryorefine.engine.fourier import radial_frequency
from cryorefine.engine.so3_grid import global_orientation_grid, local_rotation_offsets
from cryorefine.engine.symmetry import canonical_symmetry_name
from cryorefine.errors import CryorefineError, require_file
from cryorefine.parallel.device import resolve_device

_CONFIG_FOLDER = "config_folder"


class _InvalidConfigError(ValueError):
    """A validation failure that knows its fix; `load_template_config` reports it as is.

    `field` names the offending key relative to the model whose validator raised it.
    """

    def __init__(self, problem: str, fix: str, field: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        self.field = field


def _resolve_against_config_folder(value: Path, info: ValidationInfo) -> Path:
    """A relative path as seen from the config file's folder (given as validation context)."""
    value = value.expanduser()
    folder = (info.context or {}).get(_CONFIG_FOLDER)
    if folder is None or value.is_absolute():
        return value
    return Path(folder) / value


#: A file path in a config: relative to the config file's folder when loaded from a file.
ConfigPath = Annotated[Path, AfterValidator(_resolve_against_config_folder)]


def _is_zero(value: float | None) -> bool:
    return value is None or value == 0.0


# --------------------------------------------------------------------------- optics


class OpticsGroup(Config):
    """Microscope optics and the micrograph's CTF (Leopard-EM's `optics_group`).

    Leopard-EM lists MTF, beam tilt, Zernike moments and chromatic aberration as
    "unused attributes" (the magnification matrix it does use). cryorefine's CTF models
    none of them, so each is accepted only at its default (unset, zero, or the identity
    magnification matrix) and rejected at load otherwise.
    """

    label: str = Field(description="Name of the optics group.")
    pixel_size: float = Field(gt=0, description="Pixel size of the micrograph (Å).")
    voltage: float = Field(gt=0, description="Acceleration voltage (kV).")
    spherical_aberration: float = Field(default=2.7, ge=0, description="Cs (mm).")
    amplitude_contrast_ratio: float = Field(
        default=0.07, ge=0, le=1, description="Amplitude contrast Q0, in [0, 1]."
    )
    phase_shift: float = Field(default=0.0, description="Additional phase shift (degrees).")
    defocus_u: float = Field(description="Defocus along the major axis, underfocus > 0 (Å).")
    defocus_v: float = Field(description="Defocus along the minor axis, underfocus > 0 (Å).")
    astigmatism_angle: float = Field(
        description="Angle of the major defocus axis from x (degrees), as rlnDefocusAngle."
    )
    ctf_B_factor: float = Field(  # noqa: N815 (Leopard-EM's key)
        default=0.0, ge=0, description="CTF envelope B-factor (Å²)."
    )
    chromatic_aberration: float | None = Field(
        default=0.0, ge=0, description="Cc (mm); not modelled, must be 0."
    )
    mtf_reference: str | None = Field(default=None, description="Detector MTF file; not supported.")
    mtf_values: list[float] | None = Field(default=None, description="Detector MTF; not supported.")
    beam_tilt_x: float | None = Field(default=None, description="Beam tilt x (mrad); must be 0.")
    beam_tilt_y: float | None = Field(default=None, description="Beam tilt y (mrad); must be 0.")
    odd_zernikes: dict[str, float] | None = Field(
        default=None, description="Must be unset or zero."
    )
    even_zernikes: dict[str, float] | None = Field(
        default=None, description="Must be unset or zero."
    )
    mag_matrix: Annotated[list[float], Field(min_length=4, max_length=4)] | None = Field(
        default=None, description="2x2 magnification matrix, row-major; only the identity."
    )

    @model_validator(mode="after")
    def _refuse_what_the_ctf_cannot_model(self) -> OpticsGroup:
        unsupported = (
            (
                "chromatic_aberration",
                not _is_zero(self.chromatic_aberration),
                "chromatic aberration",
                "set it to 0 or remove the key.",
            ),
            (
                "mtf_reference",
                self.mtf_reference is not None,
                "a detector MTF",
                "remove the key (or set it to null); cryorefine's CTF has no MTF term.",
            ),
            (
                "mtf_values",
                self.mtf_values is not None,
                "a detector MTF",
                "remove the key (or set it to null); cryorefine's CTF has no MTF term.",
            ),
            (
                "beam_tilt_x",
                not _is_zero(self.beam_tilt_x),
                "beam tilt",
                "remove the key or set it to 0.",
            ),
            (
                "beam_tilt_y",
                not _is_zero(self.beam_tilt_y),
                "beam tilt",
                "remove the key or set it to 0.",
            ),
            (
                "odd_zernikes",
                any(v != 0.0 for v in (self.odd_zernikes or {}).values()),
                "odd Zernike aberrations",
                "remove the key or set it to null.",
            ),
            (
                "even_zernikes",
                any(v != 0.0 for v in (self.even_zernikes or {}).values()),
                "even Zernike aberrations",
                "remove the key or set it to null.",
            ),
            (
                "mag_matrix",
                self.mag_matrix is not None and self.mag_matrix != [1.0, 0.0, 0.0, 1.0],
                "anisotropic magnification",
                "remove the key (or set it to null), or correct the micrograph's "
                "magnification distortion beforehand.",
            ),
        )
        for field, is_set, what, fix in unsupported:
            if is_set:
                raise _InvalidConfigError(
                    f"cryorefine does not model {what} (got {getattr(self, field)!r}).",
                    fix=fix,
                    field=field,
                )
        return self


# --------------------------------------------------------------------------- 1D searches


def _leopard_search_values(
    minimum: float, maximum: float, step: float, skip_enforce_zero: bool
) -> torch.Tensor:
    """Leopard-EM's search list: min, min + step, ... up to the first value ≥ max, plus 0.

    Leopard-EM takes arange(min, max + step, step): max is included when the range
    is a multiple of the step, and the last value may overshoot max by less than a
    step when it is not (-1000..1000 by 300 ends at 1100). A value within 1e-9 steps
    of max counts as max (float rounding does not add a point). Unless
    `skip_enforce_zero`, 0 is added when no value lies within 1e-6 of it, and the
    list is sorted.

    Returns:
        (n,) float64.
    """
    count = max(0, math.ceil((maximum - minimum) / step - 1e-9)) + 1
    values = minimum + step * torch.arange(count, dtype=torch.float64)
    # min + i·step may land a rounding error away from 0; the zero plane is exactly 0.
    values = torch.where(values.abs() < 1e-9 * step, 0.0, values)
    if not skip_enforce_zero and bool(values.abs().min() > 1e-6):
        values = torch.sort(torch.cat([values, values.new_zeros(1)])).values
    return values


class DefocusSearchConfig(Config):
    """Defocus planes searched, relative to the micrograph's (or particle's) defocus."""

    enabled: bool = Field(default=True, description="Search defocus; off = the one plane 0.")
    defocus_min: float = Field(default=-1000.0, description="Lowest relative defocus (Å).")
    defocus_max: float = Field(default=1000.0, description="Highest relative defocus (Å).")
    defocus_step: float = Field(default=200.0, gt=0, description="Spacing of the planes (Å).")
    skip_enforce_zero: bool = Field(
        default=False, description="Do not add the plane 0 when missed."
    )

    @model_validator(mode="after")
    def _range_is_not_empty(self) -> DefocusSearchConfig:
        if self.enabled and self.defocus_max < self.defocus_min:
            raise _InvalidConfigError(
                f"defocus_max ({self.defocus_max}) is below defocus_min ({self.defocus_min}).",
                fix="give defocus_min ≤ defocus_max, or set enabled: false.",
                field="defocus_max",
            )
        return self

    def defocus_values(self) -> torch.Tensor:
        """Relative defocus of each searched plane (Å), added to both defocus U and V.

        Returns:
            (n,) float64: [0.0] when disabled, else Leopard-EM's list
            (`_leopard_search_values`), e.g. -1200..1200 by 200 gives 13 planes.
        """
        if not self.enabled:
            return torch.zeros(1, dtype=torch.float64)
        return _leopard_search_values(
            self.defocus_min, self.defocus_max, self.defocus_step, self.skip_enforce_zero
        )


class PixelSizeSearchConfig(Config):
    """Pixel sizes searched, as offsets (Å) from a nominal pixel size.

    The offsets are relative: refine-template adds them to the particles' pixel size,
    optimize-template to the simulator's `pixel_spacing` (Leopard-EM: "min/max values
    are relative to the pixel size in the simulator configuration").
    """

    enabled: bool = Field(default=False, description="Search pixel size; off = the one offset 0.")
    pixel_size_min: float = Field(default=0.0, description="Lowest pixel-size offset (Å).")
    pixel_size_max: float = Field(default=0.0, description="Highest pixel-size offset (Å).")
    # Leopard-EM: gt=0 with a default of 0 that pydantic does not validate.
    pixel_size_step: float = Field(default=0.0, gt=0, description="Spacing of the offsets (Å).")
    skip_enforce_zero: bool = Field(
        default=False, description="Do not add the offset 0 when missed."
    )

    @model_validator(mode="after")
    def _range_is_searchable(self) -> PixelSizeSearchConfig:
        if not self.enabled:
            return self
        if self.pixel_size_step <= 0:
            raise _InvalidConfigError(
                f"pixel_size_step must be > 0 when the search is enabled "
                f"(got {self.pixel_size_step}).",
                fix="give a step such as 0.001 (Å), or set enabled: false.",
                field="pixel_size_step",
            )
        if self.pixel_size_max < self.pixel_size_min:
            raise _InvalidConfigError(
                f"pixel_size_max ({self.pixel_size_max}) is below pixel_size_min "
                f"({self.pixel_size_min}).",
                fix="give pixel_size_min ≤ pixel_size_max, or set enabled: false.",
                field="pixel_size_max",
            )
        return self

    def pixel_size_values(self) -> torch.Tensor:
        """Pixel-size offsets (Å) to add to the nominal pixel size.

        Returns:
            (n,) float64: [0.0] when disabled, else Leopard-EM's list
            (`_leopard_search_values`), e.g. -0.005..0.005 by 0.001 gives 11 offsets.
        """
        if not self.enabled:
            return torch.zeros(1, dtype=torch.float64)
        return _leopard_search_values(
            self.pixel_size_min, self.pixel_size_max, self.pixel_size_step, self.skip_enforce_zero
        )


# --------------------------------------------------------------------------- orientations


def _symmetry_name(value: str) -> str:
    """RELION's canonical name; Leopard-EM's bare "C"/"D" mean order 1."""
    text = value.strip()
    if text.upper() in ("C", "D"):
        text += "1"
    try:
        return canonical_symmetry_name(text)
    except CryorefineError as error:
        raise _InvalidConfigError(error.problem, fix=error.fix or "", field="symmetry") from None


class OrientationSearchConfig(Config):
    """Global orientation search (Leopard-EM's `orientation_search_config`).

    Give either a symmetry (and no angle ranges) or symmetry: null and ranges, as
    Leopard-EM requires. Whatever `base_grid_method` says ("uniform", "healpix",
    "cartesian"), the grid is cryorefine's `engine.so3_grid.global_orientation_grid`:
    projection directions on rings of constant tilt `theta_step` apart, points along a
    ring at most `theta_step` apart (rot step ≈ theta_step / sin tilt), each carrying
    psi every `psi_step` (at most; ranges are divided evenly), cut to the asymmetric
    unit of the symmetry (RELION's point groups; "I" is RELION's I2). Every view is
    then within about theta_step + psi_step / 2 of a grid point (engine/so3_grid.py).
    With symmetry: null the tilt/rot/psi ranges are theta/phi/psi min..max (unset ones
    default to the full 0..180 / 0..360 / 0..360).
    """

    psi_step: float = Field(default=1.5, ge=0, description="In-plane (psi) step (degrees).")
    theta_step: float = Field(default=2.5, ge=0, description="Out-of-plane step (degrees).")
    phi_min: float | None = Field(default=None, description="Lowest rot/phi (degrees).")
    phi_max: float | None = Field(default=None, description="Highest rot/phi (degrees).")
    theta_min: float | None = Field(default=None, description="Lowest tilt/theta (degrees).")
    theta_max: float | None = Field(default=None, description="Highest tilt/theta (degrees).")
    psi_min: float | None = Field(default=None, description="Lowest psi (degrees).")
    psi_max: float | None = Field(default=None, description="Highest psi (degrees).")
    base_grid_method: Literal["uniform", "healpix", "cartesian"] = Field(
        default="uniform", description="Accepted; cryorefine's ring grid is used for each."
    )
    symmetry: str | None = Field(default="C1", description="Point group of the template (RELION).")

    @model_validator(mode="after")
    def _ranges_or_symmetry(self) -> OrientationSearchConfig:
        for field in ("theta_step", "psi_step"):
            if getattr(self, field) <= 0:
                raise _InvalidConfigError(
                    f"{field} must be > 0 degrees (got {getattr(self, field)}).",
                    fix="give a step such as 2.5 (theta_step) or 1.5 (psi_step).",
                    field=field,
                )
        ranges = {
            name: getattr(self, name)
            for name in ("phi_min", "phi_max", "theta_min", "theta_max", "psi_min", "psi_max")
        }
        any_range = any(value is not None for value in ranges.values())
        if self.symmetry and any_range:
            raise _InvalidConfigError(
                "both a symmetry and angle ranges are given (Leopard-EM's rule: one or the other).",
                fix="remove the phi/theta/psi min/max keys, or set symmetry: null.",
            )
        if not self.symmetry and not any_range:
            raise _InvalidConfigError(
                "neither a symmetry nor angle ranges are given.",
                fix="give symmetry (e.g. C1), or phi/theta/psi min/max.",
            )
        if self.symmetry:
            _symmetry_name(self.symmetry)
            return self
        (rot_lo, rot_hi), (tilt_lo, tilt_hi), (psi_lo, psi_hi) = self._ranges()
        if not 0.0 <= tilt_lo <= tilt_hi <= 180.0:
            raise _InvalidConfigError(
                f"theta must satisfy 0 ≤ theta_min ≤ theta_max ≤ 180 (got {tilt_lo}, {tilt_hi}).",
                fix="give a theta range within 0..180 degrees.",
                field="theta_max",
            )
        for name, lo, hi in (("phi", rot_lo, rot_hi), ("psi", psi_lo, psi_hi)):
            if not lo <= hi <= lo + 360.0:
                raise _InvalidConfigError(
                    f"{name} must satisfy {name}_min ≤ {name}_max ≤ {name}_min + 360 "
                    f"(got {lo}, {hi}).",
                    fix=f"give a {name} range of at most one turn.",
                    field=f"{name}_max",
                )
        return self

    def _ranges(self) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
        """(rot, tilt, psi) ranges in degrees, unset ends at their full-turn defaults."""

        def pick(value: float | None, default: float) -> float:
            return default if value is None else float(value)

        return (
            (pick(self.phi_min, 0.0), pick(self.phi_max, 360.0)),
            (pick(self.theta_min, 0.0), pick(self.theta_max, 180.0)),
            (pick(self.psi_min, 0.0), pick(self.psi_max, 360.0)),
        )

    def orientations(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The searched views as RELION Euler angles.

        Returns:
            (n, 3) float64 (rot, tilt, psi) in degrees = Leopard-EM's (phi, theta, psi).
        """
        if self.symmetry:
            return global_orientation_grid(
                self.theta_step,
                _symmetry_name(self.symmetry),
                in_plane_step_degrees=self.psi_step,
                device=device,
            )
        rot_range, tilt_range, psi_range = self._ranges()
        return global_orientation_grid(
            self.theta_step,
            "C1",
            in_plane_step_degrees=self.psi_step,
            tilt_range_degrees=tilt_range,
            rot_range_degrees=rot_range,
            psi_range_degrees=psi_range,
            device=device,
        )


class MultipleOrientationConfig(Config):
    """Several orientation searches whose views are concatenated (Leopard-EM)."""

    orientation_configs: list[OrientationSearchConfig] = Field(min_length=1)

    def orientations(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(n, 3) float64 (rot, tilt, psi) in degrees: each search's views in order."""
        return torch.cat([config.orientations(device) for config in self.orientation_configs])


def _orientation_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "multiple_orientations" if "orientation_configs" in value else "one_orientation"
    return (
        "multiple_orientations"
        if isinstance(value, MultipleOrientationConfig)
        else "one_orientation"
    )


#: Tags of the orientation union; they appear in pydantic's error locations.
_UNION_TAGS: dict[str, type[BaseModel]] = {
    "one_orientation": OrientationSearchConfig,
    "multiple_orientations": MultipleOrientationConfig,
}

OrientationSearch = Annotated[
    Annotated[OrientationSearchConfig, Tag("one_orientation")]
    | Annotated[MultipleOrientationConfig, Tag("multiple_orientations")],
    Discriminator(_orientation_kind),
]


class RefineOrientationConfig(Config):
    """Local orientation search around each particle's pose (refine-template).

    Leopard-EM searches Euler-angle offsets in ±coarse steps at the fine steps, on a
    grid around the pole where rot and psi nearly coincide, so its offsets do not fill
    the neighbourhood they stand for. cryorefine searches the whole neighbourhood
    instead: `rotation_offsets` is `engine.so3_grid.local_rotation_offsets`, a cubic
    lattice of rotation vectors clipped to a ball of radius
    R = max(theta_step_coarse, psi_step_coarse) (the coarse search's "± a coarse step
    in each angle"), with lattice spacing s = √((2·theta_step_fine² + psi_step_fine²) / 3),
    chosen so that its worst-case error s·√3/2 equals half the diagonal of a box of
    Leopard's fine steps (two out-of-plane axes at theta_step_fine, one in-plane at
    psi_step_fine). The count is ≈ 4.2 (R / s)³: 8.4 thousand offsets at the defaults.

    phi_step_coarse/fine and base_grid_method are accepted and unused, as in Leopard-EM
    1.3.0 (its "uniform" and "healpix" grids take no phi step, and "basic" fails).
    """

    enabled: bool = Field(default=True, description="Refine orientations; off = identity only.")
    phi_step_coarse: float = Field(default=2.5, ge=0, description="Unused (degrees).")
    phi_step_fine: float = Field(default=0.25, ge=0, description="Unused (degrees).")
    theta_step_coarse: float = Field(
        default=2.5, ge=0, description="Out-of-plane extent (degrees)."
    )
    theta_step_fine: float = Field(
        default=0.25, ge=0, description="Out-of-plane spacing (degrees)."
    )
    psi_step_coarse: float = Field(default=1.5, ge=0, description="In-plane extent (degrees).")
    psi_step_fine: float = Field(default=0.1, ge=0, description="In-plane spacing (degrees).")
    base_grid_method: Literal["uniform", "healpix", "basic"] = Field(
        default="uniform", description="Accepted; unused."
    )

    @model_validator(mode="after")
    def _steps_are_usable(self) -> RefineOrientationConfig:
        if not self.enabled:
            return self
        for field in ("theta_step_fine", "psi_step_fine"):
            if getattr(self, field) <= 0:
                raise _InvalidConfigError(
                    f"{field} must be > 0 degrees when orientation refinement is enabled "
                    f"(got {getattr(self, field)}).",
                    fix="give a fine step such as 0.25, or set enabled: false.",
                    field=field,
                )
        if self.search_radius_degrees() > 180.0:
            raise _InvalidConfigError(
                f"the coarse steps give a search radius of {self.search_radius_degrees()} "
                "degrees, more than 180.",
                fix="give the coarse search's steps (a few degrees).",
                field="theta_step_coarse",
            )
        return self

    def search_radius_degrees(self) -> float:
        """Largest rotation angle searched from a particle's pose: R (degrees)."""
        return max(self.theta_step_coarse, self.psi_step_coarse)

    def lattice_step_degrees(self) -> float:
        """Spacing s of the offsets' rotation-vector lattice (degrees); error ≤ s·√3/2."""
        return math.sqrt((2.0 * self.theta_step_fine**2 + self.psi_step_fine**2) / 3.0)

    def rotation_offsets(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Rotations Δ to try around each pose A, as the views A · Δ.

        A · Δ is Leopard-EM's composition (it composes roma matrices as offset · pose,
        the transpose of RELION's A · Δ). Every rotation within `search_radius_degrees`
        of the identity is within `lattice_step_degrees`·√3/2 of one of them.

        Returns:
            (m, 3, 3) rotation matrices, the identity first; (1, 3, 3) identity when
            disabled.
        """
        if not self.enabled:
            return torch.eye(3, dtype=dtype, device=device)[None]
        return local_rotation_offsets(
            self.search_radius_degrees(), self.lattice_step_degrees(), dtype=dtype, device=device
        )


# --------------------------------------------------------------------------- filters


class WhiteningFilterConfig(Config):
    """Whitening: 1 / (radially averaged amplitude spectrum of the micrograph).

    As Leopard-EM (torch-fourier-filter 0.6): the micrograph's mean is removed (its DC
    term zeroed), the spectrum is averaged in shells, the filter is 1 / √(mean power)
    (or 1 / mean amplitude when do_power_spectrum is false or null), 0 in an empty
    shell, divided by its largest value at |k| ≤ max_freq and set to 1 beyond max_freq,
    then interpolated linearly onto the target grid. Shells are i / max(H, W) cycles
    per pixel by default (cryorefine's `engine.filters` shells), or num_freq_bins
    shells from 0 to the corner √2/2 as in Leopard-EM.
    """

    enabled: bool = Field(default=True, description="Apply the whitening filter.")
    num_freq_bins: int | None = Field(
        default=None, ge=2, description="Shells from 0 to √2/2 cycles/pixel; null = one per 1/N."
    )
    max_freq: float | None = Field(
        default=0.5,
        gt=0,
        description="Whiten up to this |k| (cycles/pixel; 0.5 = Nyquist); 1 beyond.",
    )
    do_power_spectrum: bool | None = Field(
        default=True, description="Average power (true) or amplitude (false/null)."
    )

    def fourier_filter(self, micrograph: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """The whitening filter of `micrograph`, laid on an (h, w) image's half transform.

        Args:
            micrograph: real (H, W).
            shape: (h, w) of the images to filter (the micrograph's own, or a template's).

        Returns:
            real (h, w // 2 + 1) on the rfft layout, micrograph's device; ones when disabled.
        """
        dtype = micrograph.dtype if micrograph.is_floating_point() else torch.float32
        if not self.enabled:
            return torch.ones(shape[0], shape[1] // 2 + 1, dtype=dtype, device=micrograph.device)
        image = micrograph.to(dtype)
        # Leopard-EM zeroes the DC term before measuring; in floating point a
        # subtracted mean leaves a tiny DC whose inverse would dominate the filter,
        # so the DC term is zeroed exactly (the shell at 0 then has no power: filter 0).
        image = image - image.mean()
        image_shape = (image.shape[-2], image.shape[-1])
        if self.num_freq_bins is None:
            shell_width = 1.0 / max(image_shape)
            n_shells = len(radial_shell_frequencies(image_shape))
        else:
            n_shells = self.num_freq_bins
            shell_width = math.sqrt(2.0) / 2.0 / (n_shells - 1)
        if self.num_freq_bins is None and self.do_power_spectrum:
            amplitude = radial_power_spectrum(image).sqrt()
            # These shells are 1 / max(H, W) apart and every non-DC sample has
            # |k| ≥ 1 / max(H, W), so shell 0 holds the DC term alone.
            amplitude[0] = 0.0
        else:
            magnitude = torch.fft.rfftn(image).abs()
            magnitude[0, 0] = 0.0
            if self.do_power_spectrum:
                power = magnitude.square()
                amplitude = radial_shell_mean(power, image_shape, shell_width, n_shells).sqrt()
            else:
                amplitude = radial_shell_mean(magnitude, image_shape, shell_width, n_shells)
        profile = torch.where(amplitude > 0, 1.0 / amplitude.clamp(min=1e-30), 0.0)
        frequencies = torch.arange(n_shells, device=profile.device, dtype=profile.dtype)
        beyond = (
            frequencies * shell_width > self.max_freq
            if self.max_freq is not None
            else torch.zeros_like(profile, dtype=torch.bool)
        )
        largest = torch.where(beyond, 0.0, profile).max()
        # A blank micrograph has no power to whiten: leave the zeros rather than divide by 0.
        profile = profile / largest if bool(largest > 0) else profile
        profile = torch.where(beyond, 1.0, profile)
        return radial_profile_on_grid(profile, shell_width, shape, rfft=True)


class BandpassFilterConfig(Config):
    """Band-pass with quarter-cosine edges (Leopard-EM / torch-fourier-filter 0.6).

    1 for low < |k| ≤ high; within `falloff` outside the band cos(π/2 · d / falloff),
    d the distance to the nearer cut-off; 0 beyond. All in cycles per pixel
    (0.5 = Nyquist). Unset low = 0, high = 1 (no low-pass), falloff = 0 (hard edges);
    as in Leopard-EM, a hard-edged band with low = 0 excludes the DC term.
    """

    enabled: bool = Field(default=False, description="Apply the band-pass.")
    low_freq_cutoff: float | None = Field(
        default=None, ge=0, description="High-pass edge (cycles/px)."
    )
    high_freq_cutoff: float | None = Field(
        default=None, ge=0, description="Low-pass edge (cycles/px)."
    )
    falloff: float | None = Field(
        default=None, ge=0, description="Width of the cosine edges (cycles/px)."
    )

    @model_validator(mode="after")
    def _band_is_not_empty(self) -> BandpassFilterConfig:
        low, high = self.low_freq_cutoff, self.high_freq_cutoff
        if self.enabled and low is not None and high is not None and low >= high:
            raise _InvalidConfigError(
                f"low_freq_cutoff ({low}) must be below high_freq_cutoff ({high}).",
                fix="give low < high in cycles per pixel (0.5 = Nyquist), or set enabled: false.",
                field="low_freq_cutoff",
            )
        return self

    def fourier_filter(
        self,
        shape: tuple[int, int],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The band-pass on an (h, w) image's half transform: real (h, w // 2 + 1)."""
        radius = radial_frequency(shape, rfft=True, device=device, dtype=dtype)
        if not self.enabled:
            return torch.ones_like(radius)
        low = self.low_freq_cutoff if self.low_freq_cutoff is not None else 0.0
        high = self.high_freq_cutoff if self.high_freq_cutoff is not None else 1.0
        falloff = self.falloff if self.falloff is not None else 0.0
        band = ((radius > low) & (radius <= high)).to(dtype)
        if falloff <= 0:
            return band
        distance = torch.minimum((radius - low).abs(), (radius - high).abs())
        edge = (radius > low - falloff) & (radius <= high + falloff) & (band == 0)
        return torch.where(edge, torch.cos(distance / falloff * (math.pi / 2.0)), band)


class PhaseRandomizationFilterConfig(Config):
    """Phase randomisation beyond `cuton`: accepted only when disabled.

    Leopard-EM 1.3.0 accepts it but leaves it out of its combined filter; cryorefine
    refuses it rather than silently ignore it.
    """

    enabled: bool = Field(default=False, description="Not supported; must be false.")
    cuton: float | None = Field(default=None, ge=0, description="Cut-on frequency (cycles/pixel).")

    @model_validator(mode="after")
    def _refuse_when_enabled(self) -> PhaseRandomizationFilterConfig:
        if self.enabled:
            raise _InvalidConfigError(
                "phase randomisation is not supported by cryorefine (Leopard-EM 1.3.0 "
                "does not apply it either).",
                fix="set preprocessing_filters.phase_randomization_filter.enabled: false.",
                field="enabled",
            )
        return self


class ArbitraryCurveFilterConfig(Config):
    """A radial filter given as (frequency, amplitude) points, linearly interpolated.

    Frequencies in cycles per pixel (0.5 = Nyquist), increasing. As Leopard-EM, the
    filter is 1 below the first frequency and from the last frequency on.
    """

    enabled: bool = Field(default=False, description="Apply the curve filter.")
    frequencies: list[float] | None = Field(
        default=None, description="|k| of the points (cycles/px)."
    )
    amplitudes: list[float] | None = Field(default=None, description="Filter value at each point.")

    @model_validator(mode="after")
    def _curve_is_given(self) -> ArbitraryCurveFilterConfig:
        if not self.enabled:
            return self
        if self.frequencies is None or self.amplitudes is None:
            raise _InvalidConfigError(
                "an enabled arbitrary curve filter needs both frequencies and amplitudes.",
                fix="give both lists, or set enabled: false.",
                field="frequencies" if self.frequencies is None else "amplitudes",
            )
        if len(self.frequencies) != len(self.amplitudes) or not self.frequencies:
            raise _InvalidConfigError(
                f"frequencies and amplitudes must be non-empty and of equal length (got "
                f"{len(self.frequencies)} and {len(self.amplitudes)}).",
                fix="give one amplitude per frequency.",
                field="amplitudes",
            )
        if any(b <= a for a, b in zip(self.frequencies, self.frequencies[1:], strict=False)):
            raise _InvalidConfigError(
                f"frequencies must increase (got {self.frequencies}).",
                fix="list the points from low to high frequency.",
                field="frequencies",
            )
        return self

    def fourier_filter(
        self,
        shape: tuple[int, int],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The curve on an (h, w) image's half transform: real (h, w // 2 + 1)."""
        radius = radial_frequency(shape, rfft=True, device=device, dtype=dtype)
        if not self.enabled or self.frequencies is None or self.amplitudes is None:
            return torch.ones_like(radius)
        if len(self.frequencies) < 2:  # every |k| is below or from the one point on
            return torch.ones_like(radius)
        knots = torch.tensor(self.frequencies, dtype=dtype, device=radius.device)
        values = torch.tensor(self.amplitudes, dtype=dtype, device=radius.device)
        inside = (radius >= knots[0]) & (radius < knots[-1])
        upper = torch.searchsorted(knots, radius.contiguous(), right=True).clamp(1, len(knots) - 1)
        lower = upper - 1
        t = (radius - knots[lower]) / (knots[upper] - knots[lower])
        curve = torch.lerp(values[lower], values[upper], t)
        return torch.where(inside, curve, torch.ones_like(radius))


class RandomFourierDropoutConfig(Config):
    """Random dropout of template Fourier coefficients: accepted only when disabled."""

    enabled: bool = Field(default=False, description="Not supported; must be false.")
    dropout_fraction: float = Field(
        default=0.1, ge=0, le=1, description="Fraction of coefficients."
    )
    seed: int = Field(description="Random seed (required by Leopard-EM).")

    @model_validator(mode="after")
    def _refuse_when_enabled(self) -> RandomFourierDropoutConfig:
        if self.enabled:
            raise _InvalidConfigError(
                "random Fourier dropout is not supported by cryorefine.",
                fix="set preprocessing_filters.random_fourier_dropout.enabled: false.",
                field="enabled",
            )
        return self


class PreprocessingFilters(Config):
    """The Fourier filters applied to the micrograph and to the template projections."""

    whitening_filter: WhiteningFilterConfig = Field(default_factory=WhiteningFilterConfig)
    bandpass_filter: BandpassFilterConfig = Field(default_factory=BandpassFilterConfig)
    phase_randomization_filter: PhaseRandomizationFilterConfig = Field(
        default_factory=PhaseRandomizationFilterConfig
    )
    arbitrary_curve_filter: ArbitraryCurveFilterConfig = Field(
        default_factory=ArbitraryCurveFilterConfig
    )
    random_fourier_dropout: RandomFourierDropoutConfig = Field(
        default_factory=lambda: RandomFourierDropoutConfig.model_validate({"seed": 0})
    )

    def combined_filter(self, micrograph: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Whitening × band-pass × arbitrary curve, on an (h, w) image's half transform.

        Call it with the micrograph's own shape for the micrograph and with the
        template's (h, w) for the projections: the same function of |k| in cycles per
        pixel on each grid. The filters are radial, so the result serves both the
        plain (torch.fft.rfftn) and the centred (engine.fourier) half transforms.

        Args:
            micrograph: real (H, W), the source of the whitening filter.
            shape: (h, w) real-space shape of the images to filter.

        Returns:
            real (h, w // 2 + 1) on the micrograph's device, in its floating dtype.
        """
        dtype = micrograph.dtype if micrograph.is_floating_point() else torch.float32
        device = micrograph.device
        return (
            self.whitening_filter.fourier_filter(micrograph, shape)
            * self.bandpass_filter.fourier_filter(shape, device, dtype)
            * self.arbitrary_curve_filter.fourier_filter(shape, device, dtype)
        )


# --------------------------------------------------------------------------- computation

NonNegativeInt = Annotated[int, Field(ge=0)]
_GPU_ID = re.compile(r"^(cpu|all|cuda|cuda:\d+|\d+)$")

GpuIds = (
    str
    | NonNegativeInt
    | Annotated[list[NonNegativeInt], Field(min_length=1)]
    | Annotated[list[str], Field(min_length=1)]
    | None
)


class _ComputationalConfig(Config):
    """Devices (Leopard-EM's gpu_ids) and the keys cryorefine accepts but does not use."""

    gpu_ids: GpuIds = Field(
        default_factory=lambda: [0],
        description='GPU index, list of indices, "cuda:N" strings, "all", "cpu" or null (CPU).',
    )
    num_cpus: int = Field(default=1, ge=1, description="Accepted for compatibility; not used.")

    @field_validator("gpu_ids")
    @classmethod
    def _known_device_names(cls, value: GpuIds) -> GpuIds:
        names = value if isinstance(value, list) else [value]
        for name in names:
            if isinstance(name, str) and not _GPU_ID.match(name.strip().lower()):
                raise _InvalidConfigError(
                    f"unknown device {name!r}.",
                    fix='use a GPU index (0), a list ([0, 1]), "cuda:N", "all" or "cpu".',
                )
        return value

    def devices(self) -> list[torch.device]:
        """The torch devices `gpu_ids` asks for.

        "cpu" or null: [cpu]; "all": every CUDA device torch sees; an index or
        "cuda:N": that GPU, through `parallel.device.resolve_device`.

        Raises:
            CryorefineError (field computational_config.gpu_ids) where a GPU is asked
            for and torch sees none (or fewer).
        """
        ids = self.gpu_ids
        if ids is None or (isinstance(ids, str) and ids.strip().lower() == "cpu"):
            return [torch.device("cpu")]
        if isinstance(ids, str) and ids.strip().lower() == "all":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            names: list[str | int] = [f"cuda:{i}" for i in range(count)] or ["cuda"]
        else:
            names = list(ids) if isinstance(ids, list) else [ids]
        try:
            return [resolve_device(name) for name in names]
        except CryorefineError as error:
            raise CryorefineError(
                error.problem,
                field="computational_config.gpu_ids",
                fix="set computational_config.gpu_ids: cpu, or run where torch sees the GPU(s).",
            ) from None


class ComputationalConfigMatch(_ComputationalConfig):
    """Compute resources of match-template (Leopard-EM's ComputationalConfigMatch)."""

    backend: Literal["streamed", "batched", "zipfft"] = Field(
        default="streamed", description="Leopard-EM's correlation backend; accepted and ignored."
    )


class ComputationalConfigRefine(_ComputationalConfig):
    """Compute resources of refine/optimize-template (Leopard-EM's ComputationalConfigRefine)."""

    backend: Literal["streamed", "batched"] = Field(
        default="batched", description="Leopard-EM's correlation backend; accepted and ignored."
    )


# --------------------------------------------------------------------------- files in and out


def _refuse_hdf5(value: Any, what: str, fix: str) -> Any:
    if isinstance(value, dict) and "hdf5_path" in value:
        raise _InvalidConfigError(f"{what} in HDF5 is not supported by cryorefine.", fix=fix)
    return value


class MatchTemplateResultMRC(Config):
    """Where match-template writes its maps (Leopard-EM's MatchTemplateResultMRC).

    Output paths need not exist. The scalar keys Leopard-EM writes when it saves a
    result config (leopard_em_version, total_*) are accepted so that such a file
    loads too.
    """

    allow_file_overwrite: bool = Field(
        default=False, description="Overwrite existing result files."
    )
    mip_path: ConfigPath = Field(description="Maximum over the search of the correlation.")
    scaled_mip_path: ConfigPath = Field(description="z-score: (MIP - mean) / std.")
    correlation_average_path: ConfigPath = Field(description="Mean correlation per pixel.")
    correlation_variance_path: ConfigPath = Field(
        description="Standard deviation of the correlation per pixel (Leopard-EM's name)."
    )
    orientation_psi_path: ConfigPath = Field(description="Best psi per pixel (degrees).")
    orientation_theta_path: ConfigPath = Field(description="Best theta/tilt per pixel (degrees).")
    orientation_phi_path: ConfigPath = Field(description="Best phi/rot per pixel (degrees).")
    relative_defocus_path: ConfigPath = Field(description="Best relative defocus per pixel (Å).")
    correlation_table_path: ConfigPath | None = Field(default=None, description="Optional table.")
    leopard_em_version: str | None = Field(
        default=None, description="Written by Leopard-EM; unused."
    )
    total_projections: int = Field(default=0, ge=0, description="Written by Leopard-EM; unused.")
    total_orientations: int = Field(default=0, ge=0, description="Written by Leopard-EM; unused.")
    total_defocus: int = Field(default=0, ge=0, description="Written by Leopard-EM; unused.")

    _MAP_FIELDS: ClassVar[tuple[str, ...]] = (
        "mip_path",
        "scaled_mip_path",
        "correlation_average_path",
        "correlation_variance_path",
        "orientation_psi_path",
        "orientation_theta_path",
        "orientation_phi_path",
        "relative_defocus_path",
    )

    def output_paths(self) -> dict[str, Path]:
        """The eight result maps, by field name (correlation table added when set)."""
        paths = {name: getattr(self, name) for name in self._MAP_FIELDS}
        if self.correlation_table_path is not None:
            paths["correlation_table_path"] = self.correlation_table_path
        return paths

    def check_overwrite(self) -> None:
        """Stop before compute if a result file exists and allow_file_overwrite is false."""
        if self.allow_file_overwrite:
            return
        for path in self.output_paths().values():
            if path.exists():
                raise CryorefineError(
                    "output exists and would be overwritten.",
                    path=path,
                    field="match_template_result.allow_file_overwrite",
                    fix="set match_template_result.allow_file_overwrite: true, or choose "
                    "other output paths.",
                )


class ParticleStackConfig(Config):
    """Particles to refine (Leopard-EM's ParticleStackCSV): a Leopard-EM CSV and box sizes.

    extracted_box_size must be even and larger than original_template_size in both
    dimensions: the refined positions move within the margin.
    """

    df_path: ConfigPath = Field(description="Leopard-EM particle CSV (match/refine output).")
    extracted_box_size: tuple[int, int] = Field(description="(h, w) of extracted boxes (px).")
    original_template_size: tuple[int, int] = Field(description="(h, w) of the template (px).")
    leopard_em_version: str | None = Field(
        default=None, description="Written by Leopard-EM; unused."
    )
    global_whitening_applied: bool = Field(default=False, description="Leopard-EM state flag.")
    local_whitening_applied: bool = Field(default=False, description="Leopard-EM state flag.")
    global_normalization_applied: bool = Field(default=False, description="Leopard-EM state flag.")
    local_normalization_applied: bool = Field(default=False, description="Leopard-EM state flag.")

    @model_validator(mode="after")
    def _box_holds_the_template(self) -> ParticleStackConfig:
        box, template = self.extracted_box_size, self.original_template_size
        if min(template) <= 0:
            raise _InvalidConfigError(
                f"original_template_size must be positive (got {list(template)}).",
                fix="give the template's box size in pixels, e.g. [512, 512].",
                field="original_template_size",
            )
        if any(b % 2 or b <= t for b, t in zip(box, template, strict=True)):
            raise _InvalidConfigError(
                f"extracted_box_size must be even and larger than original_template_size "
                f"in both dimensions (got {list(box)} for a {list(template)} template).",
                fix=f"use an even size a few pixels larger, e.g. "
                f"[{template[0] + 16 + template[0] % 2}, {template[1] + 16 + template[1] % 2}].",
                field="extracted_box_size",
            )
        return self


class MovieConfig(Config):
    """Movie frames for per-frame refinement: accepted only when disabled."""

    enabled: bool = Field(default=False, description="Not supported; must be false.")
    movie_path: str = Field(default="", description="Aligned movie (unused).")
    deformation_field_path: str = Field(default="", description="Deformation field CSV (unused).")
    particle_shifts_path: str = Field(default="", description="Particle shifts CSV (unused).")
    pre_exposure: float = Field(default=0.0, description="Pre-exposure (unused).")
    fluence_per_frame: float = Field(default=1.0, description="Dose per frame (unused).")

    @model_validator(mode="after")
    def _refuse_when_enabled(self) -> MovieConfig:
        if self.enabled:
            raise _InvalidConfigError(
                "movie-frame refinement is not supported by cryorefine.",
                fix="set movie_config.enabled: false (or remove movie_config).",
                field="enabled",
            )
        return self


#: ttsim3d's built-in detector MTF names (ttsim3d 0.4); other values are file paths.
TTSIM3D_MTF_NAMES = (
    "de20_300kv",
    "falcon2_300kv",
    "falcon3EC_200kv",
    "falcon3EC_300kv",
    "falcon4EC_200kv",
    "falcon4EC_300kv",
    "k2_300kv",
    "k2_200kV_FL2",
    "k2_300kV_FL2",
    "k3_200kV_FL2",
    "k3_300kV_FL2",
    "k3_200kV_CDS",
    "k3_300kV_CDS",
)


class SimulatorConfig(Config):
    """Simulation filters of optimize-template's template (ttsim3d's SimulatorConfig).

    Keys, defaults and checks as ttsim3d 0.4; which of them the optimize-template
    program honours is documented there.
    """

    voltage: float = Field(default=300.0, ge=0, description="Acceleration voltage (kV).")
    apply_dose_weighting: bool = Field(default=True, description="Apply dose weighting.")
    crit_exposure_bfactor: float = Field(default=-1, description="-1 = Grant & Grigorieff 2015.")
    dose_filter_modify_signal: Literal["None", "sqrt", "rel_diff"] = Field(
        default="None", description="Modification of the dose filter."
    )
    dose_start: float = Field(default=0.0, ge=0, description="Start of the exposure (e⁻/Å²).")
    dose_end: float = Field(default=30.0, ge=0, description="End of the exposure (e⁻/Å²).")
    apply_dqe: bool = Field(default=True, description="Apply the detector's DQE/MTF.")
    mtf_reference: str = Field(
        default="k2_300kv", description="A ttsim3d MTF name or an MTF STAR file path."
    )
    upsampling: int = Field(default=-1, description="Upsampling factor; -1 = automatic.")
    store_volume: bool = Field(default=True, description="ttsim3d memory option; unused.")
    atom_batch_size: int = Field(default=16384, description="ttsim3d memory option; unused.")

    @field_validator("mtf_reference")
    @classmethod
    def _name_or_path(cls, value: str, info: ValidationInfo) -> str:
        if value in TTSIM3D_MTF_NAMES:
            return value
        return str(_resolve_against_config_folder(Path(value), info))

    def mtf_file(self) -> Path | None:
        """The MTF reference as a file path, or None when it is a ttsim3d built-in name."""
        return None if self.mtf_reference in TTSIM3D_MTF_NAMES else Path(self.mtf_reference)


class Simulator(Config):
    """The template optimize-template simulates from atoms (ttsim3d's Simulator)."""

    pixel_spacing: float = Field(default=1.0, gt=0, description="Nominal voxel size (Å).")
    volume_shape: tuple[int, int, int] = Field(
        default=(400, 400, 400), description="Box of the simulated volume (voxels)."
    )
    pdb_filepath: ConfigPath = Field(description="Atomic model (PDB or mmCIF).")
    center_atoms: bool = Field(default=True, description="Centre the atoms on their mean position.")
    remove_hydrogens: bool = Field(default=True, description="Drop hydrogen atoms.")
    b_factor_scaling: float = Field(default=1.0, description="Factor on the atoms' B-factors.")
    additional_b_factor: float = Field(default=0.0, description="Added to every B-factor (Å²).")
    simulator_config: SimulatorConfig


# --------------------------------------------------------------------------- programs

#: cryorefine extension: particles darker than the background as recorded ("dark", the
#: default), or white ("bright": inverted or simulated micrographs).
ParticleContrast = Literal["dark", "bright"]

_CONTRAST_DOC = "cryorefine: dark (as recorded) or bright (inverted/simulated) particles."


class TemplateProgramConfig(Config):
    """Shared by the three program configs: their input files and devices."""

    _INPUT_FILES: ClassVar[tuple[str, ...]] = ()

    def input_files(self) -> dict[str, Path]:
        """Input files that must exist, by dotted field name (unset optional ones left out)."""
        files: dict[str, Path] = {}
        for dotted in self._INPUT_FILES:
            value: Any = self
            for part in dotted.split("."):
                value = getattr(value, part)
            if value is not None:
                files[dotted] = Path(value)
        return files

    def devices(self) -> list[torch.device]:
        """`computational_config.devices()`."""
        computational: _ComputationalConfig = getattr(self, "computational_config")  # noqa: B009
        return computational.devices()


class MatchTemplateConfig(TemplateProgramConfig):
    """`cryorefine match-template`: Leopard-EM 1.3.0's MatchTemplateManager keys + extensions.

    Extensions (all optional): `micrographs_star` replaces `micrograph_path` +
    `optics_group` with a RELION micrographs STAR file (per-micrograph CTF; exactly
    one of micrograph_path and micrographs_star), `false_alarms_per_micrograph` sets
    the detection threshold, `peak_exclusion_radius_pixels` the minimum distance
    between picks (default: half the template box), `orientation_batch_size` the
    views per batch (default: as many as fit in memory), `checkpoint_every_seconds`
    how often the search state is saved, `particle_contrast` whether particles are
    dark (as recorded, the default) or bright (inverted or simulated micrographs).
    """

    _INPUT_FILES: ClassVar[tuple[str, ...]] = (
        "template_volume_path",
        "micrograph_path",
        "micrographs_star",
    )

    template_volume_path: ConfigPath = Field(description="Template map (MRC).")
    micrograph_path: ConfigPath | None = Field(
        default=None, description="Micrograph to search (MRC)."
    )
    optics_group: OpticsGroup | None = Field(
        default=None, description="Optics and CTF of micrograph_path (required with it)."
    )
    defocus_search_config: DefocusSearchConfig
    orientation_search_config: OrientationSearch
    preprocessing_filters: PreprocessingFilters
    match_template_result: MatchTemplateResultMRC
    computational_config: ComputationalConfigMatch

    micrographs_star: ConfigPath | None = Field(
        default=None, description="cryorefine: RELION micrographs STAR with per-micrograph CTF."
    )
    false_alarms_per_micrograph: float = Field(
        default=1.0, gt=0, description="cryorefine: expected noise peaks above the threshold."
    )
    peak_exclusion_radius_pixels: float | None = Field(
        default=None, gt=0, description="cryorefine: minimum pick distance (px); null = box // 2."
    )
    orientation_batch_size: int | None = Field(
        default=None, ge=1, description="cryorefine: views per batch; null = fit memory."
    )
    checkpoint_every_seconds: float = Field(
        default=60.0, gt=0, description="cryorefine: seconds between checkpoints."
    )
    particle_contrast: ParticleContrast = Field(default="dark", description=_CONTRAST_DOC)

    @field_validator("match_template_result", mode="before")
    @classmethod
    def _mrc_results_only(cls, value: Any) -> Any:
        return _refuse_hdf5(
            value,
            "writing the match-template result",
            "give the eight MRC paths (mip_path, scaled_mip_path, ...) instead of hdf5_path.",
        )

    @model_validator(mode="after")
    def _one_micrograph_source(self) -> MatchTemplateConfig:
        if (self.micrograph_path is None) == (self.micrographs_star is None):
            given = "both" if self.micrograph_path is not None else "neither"
            raise _InvalidConfigError(
                f"{given} of micrograph_path and micrographs_star given; exactly one is needed.",
                fix="give micrograph_path (one MRC, with optics_group) or micrographs_star "
                "(a RELION micrographs STAR file with CTF values).",
                field="micrograph_path",
            )
        if self.micrograph_path is not None and self.optics_group is None:
            raise _InvalidConfigError(
                "micrograph_path needs an optics_group (pixel size, voltage, CTF).",
                fix="add the optics_group block of Leopard-EM's example config.",
                field="optics_group",
            )
        if self.micrographs_star is not None and self.optics_group is not None:
            raise _InvalidConfigError(
                "optics_group and micrographs_star both give the CTF; only one may.",
                fix="remove optics_group: with micrographs_star the optics and CTF come "
                "from the STAR file.",
                field="optics_group",
            )
        return self

    def orientations(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(n, 3) float64 (rot, tilt, psi) in degrees of the global search."""
        return self.orientation_search_config.orientations(device)

    def peak_exclusion_radius(self, template_box_pixels: int) -> float:
        """Minimum distance between picks (px): the configured value, else box // 2."""
        if self.peak_exclusion_radius_pixels is not None:
            return float(self.peak_exclusion_radius_pixels)
        return float(template_box_pixels // 2)


def _csv_particles_only(value: Any) -> Any:
    return _refuse_hdf5(
        value,
        "a particle stack",
        "give df_path (a Leopard-EM particle CSV) instead of hdf5_path.",
    )


class RefineTemplateConfig(TemplateProgramConfig):
    """`cryorefine refine-template`: Leopard-EM 1.3.0's RefineTemplateManager keys.

    Extension (optional): `particle_contrast`, as for MatchTemplateConfig.
    """

    _INPUT_FILES: ClassVar[tuple[str, ...]] = ("template_volume_path", "particle_stack.df_path")

    template_volume_path: ConfigPath = Field(description="Template map (MRC).")
    particle_stack: ParticleStackConfig
    defocus_refinement_config: DefocusSearchConfig
    pixel_size_refinement_config: PixelSizeSearchConfig
    orientation_refinement_config: RefineOrientationConfig
    preprocessing_filters: PreprocessingFilters
    computational_config: ComputationalConfigRefine
    movie_config: MovieConfig = Field(
        default_factory=MovieConfig, description="Must be disabled; may be left out."
    )
    apply_global_filtering: bool = Field(
        default=True, description="Filter the whole micrograph before extraction (else each box)."
    )
    particle_contrast: ParticleContrast = Field(default="dark", description=_CONTRAST_DOC)

    @field_validator("particle_stack", mode="before")
    @classmethod
    def _particles_from_csv(cls, value: Any) -> Any:
        return _csv_particles_only(value)


class OptimizeTemplateConfig(TemplateProgramConfig):
    """`cryorefine optimize-template`: Leopard-EM 1.3.0's OptimizeTemplateManager keys.

    Extension (optional): `particle_contrast`, as for MatchTemplateConfig.
    """

    _INPUT_FILES: ClassVar[tuple[str, ...]] = (
        "particle_stack.df_path",
        "simulator.pdb_filepath",
    )

    particle_stack: ParticleStackConfig
    pixel_size_coarse_search: PixelSizeSearchConfig
    pixel_size_fine_search: PixelSizeSearchConfig
    preprocessing_filters: PreprocessingFilters
    computational_config: ComputationalConfigRefine
    simulator: Simulator
    apply_global_filtering: bool = Field(
        default=True, description="Filter the whole micrograph before extraction (else each box)."
    )
    particle_contrast: ParticleContrast = Field(default="dark", description=_CONTRAST_DOC)

    @field_validator("particle_stack", mode="before")
    @classmethod
    def _particles_from_csv(cls, value: Any) -> Any:
        return _csv_particles_only(value)

    def input_files(self) -> dict[str, Path]:
        files = super().input_files()
        mtf_file = self.simulator.simulator_config.mtf_file()
        if mtf_file is not None:
            files["simulator.simulator_config.mtf_reference"] = mtf_file
        return files


# --------------------------------------------------------------------------- loading

TemplateConfigT = TypeVar("TemplateConfigT", bound=TemplateProgramConfig)


def _model_under(model: type[BaseModel], location: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that validates the mapping at `location` below `model`."""
    current: type[BaseModel] | None = model
    for part in location:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        if part in _UNION_TAGS:
            current = _UNION_TAGS[part]
            continue
        field = current.model_fields.get(str(part))
        current = None if field is None else _first_model_in(field.annotation)
    return current


def _first_model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _first_model_in(argument)
        if found is not None:
            return found
    return None


def _clear_error(
    error: ValidationError, model: type[BaseModel], source: Path | None
) -> CryorefineError:
    """The first problem of a pydantic error as one CryorefineError (file, field, fix)."""
    first = error.errors()[0]
    location = tuple(first["loc"])
    names = [str(part) for part in location if part not in _UNION_TAGS]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, _InvalidConfigError):
        field = ".".join(names + ([cause.field] if cause.field else [])) or None
        return CryorefineError(cause.problem, path=source, field=field, fix=cause.fix)
    field = ".".join(names) or "<root>"
    if first["type"] == "extra_forbidden":
        parent = _model_under(model, location[:-1])
        known = ", ".join(sorted(parent.model_fields)) if parent is not None else "see the docs"
        return CryorefineError(
            "unknown key.",
            path=source,
            field=field,
            fix=f"remove or rename the key; the keys allowed here are: {known}.",
        )
    if first["type"] == "missing":
        return CryorefineError(
            "required but not given.",
            path=source,
            field=field,
            fix="add the key (see Leopard-EM 1.3.0's example configs).",
        )
    message = first["msg"].removeprefix("Value error, ")
    return CryorefineError(
        f"{message} (got {first.get('input')!r}).",
        path=source,
        field=field,
        fix="correct the value and run again.",
    )


def validate_template_config(
    model: type[TemplateConfigT],
    values: dict[str, Any],
    config_folder: str | Path | None = None,
    source: str | Path | None = None,
) -> TemplateConfigT:
    """Build a program config from a mapping, with one clear error for a bad value.

    Args:
        model: MatchTemplateConfig, RefineTemplateConfig or OptimizeTemplateConfig.
        values: the YAML mapping.
        config_folder: relative paths are taken from here (None: left as given).
        source: the file the values came from, for messages.
    """
    context = {_CONFIG_FOLDER: Path(config_folder)} if config_folder is not None else None
    try:
        return model.model_validate(values, context=context)
    except ValidationError as error:
        raise _clear_error(error, model, None if source is None else Path(source)) from None


def load_template_config(
    model: type[TemplateConfigT],
    path: str | Path,
    overrides: dict[str, Any] | None = None,
) -> TemplateConfigT:
    """Read a Leopard-EM-style YAML into a program config, ready to run.

    Paths in the file are relative to its folder when not absolute; top-level
    `overrides` (e.g. from command-line flags; None values ignored) replace keys of
    the file before validation. Every input file (template, micrograph or STAR,
    particle CSV, PDB, MTF file) must exist; outputs need not.

    Raises:
        CryorefineError naming the file, the field and the fix, for a missing or
        malformed file, an unknown key, a bad value or a missing input file.
    """
    path = Path(path)
    values = read_yaml(path)
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    config = validate_template_config(
        model, values, config_folder=path.absolute().parent, source=path
    )
    for field, file in config.input_files().items():
        try:
            require_file(file, "input file")
        except CryorefineError as error:
            raise CryorefineError(
                f"input file not found (named in {path}).",
                path=error.path,
                field=field,
                fix="check the path; relative paths are read from the config file's folder.",
            ) from None
    return config
