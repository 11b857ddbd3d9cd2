"""WebDataset shards: builders (`mmt.data.build`), the exact-resume indexed loader and the streaming loader.

The trainer needs only the two factories::

    from mmt.data import build_train_loader, build_eval_loader
"""

from mmt.data.faults import DataError
from mmt.data.loader import build_eval_loader, build_train_loader
from mmt.data.protocol import TrainLoader

__all__ = ["DataError", "TrainLoader", "build_eval_loader", "build_train_loader"]
