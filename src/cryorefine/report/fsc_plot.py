"""FSC curves as a PNG (matplotlib, no display needed), written atomically."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cryorefine.io.atomic import atomic_write


def plot_fsc_curves(
    path: str | Path,
    frequency_per_angstrom: np.ndarray,
    curves: Mapping[str, np.ndarray],
    threshold: float | None = 0.143,
    resolution_angstrom: float | None = None,
    title: str = "Fourier shell correlation",
    overwrite: bool = False,
) -> Path:
    """Plot FSC curves against spatial frequency and write them as an image.

    Args:
        path: output image (.png; the format follows the suffix).
        frequency_per_angstrom: (n,) shell frequencies, 1/Å.
        curves: label -> (n,) FSC values, drawn in order.
        threshold: a horizontal line at this FSC (None: none).
        resolution_angstrom: a vertical line at 1 / this, labelled in Å (None: none).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, values in curves.items():
        axes.plot(frequency_per_angstrom, values, label=label, linewidth=1.5)
    if threshold is not None:
        axes.axhline(
            threshold, color="grey", linestyle=":", linewidth=1, label=f"FSC {threshold:g}"
        )
    if resolution_angstrom is not None and np.isfinite(resolution_angstrom):
        axes.axvline(
            1.0 / resolution_angstrom,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"{resolution_angstrom:.3g} Å",
        )
    axes.axhline(0.0, color="black", linewidth=0.5)
    axes.set_xlim(0.0, float(frequency_per_angstrom[-1]))
    axes.set_ylim(-0.1, 1.05)
    axes.set_xlabel("spatial frequency (1/Å)")
    axes.set_ylabel("FSC")
    axes.set_title(title)
    axes.legend(loc="upper right", fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    try:
        return atomic_write(path, lambda temporary: figure.savefig(temporary), overwrite=overwrite)
    finally:
        plt.close(figure)
