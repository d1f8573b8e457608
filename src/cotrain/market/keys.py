"""Provider API keys: from the environment or an owner-only file, never the command line.

``key_for("vast")`` reads ``COTRAIN_VAST_API_KEY``, then the provider's own variable
(``VAST_API_KEY``), then ``~/.config/cotrain/market-keys.toml`` (``vast = "..."``), which must
be readable by its owner only (0600), or it is refused with the fix named. A key is never
printed: adapters keep it in a request header, and their errors and ``repr`` leave it out.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

from cotrain.market.provider import ProviderError

KEYS_FILE = Path("~/.config/cotrain/market-keys.toml")
_OWN_VARIABLE = {
    "vast": "VAST_API_KEY",
    "runpod": "RUNPOD_API_KEY",
    "lambda": "LAMBDA_API_KEY",
    "prime": "PRIME_API_KEY",
    "tensordock": "TENSORDOCK_API_KEY",
    "akash": "AKASH_API_KEY",
    "ionet": "IO_API_KEY",
}


def key_for(provider: str, *, file: Path = KEYS_FILE) -> str | None:
    """The API key of ``provider``, or None when none is configured."""
    for var in (f"COTRAIN_{provider.upper()}_API_KEY", _OWN_VARIABLE.get(provider, "")):
        if var and os.environ.get(var):
            return os.environ[var]
    path = file.expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ProviderError(
            f"{path} is readable by others ({stat.filemode(mode)}): it holds API keys, "
            f"chmod 600 {path}"
        )
    try:
        keys = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ProviderError(f"{path}: {e}") from None
    value = keys.get(provider)
    return str(value) if value else None
