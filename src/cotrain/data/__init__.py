"""Real text for training: registry downloads, a local byte-level BPE, cached sharded tokens.

The public surface::

    DataConfig, prepare, Prepared, ShardReader, Batch, validation_batches, and the errors.
"""

from cotrain.data.config import DataConfig
from cotrain.data.errors import CacheBusyError, CorpusError, DataError, SourceUnavailableError
from cotrain.data.prepare import Prepared, prepare
from cotrain.data.shards import Batch, ShardReader, validation_batches

__all__ = [
    "Batch",
    "CacheBusyError",
    "CorpusError",
    "DataConfig",
    "DataError",
    "Prepared",
    "ShardReader",
    "SourceUnavailableError",
    "prepare",
    "validation_batches",
]
