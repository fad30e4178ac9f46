"""Device choice: CPU always works; CUDA asked for without a GPU is one clear error."""

from __future__ import annotations

import pytest
import torch

from cryorefine.errors import CryorefineError
from cryorefine.parallel.device import resolve_device


def test_cpu_and_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(CryorefineError, match="--device cpu"):
        resolve_device("cuda")
    with pytest.raises(CryorefineError, match="CUDA device"):
        resolve_device(1)


def test_unknown_device_names_the_field() -> None:
    with pytest.raises(CryorefineError, match="field 'device'"):
        resolve_device("tpu-7")
