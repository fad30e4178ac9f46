"""`cryorefine mask` and `cryorefine rebox`: widths measured on a cube and a sphere,
relion_mask_create voxel for voxel, Fourier pad/crop round trips, an analytic Gaussian
at a new sampling, origin and float16."""

from __future__ import annotations

import math
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cryorefine.cli import app
from cryorefine.engine.fourier import coordinate_grid
from cryorefine.engine.masks import soft_sphere_mask
from cryorefine.engine.rebox import crop_or_pad, fourier_resample
from cryorefine.engine.volume_masks import distance_from_mask, threshold_mask
from relion_tools import run_relion, write_volume

BOX = 40
C = BOX // 2  # the origin voxel


def invoke(*args: str):
    return CliRunner().invoke(app, [*args])


def read(path: Path) -> tuple[np.ndarray, float]:
    with mrcfile.open(path) as mrc:
        return mrc.data.astype(np.float64), float(mrc.voxel_size.x)


def cube(half_side: int = 5) -> torch.Tensor:
    """1 in the (2 half_side + 1)³ voxels around the origin, 0 elsewhere."""
    grid = coordinate_grid((BOX,) * 3)
    return (grid.abs().amax(dim=-1) <= half_side).float()


def blobs() -> torch.Tensor:
    """Two overlapping anisotropic-free Gaussians off the origin: an irregular shape."""
    grid = coordinate_grid((BOX,) * 3)
    first = torch.exp(-((grid - torch.tensor([3.3, -2.1, 1.7])) ** 2).sum(-1) / 32)
    second = 0.7 * torch.exp(-((grid - torch.tensor([-8.0, 6.0, -4.0])) ** 2).sum(-1) / 12)
    return first + second


# --- mask: engine --------------------------------------------------------------------


