"""User-facing errors: one line on stderr, exit code 2, no traceback.

Anything a user can get wrong (a file, a spec, a flag) raises `UserError`; the CLI catches it and prints
`error: <message>`. Programming errors still raise normally so that bugs stay visible.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError


class UserError(Exception):
    """A problem with the user's input. `str(err)` is a complete one-line message."""

    exit_code = 2


class DataError(UserError):
    """A malformed data file: names the file, the item index and the field."""

    def __init__(self, path: Path | str, message: str, index: int | None = None, field: str | None = None):
        self.path = Path(path)
        self.index = index
        self.field = field
        where = str(self.path)
        if index is not None:
            where += f": item {index}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


class MissingDependencyError(UserError):
    """An optional backend is not installed; the message carries the install command."""

    def __init__(self, package: str, feature: str, extra: str | None = None, hint: str | None = None):
        hint = hint or (f"pip install 'qrunlearn[{extra}]'" if extra else f"pip install {package}")
        super().__init__(f"{feature} needs the optional package '{package}': {hint}")


def validation_message(err: ValidationError, option_style: bool = False) -> str:
    """The first problem of a pydantic validation error as one line: "field 'eval.limit': <why>", or with
    `option_style` "--batch-size: <why>" (for settings that came from command-line options)."""
    first = err.errors()[0]
    location = [str(part) for part in first["loc"]]
    if option_style and location:
        where = "--" + location[0].replace("_", "-")
    else:
        where = f"field '{'.'.join(location) or '(top level)'}'"
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"
