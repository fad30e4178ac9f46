"""Configs fail at load, naming the file, the field and the rule; resolved configs round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from cryorefine.config import Config, load_config, save_resolved_config
from cryorefine.errors import CryorefineError


class ExampleConfig(Config):
    pixel_size_angstrom: float = Field(1.0, gt=0, description="Pixel size (Å).")
    box_size: int = Field(64, gt=0, description="Box size (pixels).")


def test_unknown_key_names_file_key_and_known_keys(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("pixel_size_angstrom: 1.2\nbox_sise: 64\n")
    with pytest.raises(CryorefineError) as caught:
        load_config(ExampleConfig, path)
    message = caught.value.message
    assert str(path) in message
    assert "box_sise" in message
    assert "unknown key" in message
    assert "box_size" in message  # the fix lists the known keys


def test_negative_pixel_size_names_field_and_value(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("pixel_size_angstrom: -1.5\n")
    with pytest.raises(CryorefineError) as caught:
        load_config(ExampleConfig, path)
    assert "pixel_size_angstrom" in caught.value.message
    assert "-1.5" in caught.value.message
    assert "greater than 0" in caught.value.message


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("pixel_size_angstrom: [1.0\n")
    with pytest.raises(CryorefineError, match="not valid YAML"):
        load_config(ExampleConfig, broken)
    with pytest.raises(CryorefineError, match="file not found"):
        load_config(ExampleConfig, tmp_path / "absent.yaml")


def test_overrides_take_precedence_and_resolved_config_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("pixel_size_angstrom: 1.2\nbox_size: 32\n")
    config = load_config(
        ExampleConfig, path, overrides={"box_size": 48, "pixel_size_angstrom": None}
    )
    assert config == ExampleConfig(pixel_size_angstrom=1.2, box_size=48)
    saved = save_resolved_config(config, tmp_path / "out" / "config.yaml")
    assert load_config(ExampleConfig, saved) == config


class NeedsOutput(Config):
    output: str


def test_missing_required_key_says_so(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("{}\n")
    with pytest.raises(CryorefineError) as caught:
        load_config(NeedsOutput, path)
    assert "field 'output'" in caught.value.message
    assert "required but not given" in caught.value.message
