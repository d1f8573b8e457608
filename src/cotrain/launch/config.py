"""The config of ``cotrain launch``: how many workers, and which master they join."""

from __future__ import annotations

from pydantic import Field, field_validator

from cotrain.core.config import ConfigModel


class LaunchConfig(ConfigModel):
    """``cotrain launch --nproc N CONFIG.toml [--overrides]`` or ``... script.py [args]``."""

    nproc: int = Field(default=1, ge=1, le=1024)
    """Workers to start on this machine."""
    master: str | None = None
    """HOST:PORT of a running master to add the workers to (the run secret in COTRAIN_SECRET);
    none: start a master here (a random secret, a free port) and stop it at the end."""
    first_index: int = Field(default=0, ge=0)
    """``worker_index`` of the first worker started here; the others follow (+1 each)."""
    master_host: str = "127.0.0.1"
    """Address of the master started here (another machine's workers need a reachable one)."""
    start_timeout_s: float = Field(default=60.0, gt=0)
    """Longest wait for the master started here to listen."""
    stop_timeout_s: float = Field(default=20.0, gt=0)
    """After Ctrl-C, SIGTERM or a dead master: how long the processes get to stop before
    SIGKILL."""

    @field_validator("master")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"master {v!r} must be HOST:PORT, e.g. 10.0.0.1:48400")
        return v

    def master_address(self) -> tuple[str, int]:
        assert self.master is not None
        host, _, port = self.master.rpartition(":")
        return host.strip("[]"), int(port)