def test_threshold_extend_and_soft_edge_widths_on_a_cube() -> None:
    """Along +x from the face of an 11-voxel cube (x = 5): extension by 3 adds the voxels
    at distance < 3 (x = 6, 7; RELION's rule), the soft edge ½(1 + cos(π d / 4)) follows."""
    mask = threshold_mask(cube(), 0.5, extend_voxels=3, soft_edge_voxels=4)
    row = mask[C, C, C:].double()
    expected = [1.0] * 8 + [0.5 * (1 + math.cos(math.pi * d / 4)) for d in (1, 2, 3)] + [0.0]
    assert torch.allclose(row[:12], torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert torch.all(row[12:] == 0)
    # Euclidean, not box-shaped: the extended corner is rounded. The cube's corner voxel
    # (5, 5, 5) + (2, 2, 0) is at √8 < 3: inside; (7, 7, 7) is at √12 from the cube, outside
    # the extension, and √2 from its nearest extended voxel (6, 6, 7) (√6 from the cube).
    assert float(mask[C + 5, C + 7, C + 7]) == 1.0
    corner = 0.5 * (1 + math.cos(math.pi * math.sqrt(2) / 4))
    assert float(mask[C + 7, C + 7, C + 7]) == pytest.approx(corner, abs=1e-6)
    # Threshold at the cube's value keeps it (≥, as RELION); above it nothing.
    assert float(threshold_mask(cube(), 1.0).sum()) == 11**3
    assert float(threshold_mask(cube(), 1.01).sum()) == 0


def test_extension_and_shrinking_on_a_sphere() -> None:
    """A voxelised ball |r| ≤ 8 grown by 3 (voxels at distance < 3 join): none with
    |r| ≥ 11 joins (triangle inequality), all with |r| < 11 − √3/2 do (the ball's voxels
    lie within √3/2 of its sphere). Shrunk by 3: those with |r| < 8 − 3 − √3/2 stay.
    Measured: grown 10.25 (first out) .. 10.68 (last in); shrunk 5.39 .. 5.20."""
    r = coordinate_grid((BOX,) * 3).norm(dim=-1)
    ball = (r <= 8.0).float()
    slack = math.sqrt(3) / 2
    grown = threshold_mask(ball, 0.5, extend_voxels=3) > 0.5
    assert torch.all(grown[r < 11 - slack]) and not torch.any(grown[r >= 11])
    shrunk = threshold_mask(ball, 0.5, extend_voxels=-3) > 0.5
    assert torch.all(shrunk[r < 5 - slack]) and not torch.any(shrunk[r > 6])
    # The soft edge of a ball is the sphere's raised cosine, within ½ voxel of radius.
    soft = threshold_mask(ball, 0.5, soft_edge_voxels=5)
    exact = soft_sphere_mask(BOX, 8.0, 5.0)
    assert (soft - exact).abs().max() < 0.5 * math.pi / 5  # |d(mask)/dr| ≤ π / (2 w)


def test_distance_transform_is_exact_against_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    binary = torch.rand((14, 15, 16), generator=generator) > 0.995
    binary[7, 7, 7] = True
    distance = distance_from_mask(binary, 6.0)
    points = torch.nonzero(binary).double()
    grid = torch.stack(
        torch.meshgrid(
            *[torch.arange(n, dtype=torch.float64) for n in binary.shape], indexing="ij"
        ),
        dim=-1,
    )
    brute = torch.cdist(grid.reshape(-1, 3), points).min(dim=1).values.reshape(binary.shape)
    near = brute <= 6.0
    assert torch.allclose(distance[near].double(), brute[near], atol=1e-5)
    assert torch.all(torch.isinf(distance[~near]))


@pytest.mark.relion
@pytest.mark.parametrize(("extend", "soft_edge"), [(0, 0), (3, 0), (0, 4), (3, 4), (-2, 3)])
def test_threshold_mask_equals_relion_mask_create(
    relion_bin: str, tmp_path: Path, extend: int, soft_edge: int
) -> None:
    write_volume(tmp_path / "blobs.mrc", blobs().numpy(), 1.0)
    args = ["--i", "blobs.mrc", "--o", "relion.mrc", "--ini_threshold", "0.5"]
    args += ["--extend_inimask", str(extend), "--width_soft_edge", str(soft_edge)]
    run_relion(relion_bin, "relion_mask_create", args, tmp_path)
    result = invoke(
        "mask", "--map", str(tmp_path / "blobs.mrc"), "--threshold", "0.5", "--extend",
        str(extend), "--soft-edge", str(soft_edge), "--output", str(tmp_path / "ours.mrc"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ours, theirs = read(tmp_path / "ours.mrc")[0], read(tmp_path / "relion.mrc")[0]
    # Measured: identical to 1e-7 (float32 cosines).
    assert np.abs(ours - theirs).max() < 1e-6
    assert theirs.sum() > 100


@pytest.mark.relion
def test_sphere_equals_relion_denovo_mask(relion_bin: str, tmp_path: Path) -> None:
    args = ["--denovo", "--box_size", "40", "--outer_radius", "10", "--width_soft_edge", "4"]
    run_relion(
        relion_bin, "relion_mask_create", [*args, "--angpix", "1.5", "--o", "r.mrc"], tmp_path
    )
    result = invoke(
        "mask", "--sphere-diameter", "30", "--box", "40", "--pixel-size", "1.5",
        "--soft-edge", "4", "--output", str(tmp_path / "ours.mrc"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.abs(read(tmp_path / "ours.mrc")[0] - read(tmp_path / "r.mrc")[0]).max() < 1e-6


# --- mask: program -------------------------------------------------------------------


def test_sphere_mask_cli(tmp_path: Path) -> None:
    output = tmp_path / "sphere.mrc"
    result = invoke(
        "mask", "--sphere-diameter", "24", "--box", "40", "--pixel-size", "1.5",
        "--soft-edge", "4", "--output", str(output), "--float16",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with mrcfile.open(output) as mrc:
        assert mrc.header.mode == 12 and float(mrc.voxel_size.x) == pytest.approx(1.5)
        data = torch.from_numpy(mrc.data.astype(np.float32))
    # 24 Å at 1.5 Å/px: radius 8 px, then 4 px of raised cosine.
    row = data[C, C, C:].double()
    expected = [1.0] * 9 + [0.5 * (1 + math.cos(math.pi * d / 4)) for d in (1, 2, 3)] + [0.0]
    assert torch.allclose(row[:13], torch.tensor(expected, dtype=torch.float64), atol=1e-3)
    assert (output.parent / "sphere.config.yaml").is_file()


def test_threshold_mask_cli_takes_the_maps_pixel_size(tmp_path: Path) -> None:
    write_volume(tmp_path / "cube.mrc", cube().numpy(), 2.0)
    output = tmp_path / "m.mrc"
    result = invoke(
        "mask", "--map", str(tmp_path / "cube.mrc"), "--threshold", "0.5", "--extend", "3",
        "--soft-edge", "4", "--output", str(output),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data, voxel = read(output)
    assert voxel == pytest.approx(2.0)
    assert np.allclose(data, threshold_mask(cube(), 0.5, 3, 4).numpy(), atol=1e-7)
    again = invoke(
        "mask", "--map", str(tmp_path / "cube.mrc"), "--threshold", "0.5", "-o", str(output)
    )
    assert again.exit_code == 2 and "--overwrite" in again.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "0.5", "--sphere-diameter", "20"], "exactly one"),
        (["--threshold", "0.5"], "needs a map"),
        (["--sphere-diameter", "20", "--box", "40"], "box_size and pixel_size"),
        (
            ["--soft-edge", "-1", "--sphere-diameter", "20", "--box", "40", "--pixel-size", "1"],
            "greater than or equal to 0",
        ),
    ],
)
def test_mask_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    output = tmp_path / "m.mrc"
    result = invoke("mask", *args, "--output", str(output))
    assert result.exit_code == 2 and message in result.output, result.output
    assert not output.exists()


def test_mask_threshold_outside_the_map_is_an_error(tmp_path: Path) -> None:
    write_volume(tmp_path / "cube.mrc", cube().numpy(), 1.0)
    result = invoke(
        "mask",
        "--map",
        str(tmp_path / "cube.mrc"),
        "--threshold",
        "2",
        "-o",
        str(tmp_path / "m.mrc"),
    )
    assert result.exit_code == 2 and "would be empty" in result.output
    assert not (tmp_path / "m.mrc").exists()


# --- rebox ---------------------------------------------------------------------------


def gaussian(box: int, pixel: float, sigma: float = 4.0) -> np.ndarray:
    """exp(−|r − c|² / 2σ²) sampled at r = (index − box // 2) · pixel, c off the origin (Å)."""
    r = coordinate_grid((box,) * 3, dtype=torch.float64) * pixel
    centre = torch.tensor([2.3, -3.1, 1.4], dtype=torch.float64)
    return torch.exp(-((r - centre) ** 2).sum(-1) / (2 * sigma**2)).numpy()


def test_fourier_pad_then_crop_returns_the_map(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    volume = torch.randn((BOX,) * 3, generator=generator).numpy()
    write_volume(tmp_path / "map.mrc", volume, 1.2)
    fine, back = tmp_path / "fine.mrc", tmp_path / "back.mrc"
    # 40 · 1.2 / 0.8 = 60 voxels at 0.8 Å, and back to 40 at 1.2 Å.
    assert invoke("rebox", "--map", str(tmp_path / "map.mrc"), "--pixel-size", "0.8",
                  "--output", str(fine)).exit_code == 0  # fmt: skip
    data, voxel = read(fine)
    assert data.shape == (60,) * 3 and voxel == pytest.approx(0.8)
    assert (
        invoke("rebox", "--map", str(fine), "--pixel-size", "1.2", "-o", str(back)).exit_code == 0
    )
    data, voxel = read(back)
    assert voxel == pytest.approx(1.2)
    # Measured: 3e-8 (float32 files); the Nyquist plane is split and folded back exactly.
    assert np.abs(data - volume).max() < 1e-5 * np.abs(volume).max()


@pytest.mark.parametrize(("new_pixel", "new_size"), [(1.5, 32), (0.75, 64), (1.3, 37)])
def test_pixel_size_change_of_a_gaussian_is_the_analytic_gaussian(
    tmp_path: Path, new_pixel: float, new_size: int
) -> None:
    write_volume(tmp_path / "blob.mrc", gaussian(48, 1.0), 1.0)
    output = tmp_path / "out.mrc"
    result = invoke("rebox", "--map", str(tmp_path / "blob.mrc"), "--pixel-size", str(new_pixel),
                    "-o", str(output))  # fmt: skip
    assert result.exit_code == 0, result.output
    data, voxel = read(output)
    # 48 / 1.3 = 36.9 -> 37 voxels: the pixel size achieved is 48 / 37 Å, and written.
    assert data.shape == (new_size,) * 3 and voxel == pytest.approx(48.0 / new_size, rel=1e-6)
    # Measured: ≤ 3e-7 of the peak (float64 resampling alone 6e-8; float32 files).
    assert np.abs(data - gaussian(new_size, 48.0 / new_size)).max() < 1e-5
    assert ("note" in result.output) == (new_size == 37)
    # The density scale is kept: the mean over the same physical box does not change.
    assert data.mean() == pytest.approx(gaussian(48, 1.0).mean(), rel=1e-5)


def test_box_change_keeps_the_origin_and_combines_with_resampling(tmp_path: Path) -> None:
    volume = gaussian(48, 1.0)
    write_volume(tmp_path / "blob.mrc", volume, 1.0)
    for box in (32, 63):
        output = tmp_path / f"box{box}.mrc"
        assert invoke("rebox", "--map", str(tmp_path / "blob.mrc"), "--box", str(box),
                      "-o", str(output)).exit_code == 0  # fmt: skip
        data, voxel = read(output)
        assert data.shape == (box,) * 3 and voxel == 1.0
        # The analytic Gaussian on the new box: same pixel, origin at box // 2.
        assert np.allclose(data, gaussian(box, 1.0) * (gaussian(box, 1.0) > 0), atol=2e-6)
        assert data[box // 2, box // 2, box // 2] == pytest.approx(volume[24, 24, 24], rel=1e-6)
    output = tmp_path / "both.mrc"
    assert invoke("rebox", "--map", str(tmp_path / "blob.mrc"), "--pixel-size", "1.5",
                  "--box", "40", "-o", str(output)).exit_code == 0  # fmt: skip
    data, voxel = read(output)
    assert data.shape == (40,) * 3 and voxel == pytest.approx(1.5)
    assert np.abs(data[4:36, 4:36, 4:36] - gaussian(32, 1.5)).max() < 1e-5
    assert np.all(data[:4] == 0) and np.all(data[36:] == 0)


def test_float16_round_trip(tmp_path: Path) -> None:
    volume = gaussian(48, 1.0).astype(np.float16)
    with mrcfile.new(tmp_path / "half.mrc") as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = 1.0
    output = tmp_path / "out.mrc"
    result = invoke("rebox", "--map", str(tmp_path / "half.mrc"), "--box", "56", "--float16",
                    "-o", str(output))  # fmt: skip
    assert result.exit_code == 0, result.output
    with mrcfile.open(output) as mrc:
        assert mrc.header.mode == 12 and mrc.data.dtype == np.float16
        data = mrc.data.copy()
    # Padding moves float16 values without arithmetic: exactly the input's.
    assert np.array_equal(data[4:52, 4:52, 4:52], volume)
    # Resampled through float64 and rounded back: within float16 precision (2⁻¹¹).
    resampled = tmp_path / "resampled.mrc"
    assert invoke("rebox", "--map", str(tmp_path / "half.mrc"), "--pixel-size", "1.5",
                  "--float16", "-o", str(resampled)).exit_code == 0  # fmt: skip
    with mrcfile.open(resampled) as mrc:
        assert mrc.data.dtype == np.float16
        assert np.abs(mrc.data.astype(np.float64) - gaussian(32, 1.5)).max() < 2e-3


def test_rebox_engine_on_images_and_odd_sizes() -> None:
    """Round trips between odd and even sizes, and crop/pad along one axis only."""
    generator = torch.Generator().manual_seed(1)
    for size, new in [(33, 48), (32, 45), (33, 40)]:
        image = torch.randn((size, size), generator=generator, dtype=torch.float64)
        back = fourier_resample(fourier_resample(image, new, ndim=2), size, ndim=2)
        assert torch.allclose(back, image, atol=1e-12)
    line = torch.arange(5.0)
    assert torch.equal(crop_or_pad(line, 3, ndim=1), torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(crop_or_pad(line, 8, ndim=1), torch.tensor([0, 0, 0, 1, 2, 3, 4, 0.0]))


@pytest.mark.parametrize(
    ("args", "message"),
    [([], "box_size"), (["--box", "0"], "greater than or equal to 1")],
)
def test_rebox_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    write_volume(tmp_path / "map.mrc", gaussian(16, 1.0), 1.0)
    output = tmp_path / "out.mrc"
    result = invoke("rebox", "--map", str(tmp_path / "map.mrc"), *args, "-o", str(output))
    assert result.exit_code == 2 and message in result.output, result.output
    assert not output.exists()


def test_rebox_refuses_a_non_cubic_map(tmp_path: Path) -> None:
    write_volume(tmp_path / "map.mrc", gaussian(16, 1.0)[:, :, :12], 1.0)
    result = invoke(
        "rebox", "--map", str(tmp_path / "map.mrc"), "--box", "8", "-o", str(tmp_path / "o.mrc")
    )
    assert result.exit_code == 2 and "not cubic" in result.output
