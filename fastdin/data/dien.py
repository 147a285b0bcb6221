"""The DIEN authors' Amazon files: `local_train_splitByUser` and `local_test_splitByUser` in one folder.

Each line: label, user, item, category, item history, category history, tab-separated; the histories
are joined by `\\x02`, oldest first. As DIEN's iterator does, a history longer than `max_len` (100)
keeps its last `max_len` behaviours, and the vocabulary comes from the training file (DIEN builds
its uid/mid/cat vocabularies from it); test ids it lacks encode as 0.
"""
from pathlib import Path
from typing import Optional, Union

from fastdin.data.columns import ColumnMap
from fastdin.data.csv import load_with_map
from fastdin.data.samples import LoadedData
from fastdin.data.vocabulary import Vocabulary

NAMES = ["label", "user", "item", "category", "item_history", "category_history"]
COLUMNS = ColumnMap(
    label="label", user="user", candidates={"item": "item", "category": "category"},
    sequences={"hist_items": {"column": "item_history", "target": "item"},
               "hist_categories": {"column": "category_history", "target": "category"}},
    sep="\x02", delimiter="\t", names=NAMES,
)
FILES = {"train": "local_train_splitByUser", "test": "local_test_splitByUser"}


def load(path: Union[str, Path], vocabulary: Optional[Vocabulary] = None, max_len: Optional[int] = 100,
         **_) -> LoadedData:
    path = Path(path)
    if path.is_file():
        files = {"all": path}
    else:
        files = {split: path / name for split, name in FILES.items() if (path / name).is_file()}
        if not files:
            raise FileNotFoundError(f"{path}: expected {FILES['train']} and {FILES['test']} in the folder")
    spec = ColumnMap(**{**vars(COLUMNS), "max_len": max_len})
    return load_with_map(path, spec, vocabulary, "dien", files)
