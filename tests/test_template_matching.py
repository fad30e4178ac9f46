"""The 2DTM correlation engine against a direct computation, and its statistics."""

from __future__ import annotations

import math

import pytest
import torch

from cryorefine.engine import template_matching
from cryorefine.engine.correlate import cross_correlate, pad_template
from cryorefine.engine.ctf import ctf_2d
from cryorefine.engine.filters import whitening_filter
from cryorefine.engine.peaks import valid_region
from cryorefine.engine.projection import extract_slices, prepare_for_projection
from cryorefine.engine.search_statistics import FOLD_GROUP, SearchStatistics, _fold_chain
from cryorefine.engine.so3 import euler_to_matrix
from cryorefine.engine.template_matching import (
    correlate_planes,
    correlate_positions,
    hermitian_consistent,
    normalised_filtered_image,
    prepare_planes,
    projection_norms,
    projections_from_slices,
)
from cryorefine.engine.template_search import search


def _filters(image: torch.Tensor, n_planes: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (image.shape[-2], image.shape[-1])
    image_filter = whitening_filter(image)
    defoci = 12000.0 + 400.0 * torch.arange(n_planes, dtype=torch.float64)
    ctf = ctf_2d(shape, 1.5, defoci, defoci - 300.0, 30.0, 300.0, 2.7, 0.07, device=image.device)
    return image_filter, image_filter * ctf.float()


def _direct_scores(
    image: torch.Tensor,
    image_filter: torch.Tensor,
    plane_filter: torch.Tensor,
    projection: torch.Tensor,
) -> torch.Tensor:
    """Cross-correlation of the normalised image with the filtered projection over ‖f‖."""
    shape = (image.shape[-2], image.shape[-1])
    normalised = normalised_filtered_image(image, image_filter).double()
    padded = pad_template(projection.double(), shape)
    spectrum = torch.fft.rfftn(torch.fft.ifftshift(padded)) * hermitian_consistent(
        plane_filter.double()
    )
    spectrum[0, 0] = 0.0
    filtered = torch.fft.fftshift(torch.fft.irfftn(spectrum, s=shape))
    return cross_correlate(normalised, filtered) / filtered.norm()


@pytest.mark.parametrize("image_shape", [(96, 80), (36, 40)])  # norms by lags / directly
def test_scores_equal_the_direct_filtered_correlation(
    device: torch.device, image_shape: tuple[int, int]
) -> None:
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(*image_shape, generator=generator).cumsum(-1).to(device)  # coloured
    projections = torch.randn(3, 16, 16, generator=generator).to(device)
    image_filter, plane_filters = _filters(image, 2)
    planes = prepare_planes(image, image_filter, plane_filters, 16)
    for plane, scores in correlate_planes(planes, projections):
        for b in range(3):
            direct = _direct_scores(image, image_filter, plane_filters[plane], projections[b])
            torch.testing.assert_close(scores[b].double(), direct, atol=2e-4, rtol=0)


@pytest.mark.parametrize("image_shape", [(40, 40), (36, 42)])
def test_scores_at_a_block_of_positions_equal_the_whole_map(
    device: torch.device, image_shape: tuple[int, int]
) -> None:
    generator = torch.Generator().manual_seed(7)
    image = torch.randn(*image_shape, generator=generator).cumsum(-1).to(device)
    projections = torch.randn(5, 16, 16, generator=generator).to(device)
    image_filter, plane_filters = _filters(image, 2)
    planes = prepare_planes(image, image_filter, plane_filters, 16)
    rows, columns = valid_region(image_shape, 16)
    whole = dict(correlate_planes(planes, projections))
    for plane, scores in correlate_positions(planes, projections, rows, columns):
        torch.testing.assert_close(scores, whole[plane][:, rows, columns], atol=2e-5, rtol=0)


def test_blocked_inverse_ffts_equal_whole_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inverse FFTs cut into blocks (large micrographs) give irfftn's rows."""
    generator = torch.Generator().manual_seed(8)
    product = torch.randn(2, 40, 25, generator=generator, dtype=torch.complex64)
    rows = slice(5, 33)
    expected = torch.fft.irfftn(product, s=(40, 48))[:, rows]
    monkeypatch.setattr(template_matching, "FFT_BLOCK_BYTES", 2 * 40 * 8 * 3)  # 3 columns
    blocked = template_matching.inverse_correlation(product, 48, rows)
    torch.testing.assert_close(blocked, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [64, 36])  # autocorrelation lags / the image's own grid
def test_norms_equal_parseval(device: torch.device, size: int) -> None:
    generator = torch.Generator().manual_seed(2)
    image = torch.randn(size, size, generator=generator).to(device)
    projections = torch.randn(4, 20, 20, generator=generator).to(device)
    image_filter, plane_filters = _filters(image, 3)
    planes = prepare_planes(image, image_filter, plane_filters, 20)
    assert (planes.norm_weights is None) == (size == 64)
    norms = projection_norms(planes, projections)
    for b in range(4):
        for d in range(3):
            g = hermitian_consistent(plane_filters[d].double())
            g[0, 0] = 0.0
            spectrum = torch.fft.rfftn(projections[b].double(), s=(size, size)) * g
            expected = torch.fft.irfftn(spectrum, s=(size, size)).norm()
            assert norms[b, d].item() == pytest.approx(expected.item(), rel=1e-4)


def test_a_planted_projection_scores_its_snr_at_its_centre(device: torch.device) -> None:
    """White noise σ = 1 plus a projection of norm s: the peak is s, at its centre pixel."""
    generator = torch.Generator().manual_seed(3)
    projection = torch.randn(24, 24, generator=generator)
    projection = 8.0 * projection / projection.norm()
    noise = torch.randn(128, 128, generator=generator)
    image = noise.clone()
    image[50 - 12 : 50 + 12, 70 - 12 : 70 + 12] += projection
    flat = torch.ones(128, 65)
    planes = prepare_planes(image.to(device), flat.to(device), flat[None].to(device), 24)
    _, scores = next(correlate_planes(planes, projection[None].to(device)))
    peak = int(scores[0].argmax())
    assert divmod(peak, 128) == (50, 70)
    assert scores[0, 50, 70].item() == pytest.approx(8.0, abs=0.5)


def test_statistics_equal_a_recomputation_for_any_batch_size(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(4)
    maps = torch.randn(23, 8, 9, generator=generator).to(device)
    for batch in (1, 5, 23):
        statistics = SearchStatistics.empty((8, 9), device=device)
        for start in range(0, 23, batch):
            statistics.update(maps[start : start + batch], start)
        torch.testing.assert_close(statistics.mip, maps.max(0).values)
        torch.testing.assert_close(statistics.best_index.long(), maps.argmax(0))
        torch.testing.assert_close(statistics.mean(), maps.mean(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(statistics.std(), maps.std(0, correction=0), atol=1e-6, rtol=0)
        z = (maps.max(0).values - maps.mean(0)) / maps.std(0, correction=0)
        torch.testing.assert_close(statistics.z_score(), z, atol=1e-5, rtol=0)


def test_statistics_survive_a_state_dict_round_trip() -> None:
    maps = torch.randn(6, 4, 4)
    statistics = SearchStatistics.empty((4, 4))
    statistics.update(maps[:3], 0)
    restored = SearchStatistics.from_state_dict(statistics.state_dict())
    restored.update(maps[3:], 3)
    statistics.update(maps[3:], 3)
    for name in ("mip", "best_index", "total", "total_squares"):
        assert torch.equal(getattr(restored, name), getattr(statistics, name))
    assert restored.count == statistics.count == 6
    assert math.isfinite(float(restored.z_score().sum()))


def test_compiled_eager_and_chained_folds_agree() -> None:
    """The fold compiled by inductor, its uncompiled chain and the eager steps agree."""
    generator = torch.Generator().manual_seed(5)
    maps = torch.randn(11, 40, 48, generator=generator)
    maps[7] = maps[2]  # a tie: the earlier map keeps the pixel
    scales = torch.ones(11)
    scales[:7] = torch.rand(7, generator=generator) + 0.5
    scales[7] = scales[2]
    scaled = maps * scales[:, None, None]
    expected_index = scaled.argmax(0)  # the first of ties

    def fold(kernel: str) -> SearchStatistics:
        statistics = SearchStatistics.empty((40, 48))
        for first in range(0, 11, FOLD_GROUP):
            group = slice(first, min(first + FOLD_GROUP, 11))
            if kernel == "chain":
                state = (statistics.mip, statistics.best_index, statistics.total_squares)
                _fold_chain(
                    maps[group],
                    scales[group],
                    torch.arange(11)[group].int(),
                    *state,
                )
                statistics.count += group.stop - group.start
            else:
                group_maps = maps[group].clone()
                statistics.fold(
                    group_maps,
                    scales[group],
                    torch.arange(11)[group],
                    compiled=kernel == "compiled",
                )
        statistics.flush()
        return statistics

    for kernel in ("compiled", "eager", "chain"):
        statistics = fold(kernel)
        torch.testing.assert_close(statistics.mip, scaled.max(0).values, msg=kernel)
        assert torch.equal(statistics.best_index.long(), expected_index), kernel
        torch.testing.assert_close(
            statistics.total_squares, scaled.double().square().sum(0), rtol=1e-6, atol=0
        )


def test_search_statistics_equal_a_recomputation_for_any_batch_size(device: torch.device) -> None:
    """search() against every (plane, orientation) map computed one by one."""

    generator = torch.Generator().manual_seed(6)
    volume = torch.randn(16, 16, 16, generator=generator).to(device)
    prepared = prepare_for_projection(volume)
    angles = torch.rand(7, 3, generator=generator, dtype=torch.float64) * 180.0
    rotations = euler_to_matrix(*angles.unbind(-1)).float().to(device)
    image = torch.randn(48, 56, generator=generator).cumsum(-1).to(device)
    image_filter, plane_filters = _filters(image, 3)
    planes = prepare_planes(image, image_filter, plane_filters, 16)
    projections = projections_from_slices(extract_slices(prepared, rotations))
    maps = torch.stack([scores for _, scores in correlate_planes(planes, projections)])
    maps = maps.flatten(0, 1).double()  # index = plane · 7 + orientation
    rows, columns = valid_region((48, 56), 16)
    for batch_size in (1, 3, 7):
        statistics = search(prepared, planes, rotations, batch_size)
        inside = (slice(None), rows, columns)
        mip = statistics.mip[rows, columns].double()
        torch.testing.assert_close(mip, maps[inside].max(0).values, atol=1e-5, rtol=0)
        assert torch.equal(statistics.best_index[rows, columns].long(), maps[inside].argmax(0))
        mean, std = statistics.mean(), statistics.std()
        torch.testing.assert_close(mean.double(), maps.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            std[rows, columns].double(), maps[inside].std(0, correction=0), atol=1e-5, rtol=0
        )
