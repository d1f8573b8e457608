"""Errors raised by the data package.

::

    CotrainError
    └── UsageError (ValueError)        the CLI prints the message as one line and exits 2
        └── DataError                  anything the data package raises on purpose: a missing
            │                          path, an empty file, a bad JSONL line, a corpus too small
            ├── SourceUnavailableError a built-in text could not be downloaded (pip failed, offline)
            ├── CorpusError            a downloaded archive does not hold the expected texts
            └── CacheBusyError (TimeoutExpired)  another process held the cache lock for too long

Every message is one line that names the file (and line) at fault and says what to do.
"""

from __future__ import annotations

from cotrain.core.errors import TimeoutExpired, UsageError


class DataError(UsageError):
    """Base class of the data package's errors: the data or its config needs fixing."""


class SourceUnavailableError(DataError):
    """A text source could not be downloaded from the package registry."""


class CorpusError(DataError):
    """A downloaded archive does not contain the texts we expect."""


class CacheBusyError(DataError, TimeoutExpired):
    """Another process is preparing the same data and did not finish in time."""
