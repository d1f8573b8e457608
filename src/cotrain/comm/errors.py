"""Errors raised by ``cotrain.comm``.

::

    CommError (CotrainError)
    ├── ListenError (UsageError)  this peer's data server cannot bind its address
    ├── AuthError                 the other side does not know the run secret (or we do not)
    ├── ProtocolError             malformed, oversized or unexpected frame; connection dropped
    ├── MasterUnreachableError    no master answered within the connect/reconnect timeout
    ├── KickedError               the master removed this peer (it missed heartbeats or votes)
    ├── CollectiveError           a collective did not complete; the tensor is unchanged
    │   ├── PeerFailedError       a peer died, stalled or was cut off mid-collective (retryable)
    │   ├── TopologyChangedError  membership changed since the last update_topology() (retryable)
    │   └── MismatchError (ValueError)  peers passed different shapes, dtypes, ops, counts
    ├── StateSyncError            shared-state sync could not obtain the majority state
    │   └── RevisionError (ValueError)  the revision did not go up by exactly one
    └── (TimeoutExpired from cotrain.core.errors for any blocking wait past its deadline)

``PeerFailedError`` and ``TopologyChangedError`` are the ones a retry loop catches: call
``update_topology()`` and run the collective again with the survivors.
"""

from cotrain.core.errors import CotrainError, UsageError


class CommError(CotrainError):
    """Base class of communication errors."""


class ListenError(CommError, UsageError):
    """This peer's data server cannot bind its address (in use, not this host's)."""


class AuthError(CommError):
    """Challenge-response authentication failed."""


class ProtocolError(CommError):
    """A frame was malformed, too large, or not what the protocol expects at this point."""


class MasterUnreachableError(CommError):
    """The master could not be reached within the configured time."""


class KickedError(CommError):
    """The master removed this peer from the run."""


class CollectiveError(CommError):
    """A collective operation did not complete; the input tensor is left as it was."""


class PeerFailedError(CollectiveError):
    """A peer died, stalled or was cut off during the collective; retry after update_topology()."""


class TopologyChangedError(CollectiveError):
    """Membership changed; call update_topology() before the next collective."""


class MismatchError(CollectiveError, ValueError):
    """Peers disagree on the collective's shape, dtype, op, quantization or kind."""


class StateSyncError(CommError):
    """Shared-state synchronisation failed."""


class RevisionError(StateSyncError, ValueError):
    """A shared-state revision did not increase by exactly one."""


# KickedError too: the link reconnects and update_topology() joins the run again as a new peer.
RETRYABLE = (PeerFailedError, TopologyChangedError, KickedError)
