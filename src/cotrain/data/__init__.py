"""Text for training: built-in texts or the user's own files, a tokenizer, cached sharded tokens.

The public surface::

    DataConfig, prepare, Prepared, ShardReader, Batch, validation_batches, and the errors.

Files: ``config.py`` (DataConfig), ``sources.py`` (built-in texts from the package registry),
``local.py`` (.txt/.jsonl files and directories), ``tokenizer.py`` (trained BPE or a given
tokenizer.json, end-of-text, token dtype), ``prepare.py`` (the cache), ``shards.py`` (batches).
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
