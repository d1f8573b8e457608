"""shardcast: publish a checkpoint once, deliver it to many workers fast and intact.

Origin (``Origin``, ``publish``) → relays (``Relay``) → clients (``fetch``, ``watch``,
``load_into``), over HTTP. Every version carries a manifest signed by the publisher; clients
and relays check it and every shard's hash, so relays need not be trusted.
"""

from cotrain.shardcast.client import FetchResult, fetch, fetch_async, load_into, watch
from cotrain.shardcast.config import (
    ClientConfig,
    FaultConfig,
    OriginConfig,
    PublishConfig,
    RelayConfig,
    TransferConfig,
)
from cotrain.shardcast.errors import ShardcastError
from cotrain.shardcast.manifest import Manifest, SignedManifest, TrustPolicy
from cotrain.shardcast.origin import Origin
from cotrain.shardcast.publisher import PublishResult, publish
from cotrain.shardcast.relay import Relay

__all__ = [
    "ClientConfig",
    "FaultConfig",
    "FetchResult",
    "Manifest",
    "Origin",
    "OriginConfig",
    "PublishConfig",
    "PublishResult",
    "Relay",
    "RelayConfig",
    "ShardcastError",
    "SignedManifest",
    "TransferConfig",
    "TrustPolicy",
    "fetch",
    "fetch_async",
    "load_into",
    "publish",
    "watch",
]
