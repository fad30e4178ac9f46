"""Program configurations: strict pydantic models read from YAML, saved beside outputs.

Every program's config derives from `Config`, which rejects unknown keys, so a typo
fails at load time (naming the file, the key and the rule) rather than after compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from cryorefine.engine.symmetry import VALID_SYMMETRY_NAMES, canonical_symmetry_name
from cryorefine.errors import CryorefineError, require_file

ConfigT = TypeVar("ConfigT", bound="Config")


def _known_symmetry(value: str) -> str:
    try:
        return canonical_symmetry_name(value)
    except CryorefineError as error:
        raise ValueError(f"{error.problem} Use one of {VALID_SYMMETRY_NAMES}") from None


#: A RELION point-group name, validated and made canonical at load (C1, D2, O, I, ...).
SymmetryName = Annotated[str, AfterValidator(_known_symmetry)]


class Config(BaseModel):
    """Base of all program configs: unknown keys are errors, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _describe_validation_error(error: ValidationError) -> tuple[str, str]:
    """First problem of a pydantic error as (dotted field name, message)."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return field, "unknown key."
    if first["type"] == "missing":
        return field, "required but not given."
    message = first["msg"].removeprefix("Value error, ")
    return field, f"{message} (got {first.get('input')!r})."


def validate_config(
    model: type[ConfigT], values: dict[str, Any], source: str | Path | None = None
) -> ConfigT:
    """Build `model` from `values`, turning a validation failure into one clear error."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        field, problem = _describe_validation_error(error)
        allowed = ", ".join(sorted(model.model_fields))
        fix = (
            f"remove or rename the key; known keys are: {allowed}."
            if problem == "unknown key."
            else "correct the value and run again."
        )
        raise CryorefineError(problem, path=source, field=field, fix=fix) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one clear error for a missing or malformed file."""
    path = Path(path)
    path = require_file(path, "file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise CryorefineError(
            f"not valid YAML ({error}).", path=path, fix="correct the YAML syntax."
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CryorefineError(
            "expected a mapping of keys to values at the top level.",
            path=path,
            fix="write the config as `key: value` lines.",
        )
    return data


def load_config(
    model: type[ConfigT], path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> ConfigT:
    """Config from an optional YAML file, with command-line `overrides` taking precedence."""
    values: dict[str, Any] = read_yaml(path) if path is not None else {}
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return validate_config(model, values, source=path)


def save_resolved_config(config: Config, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (atomically) so a result can be reproduced."""
    from cryorefine.io.atomic import atomic_write_text

    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return atomic_write_text(Path(path), text, overwrite=True)
