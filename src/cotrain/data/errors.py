"""Errors raised by the data package.

::

    CotrainError
    └── DataError                      anything the data package raises on purpose
        ├── SourceUnavailableError     a text source could not be downloaded (pip failed, offline)
        ├── CorpusError                a downloaded archive does not hold the expected texts
        └── CacheBusyError (TimeoutExpired)  another process held the cache lock for too long
"""

from __future__ import annotations

from cotrain.core.errors import CotrainError, TimeoutExpired


class DataError(CotrainError):
    """Base class of the data package's errors."""


class SourceUnavailableError(DataError):
    """A text source could not be downloaded from the package registry."""


class CorpusError(DataError):
    """A downloaded archive does not contain the texts we expect."""


class CacheBusyError(DataError, TimeoutExpired):
    """Another process is preparing the same data and did not finish in time."""
