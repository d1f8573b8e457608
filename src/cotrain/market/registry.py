"""Which providers this machine can use: local always, SSH hosts from the hosts file, and each
cloud whose API key is configured (``keys.py``). ``COTRAIN_<NAME>_URL`` points a cloud's API
elsewhere (a proxy; the tests' replay servers)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from cotrain.market.keys import key_for
from cotrain.market.provider import Provider

# name -> (module, class); each class takes (api_key, *, url=...) and has a module URL
CLOUDS: dict[str, tuple[str, str]] = {
    "vast": ("cotrain.market.vast", "VastProvider"),
    "prime": ("cotrain.market.prime", "PrimeProvider"),
    "runpod": ("cotrain.market.runpod", "RunPodProvider"),
    "lambda": ("cotrain.market.lambda_cloud", "LambdaProvider"),
    "tensordock": ("cotrain.market.tensordock", "TensorDockProvider"),
    "akash": ("cotrain.market.akash", "AkashProvider"),
    "ionet": ("cotrain.market.ionet", "IoNetProvider"),
}


def configured(
    state_dir: Path,
    *,
    hosts_file: Path | None = None,
    progress: Any = None,
    min_gflops: float = 0.0,
) -> dict[str, Provider]:
    """Every provider usable here, by name. A misconfigured one raises ``ProviderError``."""
    from cotrain.market.local import LocalProvider
    from cotrain.market.ssh import HOSTS_FILE, SshProvider, load_hosts

    out: dict[str, Provider] = {"local": LocalProvider(state_dir / "local")}
    hosts = load_hosts(hosts_file or HOSTS_FILE)
    if hosts:
        out["ssh"] = SshProvider(hosts, state_dir / "ssh", progress=progress, min_gflops=min_gflops)
    for name, (module, cls) in CLOUDS.items():
        key = key_for(name)
        if not key:
            continue
        mod = importlib.import_module(module)
        url = os.environ.get(f"COTRAIN_{name.upper()}_URL") or mod.URL
        out[name] = getattr(mod, cls)(key, url=url)
    return out
