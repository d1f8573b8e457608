"""Errors raised by shardcast.

::

    CotrainError
    └── ShardcastError                    anything shardcast raises on purpose
        ├── ManifestError                 a manifest is malformed or cannot be trusted
        │   ├── ForgedManifestError       its signature does not verify against the publisher key
        │   └── ReplayedManifestError     validly signed, but for another version or channel
        ├── IntegrityError                bytes do not match the hashes in the signed manifest
        ├── MalformedResponse             a server answered outside the protocol (bad JSON, too big)
        ├── VersionNotFound (LookupError) no server offers the requested version
        │   └── StaleVersionError         the newest one offered is older than max_manifest_age_s
        ├── UpstreamUnavailable           no server could be reached (or every one misbehaved)
        ├── OutputError (OSError)         the output file could not be written (disk full, ...)
        └── FetchTimeout (TimeoutExpired) the fetch ran past its deadline

A server that serves forged manifests, corrupt bytes or malformed answers is not an error for the
caller as long as another server has the right bytes: it is avoided and listed in
``FetchResult.bad_servers``. A server is listed only for what it alone sent: bytes of a shard
that several servers contributed to are refetched whole from one server before anyone is blamed.
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
    """A validly signed manifest offered for another version or channel than the one asked."""


class IntegrityError(ShardcastError):
    """Downloaded bytes do not match the hashes in the signed manifest."""


class MalformedResponse(ShardcastError):
    """A server answered outside the protocol: malformed JSON, a body over its size bound, ..."""


class VersionNotFound(ShardcastError, LookupError):
    """No server offers the requested version (it may not be published yet, or was retired)."""


class StaleVersionError(VersionNotFound):
    """The newest version any server offered was signed longer ago than ``max_manifest_age_s``."""


class UpstreamUnavailable(ShardcastError):
    """No server could be reached, or every reachable one misbehaved."""


class OutputError(ShardcastError, OSError):
    """The output could not be written (disk full, permission denied, ...); nothing was left."""


class FetchTimeout(ShardcastError, TimeoutExpired):
    """A fetch ran past its deadline."""
