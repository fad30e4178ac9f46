"""The one error type users see: what is wrong, where (file, field), and what to do."""

from __future__ import annotations

from pathlib import Path


class CryorefineError(Exception):
    """A user-facing error, raised before compute wherever the input allows it.

    The message names the file and/or field at fault and the fix, on one line,
    so that the command line can print it as is and exit non-zero.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        field: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = None if path is None else Path(path)
        self.field = field
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        where = []
        if self.path is not None:
            where.append(str(self.path))
        if self.field is not None:
            where.append(f"field '{self.field}'")
        text = (": ".join(where) + ": " if where else "") + self.problem
        if self.fix:
            text += f" Fix: {self.fix}"
        return text


def require_file(path: str | Path, kind: str) -> Path:
    """`path` as a Path if it is an existing file, else one clear error naming it.

    Args:
        path: the file a user gave.
        kind: what it should be, for the message (e.g. "STAR file").
    """
    path = Path(path)
    if not path.is_file():
        raise CryorefineError(f"{kind} not found.", path=path, fix="check the path and spelling.")
    return path
