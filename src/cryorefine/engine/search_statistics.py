"""Per-pixel statistics of a correlation search, kept while the search runs.

A 2DTM search computes one correlation map per (defocus plane, orientation): far
too many to keep. Per pixel it keeps the maximum over the search (the MIP), which
search position gave it, and the running sum and sum of squares, from which the
mean and standard deviation of the correlation over the search follow and the
z-score (MIP − mean) / std normalises each pixel by its own noise.

Search positions are numbered once for the whole search (`search_index` =
plane · n_orientations + orientation), so decoding a best position never depends
on how the search was cut into batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Maps summed in float32 before their sums join the float64 totals.
FLUSH_EVERY = 64


@dataclass
class SearchStatistics:
    """Running per-pixel statistics of correlation maps of shape (H, W).

    Attributes:
        mip: float32 (H, W) maximum correlation so far (−inf before any update).
        best_index: int64 (H, W) search index of that maximum (−1 before any update).
        total: float64 (H, W) sum of the correlations.
        total_squares: float64 (H, W) sum of their squares.
        count: number of correlation maps accumulated.
    """

    mip: torch.Tensor
    best_index: torch.Tensor
    total: torch.Tensor
    total_squares: torch.Tensor
    count: int = 0
    # Up to FLUSH_EVERY maps are summed in float32 before joining the float64 sums:
    # a float64 read-modify-write of two full maps per batch otherwise costs as
    # much as the inverse FFT that made the batch.
    partial_total: torch.Tensor | None = None
    partial_squares: torch.Tensor | None = None
    pending: int = 0

    @classmethod
    def empty(
        cls, shape: tuple[int, int], device: torch.device | str | None = None
    ) -> SearchStatistics:
        """Statistics of no maps yet, for maps of shape (H, W)."""
        return cls(
            mip=torch.full(shape, -torch.inf, dtype=torch.float32, device=device),
            best_index=torch.full(shape, -1, dtype=torch.int64, device=device),
            total=torch.zeros(shape, dtype=torch.float64, device=device),
            total_squares=torch.zeros(shape, dtype=torch.float64, device=device),
        )

    def update(self, correlations: torch.Tensor, first_index: int) -> None:
        """Fold in maps (B, H, W) whose search indices are first_index … first_index + B − 1.

        A tie keeps the earlier search index, so the result does not depend on the
        batch size.
        """
        # A max with indices over the batch axis is ~10× slower than amax on a CPU,
        # so indices are found only where the maximum improved: everywhere early
        # in a search, at few pixels later.
        batch_max = correlations[0] if len(correlations) == 1 else correlations.amax(dim=0)
        better = batch_max > self.mip
        n_better = int(torch.count_nonzero(better))  # 10× faster than a bool sum
        if n_better > better.numel() // 8:
            for offset, correlation in enumerate(correlations):
                improved = correlation > self.mip
                self.best_index.masked_fill_(improved, first_index + offset)
                self.mip = torch.maximum(self.mip, correlation)
        elif n_better:
            where = better.nonzero(as_tuple=True)
            batch_argmax = correlations[:, where[0], where[1]].argmax(dim=0)
            self.best_index[where] = batch_argmax + first_index
            torch.maximum(self.mip, batch_max, out=self.mip)
        if self.partial_total is None or self.partial_squares is None:
            self.partial_total = torch.zeros_like(self.mip)
            self.partial_squares = torch.zeros_like(self.mip)
        for correlation in correlations:
            self.partial_total.add_(correlation)
            self.partial_squares.addcmul_(correlation, correlation)
        self.pending += correlations.shape[0]
        self.count += correlations.shape[0]
        if self.pending >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Move the float32 partial sums into the float64 running sums."""
        if self.partial_total is not None and self.partial_squares is not None and self.pending:
            self.total += self.partial_total
            self.total_squares += self.partial_squares
            self.partial_total.zero_()
            self.partial_squares.zero_()
        self.pending = 0

    def mean(self) -> torch.Tensor:
        """float32 (H, W) mean correlation over the search."""
        self.flush()
        return (self.total / max(self.count, 1)).float()

    def std(self) -> torch.Tensor:
        """float32 (H, W) standard deviation (population) of the correlation over the search."""
        self.flush()
        n = max(self.count, 1)
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
        return {
            "mip": self.mip.cpu(),
            "best_index": self.best_index.cpu(),
            "total": self.total.cpu(),
            "total_squares": self.total_squares.cpu(),
            "count": self.count,
        }

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor | int], device: torch.device | str | None = None
    ) -> SearchStatistics:
        """Inverse of `state_dict`, on `device`."""

        def tensor(name: str) -> torch.Tensor:
            value = state[name]
            assert isinstance(value, torch.Tensor)
            return value.to(device)

        count = state["count"]
        return cls(
            mip=tensor("mip"),
            best_index=tensor("best_index"),
            total=tensor("total"),
            total_squares=tensor("total_squares"),
            count=int(count),
        )
