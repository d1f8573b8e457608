"""Errors raised by shardcast.

::

    CotrainError
    └── ShardcastError                    anything shardcast raises on purpose
        ├── ManifestError                 a manifest is malformed or cannot be trusted
        │   ├── ForgedManifestError       its signature does not verify against the publisher key
        │   └── ReplayedManifestError     validly signed, but for another version/channel or too old
        ├── IntegrityError                bytes do not match the hashes in the signed manifest
        ├── VersionNotFound (LookupError) no server offers the requested version
        ├── UpstreamUnavailable           no server could be reached (or every one misbehaved)
        ├── OutputError (OSError)         the output file could not be written (disk full, ...)
        └── FetchTimeout (TimeoutExpired) the fetch ran past its deadline

A server that serves forged manifests or corrupt bytes is not an error for the caller as long as
another server has the right bytes: it is avoided and listed in ``FetchResult.bad_servers``.
"""

from __future__ import annotations

from cotrain.core.errors import CotrainError, TimeoutExpired


class ShardcastError(CotrainError):
    """Base class of shardcast's errors."""


class ManifestError(ShardcastError):
    """A manifest is malformed or cannot be trusted."""


class ForgedManifestError(ManifestError):
    """A manifest's signature does not verify against the configured publisher key."""


class ReplayedManifestError(ManifestError):
    """A validly signed manifest offered for another version or channel, or older than allowed."""


class IntegrityError(ShardcastError):
    """Downloaded bytes do not match the hashes in the signed manifest."""


class VersionNotFound(ShardcastError, LookupError):
    """No server offers the requested version (it may not be published yet, or was retired)."""


class UpstreamUnavailable(ShardcastError):
    """No server could be reached, or every reachable one misbehaved."""


class OutputError(ShardcastError, OSError):
    """The output could not be written (disk full, permission denied, ...); nothing was left."""


class FetchTimeout(ShardcastError, TimeoutExpired):
    """A fetch ran past its deadline."""
