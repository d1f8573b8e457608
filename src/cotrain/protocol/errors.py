"""What the protocol raises, and the HTTP status each error becomes at the coordinator::

    ProtocolError (CotrainError)
    ├── RequestError (ValueError)    400  malformed, oversized or non-canonical request
    ├── AuthError                    401  unsigned, forged, replayed, or outside the clock window
    ├── Forbidden                    403  signed, but this key may not do this
    ├── NotFound                     404  no such task, work unit, invite, entry or checkpoint
    ├── Conflict                     409  the request does not fit the state (duplicate work,
    │                                     a task that is not open, a unit already final)
    ├── RateLimited                  429  this key sent more than its share
    ├── Unavailable                  503  the coordinator cannot commit right now (disk full);
    │                                     nothing was written, the request may be retried
    └── AuditError                        the ledger or what the coordinator publishes is wrong;
                                          ``seq`` names the first bad entry when there is one

A request refused with any of these changed nothing: it has no ledger entry.
"""

from __future__ import annotations

from cotrain.core.errors import CotrainError


class ProtocolError(CotrainError):
    status = 500
    reason = ""
    """The coordinator's own words, without the method, path and status (set by the client)."""


class RequestError(ProtocolError, ValueError):
    status = 400


class AuthError(ProtocolError):
    status = 401


class Forbidden(ProtocolError):
    status = 403


class NotFound(ProtocolError):
    status = 404


class Conflict(ProtocolError):
    status = 409


class RateLimited(ProtocolError):
    status = 429


class Unavailable(ProtocolError):
    status = 503


class AuditError(ProtocolError):
    """The audit found a ledger that is not what it claims; ``seq`` is the entry at fault."""

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        super().__init__(message if seq is None else f"entry {seq}: {message}")
        self.seq = seq
