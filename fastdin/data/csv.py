"""Your own CSV or Parquet files, read through a column map (see `fastdin.data.columns`).

`path` is one file (all rows, e.g. to evaluate or predict) or a folder with train.csv/test.csv (or
.parquet; valid.* is optional). The vocabulary is fitted on the training file (or on the one file)
unless a checkpoint's vocabulary is given; ids never seen then encode as 0.
"""
from pathlib import Path
from typing import Optional, Union

from fastdin.data.columns import ColumnMap, read_rows
from fastdin.data.samples import LoadedData
from fastdin.data.vocabulary import Vocabulary

SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")


def split_files(path: Path, suffixes=SUFFIXES):
    """{split: file} of a folder with train.* / valid.* / test.*, or {"all": path} for one file."""
    if path.is_file():
        return {"all": path}
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    found = {}
    for split in ("train", "valid", "test"):
        files = [p for p in sorted(path.glob(f"{split}.*")) if p.suffix.lower() in suffixes]
        if files:
            found[split] = files[0]
    if "train" not in found and "test" not in found:
        raise FileNotFoundError(f"{path}: expected train.csv and test.csv (or .parquet) in the folder")
    return found


def load_with_map(path: Union[str, Path], spec: ColumnMap, vocabulary: Optional[Vocabulary], fmt: str,
                  files=None) -> LoadedData:
    files = files or split_files(Path(path))
    fit = vocabulary is None
    vocabulary = Vocabulary() if vocabulary is None else vocabulary
    first = "train" if "train" in files else next(iter(files))
    user_names = Vocabulary()
    read = {first: read_rows(files[first], spec, vocabulary, fit=fit, user_names=user_names)}
    for split, file in files.items():
        if split != first:
            read[split] = read_rows(file, spec, vocabulary, fit=False, user_names=user_names)
    if "all" in read:
        train, test = read["all"], None
    else:
        train, test = read.get("train"), read.get("test")
    return LoadedData(train, test, vocabulary, spec.schema(vocabulary), fmt,
                      {"files": {k: str(v) for k, v in files.items()}}, valid=read.get("valid"),
                      user_names=user_names)


def load(path: Union[str, Path], schema: Union[str, Path, dict, ColumnMap, None] = None,
         vocabulary: Optional[Vocabulary] = None, **_) -> LoadedData:
    if schema is None:
        raise ValueError("the csv format needs a column map: --schema FILE (see fastdin.data.columns)")
    spec = schema if isinstance(schema, ColumnMap) else (
        ColumnMap(**schema) if isinstance(schema, dict) else ColumnMap.from_file(schema))
    return load_with_map(path, spec, vocabulary, "csv")
