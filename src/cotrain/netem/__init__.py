"""Emulated WAN links for tests and benchmarks: hosts in network namespaces, shaped links.

``WanNetwork`` builds N hosts on one switch with rate limits (``tc tbf``) and random loss
(nftables); ``DelayProxy`` adds latency in userspace, since this kernel has no netem. Needs root
plus ``ip``, ``tc`` and ``nft``; ``netns_unavailable_reason()`` says why not when it cannot.
"""

from cotrain.netem.delay_proxy import DelayProxy
from cotrain.netem.errors import NetemCommandError, NetemError, NetnsUnavailable, ProxyError
from cotrain.netem.host import Host
from cotrain.netem.netns import cleanup_leftovers, netns_unavailable_reason
from cotrain.netem.network import LinkSettings, WanConfig, WanNetwork
from cotrain.netem.shaping import DropCounts

__all__ = [
    "DelayProxy",
    "DropCounts",
    "Host",
    "LinkSettings",
    "NetemCommandError",
    "NetemError",
    "NetnsUnavailable",
    "ProxyError",
    "WanConfig",
    "WanNetwork",
    "cleanup_leftovers",
    "netns_unavailable_reason",
]
