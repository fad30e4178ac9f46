"""Fourier shell (ring) correlation of two maps and its resolution at a threshold.

Shells are 1 / N cycles per pixel wide, N the box size (the largest axis): shell i
holds the Fourier samples with |k| N in [i − ½, i + ½) and stands for |k| = i / N,
i = 0 .. N // 2 (Nyquist). Samples beyond Nyquist (the corners) are left out.
"""

from __future__ import annotations

import torch

from cryorefine.engine.fourier import radial_frequency, rfft_column_weights


def shell_frequencies(
    size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """|k| of each FSC shell of a box of `size` pixels: (size // 2 + 1,) i / size, cycles/pixel."""
    return torch.arange(size // 2 + 1, device=device, dtype=dtype) / size


def fourier_shell_correlation(
    map_a: torch.Tensor, map_b: torch.Tensor, ndim: int | None = None
) -> torch.Tensor:
    """FSC_i = Re Σ A B* / √(Σ |A|² Σ |B|²) over each shell of two real maps.

    Args:
        map_a, map_b: real (..., [d], h, w) maps or images, broadcastable.
        ndim: 2 (images) or 3 (volumes); by default the number of axes of map_a,
            which must then be 2 or 3 (pass it for batches).

    Returns:
        (..., N // 2 + 1) correlation per shell (`shell_frequencies(N)`), N the
        largest axis; 0 in a shell where either map has no power.
    """
    ndim = map_a.dim() if ndim is None else ndim
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim} (map of shape {tuple(map_a.shape)})")
    shape = tuple(map_a.shape[-ndim:])
    dims = tuple(range(-ndim, 0))
    # Plain rfft: a common origin shift multiplies A and B by the same phase, so
    # A B* and the FSC do not depend on where the origin is.
    a = torch.fft.rfftn(map_a, dim=dims)
    b = torch.fft.rfftn(map_b, dim=dims)
    size = max(shape)
    n_shells = size // 2 + 1
    radius = radial_frequency(shape, rfft=True, device=a.device, dtype=torch.float64)
    shells = torch.floor(radius * size + 0.5).long()
    inside = (shells < n_shells).reshape(-1)
    shells = shells.reshape(-1)[inside]
    # rfft columns 1 .. (w − 1) // 2 stand for their mirrors too; Re(A B*) and |A|²
    # are the same at a sample and its mirror, so a weight of 2 is exact.
    weight = rfft_column_weights(shape[-1], device=a.device, dtype=a.real.dtype)
    weight = weight.expand(radius.shape).reshape(-1)[inside]

    def shell_sum(values: torch.Tensor) -> torch.Tensor:
        flat = values.reshape(*values.shape[:-ndim], -1)[..., inside] * weight
        zeros = torch.zeros(*flat.shape[:-1], n_shells, device=flat.device, dtype=flat.dtype)
        return zeros.index_add(-1, shells, flat)

    cross = shell_sum((a * b.conj()).real)
    power_a = shell_sum(a.real.square() + a.imag.square())
    power_b = shell_sum(b.real.square() + b.imag.square())
    denominator = torch.sqrt(power_a * power_b)
    safe = denominator > 0
    return torch.where(safe, cross / torch.where(safe, denominator, 1.0), 0.0)


def resolution_at_threshold(
    fsc: torch.Tensor,
    frequencies: torch.Tensor,
    pixel_size_angstrom: float,
    threshold: float = 0.143,
) -> torch.Tensor:
    """Resolution where an FSC curve first falls below `threshold`.

    The crossing frequency is linearly interpolated between the last shell at or
    above the threshold and the first one below it.

    Args:
        fsc: (..., n) FSC per shell.
        frequencies: (n,) shell frequencies in cycles per pixel (`shell_frequencies`).
        pixel_size_angstrom: pixel size in Å.
        threshold: the FSC value that defines the resolution (0.143 gold standard).

    Returns:
        (...) resolution in Å: pixel_size / crossing frequency; the Nyquist
        resolution (pixel_size / frequencies[-1]) if the curve never falls below;
        infinity if the first shell is already below.
    """
    frequencies = frequencies.to(device=fsc.device, dtype=fsc.dtype)
    below = fsc < threshold
    crosses = below.any(dim=-1)
    first = torch.argmax(below.to(torch.uint8), dim=-1)
    upper = first.clamp(min=1)
    lower = upper - 1
    f_lower, f_upper = frequencies[lower], frequencies[upper]
    v_lower = fsc.gather(-1, lower.unsqueeze(-1)).squeeze(-1)
    v_upper = fsc.gather(-1, upper.unsqueeze(-1)).squeeze(-1)
    fraction = (v_lower - threshold) / (v_lower - v_upper)
    crossing = f_lower + fraction * (f_upper - f_lower)
    crossing = torch.where(first == 0, torch.zeros_like(crossing), crossing)
    crossing = torch.where(crosses, crossing, frequencies[-1].expand_as(crossing))
    return pixel_size_angstrom / crossing
