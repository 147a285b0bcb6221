"""The FuxiCTR/BARS CSV of AmazonElectronics_x1: a folder with train.csv and test.csv (valid.csv optional).

Columns `label,user_id,item_id,cate_id,item_history,cate_history`; the histories are ids joined by
`^`, oldest first. The vocabulary is fitted on train.csv, as FuxiCTR fits it; test ids it lacks encode
as 0. BARS keeps histories up to 100 behaviours (`max_len`).
"""
from pathlib import Path
from typing import Optional, Union

from fastdin.data.columns import ColumnMap
from fastdin.data.csv import load_with_map, split_files
from fastdin.data.samples import LoadedData
from fastdin.data.vocabulary import Vocabulary

COLUMNS = ColumnMap(
    label="label", user="user_id", candidates={"item": "item_id", "category": "cate_id"},
    sequences={"hist_items": {"column": "item_history", "target": "item"},
               "hist_categories": {"column": "cate_history", "target": "category"}},
    sep="^",
)


def load(path: Union[str, Path], vocabulary: Optional[Vocabulary] = None, max_len: Optional[int] = 100,
         **_) -> LoadedData:
    spec = ColumnMap(**{**vars(COLUMNS), "max_len": max_len})
    return load_with_map(path, spec, vocabulary, "bars", split_files(Path(path), (".csv",)))
