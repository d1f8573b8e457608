"""Foundation shared by every part of cotrain: errors, typed configs, clocks, identities."""

from cotrain.core.clock import Clock, Deadline, MonotonicClock
from cotrain.core.config import ConfigModel, apply_overrides, load_config
from cotrain.core.errors import ConfigError, CotrainError, TimeoutExpired
from cotrain.core.identity import Identity, verify_signature

__all__ = [
    "Clock",
    "ConfigError",
    "ConfigModel",
    "CotrainError",
    "Deadline",
    "Identity",
    "MonotonicClock",
    "TimeoutExpired",
    "apply_overrides",
    "load_config",
    "verify_signature",
]
