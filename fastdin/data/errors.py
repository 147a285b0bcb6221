"""The error of a bad data file: it names the file, the line and the column."""
from pathlib import Path
from typing import Optional, Union


class DataFileError(ValueError):
    """A data file that cannot be read as its format says. Nothing of the file is kept."""

    def __init__(self, path: Union[str, Path], message: str, line: Optional[int] = None, column: Optional[str] = None):
        self.path, self.line, self.column = str(path), line, column
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column}"
        super().__init__(f"{where}: {message}")


def require_file(path: Union[str, Path]) -> Path:
    """`path` as a Path to an existing, non-empty file, or a DataFileError / FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataFileError(path, "the file is empty")
    return path
