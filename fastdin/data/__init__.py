"""Data for DIN: the synthetic generator and one loader per public format.

`load(format, path, **options)` returns a `LoadedData` (train and test `Samples`, the `Vocabulary`,
the `FeatureSchema`); `Samples.batches(batch_size)` gives the batches `fastdin.DIN` and
`fastdin.train.train` take. Formats (each module's docstring gives its files and protocol):

- "amazon": reviews_<Cat>_5.json + meta_<Cat>.json, the DIN authors' protocol;
- "dien": local_train_splitByUser / local_test_splitByUser;
- "bars": FuxiCTR/BARS AmazonElectronics_x1 train.csv / test.csv;
- "taobao": UserBehavior.csv, MIMN's protocol;
- "movielens": ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-32m folders;
- "recbole": RecBole atomic files (.inter, .item);
- "csv": your own CSV or Parquet through a column map (`fastdin.data.columns`).
"""
import importlib
from pathlib import Path
from typing import Union

from fastdin.data.errors import DataFileError
from fastdin.data.samples import LoadedData, SampleBatches, Samples
from fastdin.data.synthetic import SPLITS, BatchStream, SyntheticConfig, SyntheticDIN
from fastdin.data.vocabulary import Vocabulary

FORMATS = ("amazon", "dien", "bars", "taobao", "movielens", "recbole", "csv")


def load(format: str, path: Union[str, Path], **options) -> LoadedData:
    """Load `path` in `format` (one of FORMATS); options go to that format's `load` (seed, max_len, ...)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    module = importlib.import_module(f"fastdin.data.{format}")
    return module.load(path, **options)


__all__ = ["BatchStream", "DataFileError", "FORMATS", "LoadedData", "SPLITS", "SampleBatches", "Samples",
           "SyntheticConfig", "SyntheticDIN", "Vocabulary", "load"]
