"""Shared pytest setup: ``netns`` tests skip, with the reason, where namespaces cannot be built."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    netns_items = [item for item in items if item.get_closest_marker("netns") is not None]
    if not netns_items:
        return
    from cotrain.netem import netns_unavailable_reason

    reason = netns_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"netns: {reason}")
    for item in netns_items:
        item.add_marker(skip)
