"""Per-pixel statistics of a correlation search, kept while the search runs.

A 2DTM search computes one correlation map per (defocus plane, orientation): far
too many to keep. Per pixel it keeps the maximum over the search (the MIP), which
search position gave it, and the running sum and sum of squares, from which the
mean and standard deviation of the correlation over the search follow and the
z-score (MIP − mean) / std normalises each pixel by its own noise.

Search positions are numbered once for the whole search (`search_index` =
plane · n_orientations + orientation), so decoding a best position never depends
on how the search was cut into batches.

The maximum and the sum of squares need every map (`fold`). The sum is linear in
the maps, so a caller that knows a cheaper way to it (the 2DTM search correlates
the micrograph once with the sum of its templates) adds it with `add_to_total`;
`update` does both for maps at hand.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Maps whose squares are summed in float32 before joining the float64 totals.
FLUSH_EVERY = 64

#: Maps folded into the statistics in one pass over the running maps.
FOLD_GROUP = 4

#: Map pixels (maps × pixels per map) from which a search compiles its fold: the
#: compile costs ~5 CPU-s per process (15 the first time on a machine), the eager
#: fold ~2 ns more per map pixel than the compiled one (1024², one core).
COMPILE_FROM_PIXEL_MAPS = 2 * 10**9

_log = logging.getLogger(__name__)


def _fold_chain(
    maps: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    mip: torch.Tensor,
    best_index: torch.Tensor,
    squares: torch.Tensor,
) -> None:
    """Fold scales[g] · maps[g], g = 0 … G − 1 in order, into mip, best_index, squares.

    One chain of element-wise steps, for inductor to fuse into a single pass over
    the G maps and the three running maps.
    """
    best, which, total = mip, best_index, squares
    for g in range(maps.shape[0]):
        scaled = maps[g] * scales[g]
        better = scaled > best  # strict: a tie keeps the earlier map
        which = torch.where(better, indices[g], which)
        best = torch.where(better, scaled, best)
        total = total + scaled * scaled
    mip.copy_(best)
    best_index.copy_(which)
    squares.copy_(total)


def _fold_eager(
    maps: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    mip: torch.Tensor,
    best_index: torch.Tensor,
    squares: torch.Tensor,
) -> None:
    """`_fold_chain` with in-place steps, uncompiled; scales the maps in place."""
    maps.mul_(scales[:, None, None])
    for map_, index in zip(maps, indices, strict=True):
        best_index.masked_fill_(map_ > mip, index)  # strict: a tie keeps the earlier map
        torch.maximum(mip, map_, out=mip)
        squares.addcmul_(map_, map_)


_compiled_fold: Callable[..., None] | None = None
_compile_failed = False


def compile_pays_off(n_maps: int, pixels_per_map: int) -> bool:
    """Whether a search of n_maps maps should fold with the compiled kernel.

    CRYOREFINE_COMPILE=1 always compiles, 0 never; unset (auto) from
    COMPILE_FROM_PIXEL_MAPS on. A compile that failed once is not tried again.
    """
    setting = os.environ.get("CRYOREFINE_COMPILE", "auto")
    if setting == "0" or _compile_failed:
        return False
    return setting == "1" or n_maps * pixels_per_map >= COMPILE_FROM_PIXEL_MAPS


def _fold(compiled: bool, *tensors: torch.Tensor) -> None:
    """Fold a group with the compiled chain or the eager steps.

    Compiled (CPU, full groups of a search large enough to repay the compile): one
    fused pass, 0.3 instead of 1.5 ms per 1024² map. A compile that fails (no C++
    compiler) falls back to eager once, with a warning. On CUDA the eager kernels
    are fast already.
    """
    global _compiled_fold, _compile_failed
    maps = tensors[0]
    fused = compiled and maps.device.type == "cpu" and maps.shape[0] == FOLD_GROUP
    if not fused or _compile_failed:
        _fold_eager(*tensors)
        return
    if _compiled_fold is None:
        _compiled_fold = torch.compile(_fold_chain, dynamic=True)
    try:
        _compiled_fold(*tensors)
    except Exception as error:  # a compiler failure of any kind means: run eagerly
        _compile_failed = True
        _log.warning("compiling the statistics update failed (%s); running it eagerly", error)
        _fold_eager(*tensors)


@dataclass
class SearchStatistics:
    """Running per-pixel statistics of correlation maps of shape (H, W).

    Attributes:
        mip: float32 (H, W) maximum correlation so far (−inf before any fold).
        best_index: int32 (H, W) search index of that maximum (−1 before any fold).
        total: float64 (H, W) sum of the correlations added so far.
        total_squares: float64 (H, W) sum of their squares.
        count: number of correlation maps folded in.
        template_sums: the 2DTM search's sums of weighted templates whose
            correlations are still to be added to `total` (`template_search`), or None.
    """

    mip: torch.Tensor
    best_index: torch.Tensor
    total: torch.Tensor
    total_squares: torch.Tensor
    count: int = 0
    template_sums: torch.Tensor | None = None
    # Squares are summed in float32 for up to FLUSH_EVERY maps before joining the
    # float64 sum: a float64 read-modify-write per map would cost a pass of its own.
    partial_squares: torch.Tensor | None = None
    pending: int = 0

    @classmethod
    def empty(
        cls, shape: tuple[int, int], device: torch.device | str | None = None
    ) -> SearchStatistics:
        """Statistics of no maps yet, for maps of shape (H, W)."""
        return cls(
            mip=torch.full(shape, -torch.inf, dtype=torch.float32, device=device),
            best_index=torch.full(shape, -1, dtype=torch.int32, device=device),
            total=torch.zeros(shape, dtype=torch.float64, device=device),
            total_squares=torch.zeros(shape, dtype=torch.float64, device=device),
        )

    def fold(
        self,
        maps: torch.Tensor,
        scales: torch.Tensor,
        indices: torch.Tensor,
        rows: slice = slice(None),
        compiled: bool = False,
    ) -> None:
        """Fold scales[g] · maps[g] into the maximum and the sum of squares (not the sum).

        Args:
            maps: float32 (G, R, W), the rows `rows` of G correlation maps, in search
                order: a tie keeps the earlier map, so results do not depend on
                batching. Scratch: they may be overwritten.
            scales: float32 (G,) factor of each map (e.g. 1 / template norm).
            indices: int32 (G,) search index of each map.
            rows: the rows of the (H, W) statistics the maps cover; the others keep
                their state (pixels no map reaches: outside the valid region).
            compiled: use the compiled kernel on a CPU (`compile_pays_off`).
        """
        if self.partial_squares is None:
            self.partial_squares = torch.zeros_like(self.mip)
        _fold(
            compiled,
            maps,
            scales.to(maps.dtype),
            indices.to(torch.int32),
            self.mip[rows],
            self.best_index[rows],
            self.partial_squares[rows],
        )
        self.pending += maps.shape[0]
        self.count += maps.shape[0]
        if self.pending >= FLUSH_EVERY:
            self.flush()

    def add_to_total(self, sum_of_maps: torch.Tensor) -> None:
        """Add the sum (H, W) of maps folded in (or to be) to the running sum."""
        self.total += sum_of_maps.to(self.total.dtype)

    def update(self, correlations: torch.Tensor, first_index: int) -> None:
        """Fold in maps (B, H, W) of search indices first_index, first_index + 1, …, sum too."""
        indices = torch.arange(len(correlations), device=correlations.device) + first_index
        scales = torch.ones(len(correlations), device=correlations.device)
        self.fold(correlations.float().clone(), scales, indices)
        self.add_to_total(correlations.double().sum(dim=0))

    def flush(self) -> None:
        """Move the float32 partial squares into the float64 running sum."""
        if self.partial_squares is not None and self.pending:
            self.total_squares += self.partial_squares
            self.partial_squares.zero_()
        self.pending = 0

    def _finished(self) -> int:
        if self.template_sums is not None:
            raise RuntimeError("the search's template sums are not yet added to the total")
        self.flush()
        return max(self.count, 1)

    def mean(self) -> torch.Tensor:
        """float32 (H, W) mean correlation over the search."""
        return (self.total / self._finished()).float()

    def std(self) -> torch.Tensor:
        """float32 (H, W) standard deviation (population) of the correlation over the search."""
        n = self._finished()
        mean = self.total / n
        variance = (self.total_squares / n - mean.square()).clamp(min=0.0)
        return variance.sqrt().float()

    def z_score(
        self, mean: torch.Tensor | None = None, std: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 (H, W) (MIP − mean) / std: the MIP in units of the pixel's own noise.

        `mean` and `std` may be passed when already computed (whole micrographs).
        """
        mean = self.mean() if mean is None else mean
        std = self.std() if std is None else std
        tiny = torch.finfo(std.dtype).tiny
        return torch.where(std > 0, (self.mip - mean) / std.clamp(min=tiny), 0.0)

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Everything needed to continue the search later (tensors on the CPU)."""
        self.flush()
        state: dict[str, torch.Tensor | int] = {
            "mip": self.mip.cpu(),
            "best_index": self.best_index.cpu(),
            "total": self.total.cpu(),
            "total_squares": self.total_squares.cpu(),
            "count": self.count,
        }
        if self.template_sums is not None:
            state["template_sums"] = self.template_sums.cpu()
        return state

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor | int], device: torch.device | str | None = None
    ) -> SearchStatistics:
        """Inverse of `state_dict`, on `device`."""

        def tensor(name: str) -> torch.Tensor:
            value = state[name]
            assert isinstance(value, torch.Tensor)
            return value.to(device)

        return cls(
            mip=tensor("mip"),
            best_index=tensor("best_index"),
            total=tensor("total"),
            total_squares=tensor("total_squares"),
            count=int(state["count"]),
            template_sums=tensor("template_sums") if "template_sums" in state else None,
        )
