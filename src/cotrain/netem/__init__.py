"""Emulated WAN links for tests and benchmarks: hosts in network namespaces, shaped links.

``WanNetwork`` builds N hosts on one switch with rate limits (``tc tbf``) and random loss
(nftables); ``DelayProxy`` adds latency in userspace, since this kernel has no netem. Needs root
plus ``ip``, ``tc`` and ``nft``; ``netns_unavailable_reason()`` says why not when it cannot.

Names load lazily (PEP 562): the proxy and probe programs (``python -m cotrain.netem.proxy``)
import this package first and should start in a tenth of a second, without pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cotrain.netem.delay_proxy import DelayProxy
    from cotrain.netem.errors import NetemCommandError, NetemError, NetnsUnavailable, ProxyError
    from cotrain.netem.host import Host
    from cotrain.netem.netns import cleanup_leftovers, netns_unavailable_reason
    from cotrain.netem.network import LinkSettings, WanConfig, WanNetwork
    from cotrain.netem.shaping import DropCounts

_HOME = {
    "DelayProxy": "delay_proxy",
    "DropCounts": "shaping",
    "Host": "host",
    "LinkSettings": "network",
    "NetemCommandError": "errors",
    "NetemError": "errors",
    "NetnsUnavailable": "errors",
    "ProxyError": "errors",
    "WanConfig": "network",
    "WanNetwork": "network",
    "cleanup_leftovers": "netns",
    "netns_unavailable_reason": "netns",
}

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


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'cotrain.netem' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cotrain.netem.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
