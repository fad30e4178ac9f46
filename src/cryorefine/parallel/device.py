"""Device choice: CPU by default, CUDA when asked for and present."""

from __future__ import annotations

import torch

from cryorefine.errors import CryorefineError


def resolve_device(name: str | int | None = "cpu") -> torch.device:
    """The torch device for a user's `--device` value.

    Args:
        name: "cpu", "cuda", "cuda:N", an integer GPU index, "auto" (CUDA when
            present, else CPU) or None (CPU).

    Raises:
        CryorefineError: CUDA asked for where torch sees no GPU, or an unknown name.
    """
    if name is None:
        return torch.device("cpu")
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.isdigit():
        text = f"cuda:{text}"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise CryorefineError(
            f"unknown device {name!r}.",
            field="device",
            fix="use cpu, cuda, cuda:N or auto.",
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            raise CryorefineError(
                f"{name!r} asked for, but torch sees {count} CUDA device(s).",
                field="device",
                fix="use --device cpu, or install a CUDA build of torch on a GPU machine.",
            )
    elif device.type != "cpu":
        raise CryorefineError(
            f"device type {device.type!r} is not supported.", field="device", fix="use cpu or cuda."
        )
    return device
