"""The error of a bad data file: it names the file, the line and the column."""
from pathlib import Path
from typing import Optional, Union


class DataFileError(ValueError):
    """A data file that cannot be read as its format says. Nothing of the file is kept."""

    def __init__(self, path: Union[str, Path], message: str, line: Optional[int] = None, column: Optional[str] = None,
                 row: Optional[int] = None):
        self.path, self.line, self.column, self.row = str(path), line, column, row
        where = self.path
        if line is not None:
            where += f", line {line}"
        if row is not None:  # files without lines (Parquet): the 1-based row
            where += f", row {row}"
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
