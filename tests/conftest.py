"""Shared fixtures: every engine test runs on CPU, and on CUDA too where present."""

from __future__ import annotations

import shutil

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device an engine test runs on; results are compared to float32 tolerance."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def relion_bin() -> str:
    """Path of RELION's binaries' folder; skips (with a message) where RELION is absent."""
    found = shutil.which("relion_project")
    if found is None:
        pytest.skip("RELION 3.1 is not installed (apt-get install relion); .ci/run installs it.")
    return found.rsplit("/", 1)[0]
