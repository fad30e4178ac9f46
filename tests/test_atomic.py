"""Atomic writes leave the old file or the new one, never half, and never overwrite silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryorefine.errors import CryorefineError
from cryorefine.io.atomic import atomic_write, atomic_write_text


def test_refuses_to_overwrite_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(CryorefineError, match="--overwrite"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    atomic_write_text(target, "new", overwrite=True)
    assert target.read_text() == "new"


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    target.write_text("old")

    def crash_half_way(temporary: Path) -> None:
        temporary.write_text("ne")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash_half_way, overwrite=True)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
