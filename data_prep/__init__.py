"""data_prep: SUN RGB-D (+ extra ImageFolder trees) -> clean, deterministic 70/20/10 room dataset.

Run it as `python -m data_prep --sunrgbd PATH [--extra DIR ...] --out DIR`. Training imports
`CLASSES` from here so that both stages agree on the class names and their order.
"""

from data_prep.common import CLASSES, SPLITS, DataPrepError, Settings
from data_prep.pipeline import PrepResult, prepare_dataset

__all__ = ["CLASSES", "SPLITS", "DataPrepError", "PrepResult", "Settings", "prepare_dataset"]
