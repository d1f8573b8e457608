"""Fault-tolerant collectives over plain TCP: a master for membership, peers in a ring.

The public surface::

    Communicator, CommConfig, MasterConfig, Master, all_reduce_with_retry,
    CollectiveResult, SyncResult, Handle, FaultPlan, Fault, and the errors in ``errors``.
"""

from cotrain.comm.communicator import (
    CollectiveResult,
    Communicator,
    Handle,
    SyncResult,
    all_reduce_with_retry,
)
from cotrain.comm.config import CommConfig, MasterConfig, TLSConfig
from cotrain.comm.errors import (
    AuthError,
    CollectiveError,
    CommError,
    KickedError,
    MasterUnreachableError,
    MismatchError,
    PeerFailedError,
    ProtocolError,
    RevisionError,
    StateSyncError,
    TopologyChangedError,
)
from cotrain.comm.faults import Fault, FaultPlan
from cotrain.comm.master import Master

__all__ = [
    "AuthError",
    "CollectiveError",
    "CollectiveResult",
    "CommConfig",
    "CommError",
    "Communicator",
    "Fault",
    "FaultPlan",
    "Handle",
    "KickedError",
    "Master",
    "MasterConfig",
    "MasterUnreachableError",
    "MismatchError",
    "PeerFailedError",
    "ProtocolError",
    "RevisionError",
    "StateSyncError",
    "SyncResult",
    "TLSConfig",
    "TopologyChangedError",
    "all_reduce_with_retry",
]
