"""MRC I/O: round trips in every mode, voxel sizes, real EPU files, bad input."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryorefine.errors import CryorefineError
from cryorefine.io.mrc import mrc_info, read_mrc, read_particle_images, write_mrc
from cryorefine.io.star import read_star_particles
from realdata import cryodrgn_data, mrcfile_data


def _random(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.int16, np.uint16])
@pytest.mark.parametrize(
    ("shape", "is_stack"), [((6, 5), False), ((3, 6, 5), True), ((4, 6, 5), False)]
)
def test_round_trip_every_mode_and_layout(
    tmp_path: Path, dtype: type, shape: tuple[int, ...], is_stack: bool
) -> None:
    data = _random(shape, dtype)
    path = write_mrc(tmp_path / "x.mrc", data, 1.234, dtype=dtype, is_stack=is_stack)

    info = mrc_info(path)
    assert info.shape == shape and info.dtype == np.dtype(dtype) and info.is_stack == is_stack
    assert info.voxel_size_angstrom == pytest.approx(1.234, rel=1e-6)
    stored, voxel = read_mrc(path, dtype=None)
    assert stored.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(stored, data)  # exact: no conversion on the way
    as_float, _ = read_mrc(path)
    assert as_float.dtype == np.float32
    np.testing.assert_array_equal(as_float, data.astype(np.float32))
    assert voxel == pytest.approx(1.234, rel=1e-6)


def test_stack_of_one_stays_a_stack(tmp_path: Path) -> None:
    path = write_mrc(tmp_path / "one.mrcs", np.ones((1, 8, 6)), 1.5, is_stack=True)
    info = mrc_info(path)
    assert info.shape == (1, 8, 6) and info.is_stack
    assert read_mrc(path)[0].shape == (1, 8, 6)


def test_tensor_input_and_float_to_integer_rounding(tmp_path: Path) -> None:
    data = torch.tensor([[0.4, 1.6], [-2.5, 300.2]], dtype=torch.float64)
    write_mrc(tmp_path / "t.mrc", data, 2.0, dtype=np.int16)
    stored, voxel = read_mrc(tmp_path / "t.mrc", dtype=None)
    np.testing.assert_array_equal(stored, [[0, 2], [-2, 300]])  # round half to even
    assert voxel == 2.0


def test_values_outside_the_dtype_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(CryorefineError, match=r"do not fit uint16"):
        write_mrc(tmp_path / "u.mrc", np.array([[-1.0, 2.0]]), 1.0, dtype=np.uint16)
    with pytest.raises(CryorefineError, match=r"float16"):
        write_mrc(tmp_path / "h.mrc", np.array([[1e6, 2.0]]), 1.0, dtype=np.float16)
    with pytest.raises(CryorefineError, match=r"voxel size"):
        write_mrc(tmp_path / "v.mrc", np.zeros((2, 2)), 0.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["epu2.9_example.mrc", "fei-extended.mrc"])
def test_real_epu_micrographs_keep_data_and_voxel_size(tmp_path: Path, name: str) -> None:
    path = mrcfile_data(name)
    with mrcfile.open(path, permissive=True) as reference:
        truth, truth_voxel = reference.data.copy(), float(reference.voxel_size.x)
        assert reference.header.nsymbt > 0  # FEI extended header present

    info = mrc_info(path)
    assert info.dtype == np.uint16 and info.shape == truth.shape and not info.is_stack
    data, voxel = read_mrc(path, dtype=None)
    np.testing.assert_array_equal(data, truth)
    assert voxel == truth_voxel and 0.5 < voxel < 1.0

    for dtype in (np.uint16, np.float32):
        copy = write_mrc(tmp_path / f"{np.dtype(dtype).name}.mrc", data, voxel, dtype=dtype)
        again, again_voxel = read_mrc(copy, dtype=None)
        assert again.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(again, truth.astype(dtype))
        assert again_voxel == pytest.approx(truth_voxel, rel=1e-6)


def test_truncated_file_names_file_and_fix(tmp_path: Path) -> None:
    path = write_mrc(tmp_path / "stack.mrcs", np.ones((4, 8, 8)), 1.0, is_stack=True)
    path.write_bytes(path.read_bytes()[:-100])
    for call in (mrc_info, read_mrc, lambda p: read_particle_images(["1@stack.mrcs"], p.parent)):
        with pytest.raises(CryorefineError, match=r"truncated") as caught:
            call(path)
        assert caught.value.path == path and caught.value.fix


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(CryorefineError, match=r"not found"):
        read_mrc(tmp_path / "absent.mrc")
    (tmp_path / "text.mrc").write_text("not an MRC file at all")
    with pytest.raises(CryorefineError, match=r"not a readable MRC file"):
        mrc_info(tmp_path / "text.mrc")


def test_no_silent_overwrite_and_no_leftovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_mrc(tmp_path / "a.mrc", np.zeros((4, 4)), 1.0)
    before = path.read_bytes()
    with pytest.raises(CryorefineError, match=r"exists"):
        write_mrc(path, np.ones((4, 4)), 1.0)
    assert path.read_bytes() == before

    def broken_new(name: str, **kwargs: object) -> None:
        Path(name).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(mrcfile, "new", broken_new)
    with pytest.raises(OSError, match="disk full"):
        write_mrc(path, np.ones((4, 4)), 1.0, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        write_mrc(tmp_path / "b.mrc", np.ones((4, 4)), 1.0)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mrc"]
    monkeypatch.undo()
    write_mrc(path, np.ones((4, 4)), 3.0, overwrite=True)
    assert read_mrc(path)[0].sum() == 16 and read_mrc(path)[1] == 3.0


def test_particle_images_by_relion_name(tmp_path: Path) -> None:
    a, b = _random((5, 8, 8), np.float32), _random((3, 8, 8), np.float32) + 10
    write_mrc(tmp_path / "run" / "a.mrcs", a, 1.0, is_stack=True)
    write_mrc(tmp_path / "b.mrcs", b, 1.0, is_stack=True)
    write_mrc(tmp_path / "single.mrc", a[2], 1.0)
    names = ["000003@b.mrcs", "1@run/a.mrcs", "000005@run/a.mrcs", "single.mrc", "2@b.mrcs"]
    images = read_particle_images(names, tmp_path)
    np.testing.assert_array_equal(images, np.stack([b[2], a[0], a[4], a[2], b[1]]))

    with pytest.raises(CryorefineError, match=r"index 6 is out of range: the stack holds 5"):
        read_particle_images(["6@run/a.mrcs"], tmp_path)
    with pytest.raises(CryorefineError, match=r"not found") as caught:
        read_particle_images(["1@missing.mrcs"], tmp_path)
    assert caught.value.path == tmp_path / "missing.mrcs"
    with pytest.raises(CryorefineError, match=r"1-based index"):
        read_particle_images(["0@b.mrcs"], tmp_path)


@pytest.mark.filterwarnings("ignore:Unrecognised machine stamp")
@pytest.mark.filterwarnings("ignore:Map ID string not found")
def test_particle_images_of_real_relion_star() -> None:
    star = cryodrgn_data("toy_projections.star")
    stack = cryodrgn_data("toy_projections.mrcs")
    table = read_star_particles(star, require=["rlnImageName"])
    images = read_particle_images(table["rlnImageName"].tolist(), stack.parent)
    with mrcfile.open(stack, permissive=True) as reference:
        np.testing.assert_array_equal(images, reference.data)
    assert images.shape == (1000, 30, 30)
