"""Foundation shared by every part of cotrain: errors, typed configs, clocks, identities,
signed envelopes and JSON from strangers."""

from cotrain.core.clock import Clock, Deadline, MonotonicClock
from cotrain.core.config import ConfigModel, apply_overrides, load_config
from cotrain.core.errors import ConfigError, CotrainError, TimeoutExpired
from cotrain.core.identity import Identity, verify_signature
from cotrain.core.jsonsafe import MalformedJSON
from cotrain.core.signed import Envelope, EnvelopeError

__all__ = [
    "Clock",
    "ConfigError",
    "ConfigModel",
    "CotrainError",
    "Deadline",
    "Envelope",
    "EnvelopeError",
    "Identity",
    "MalformedJSON",
    "MonotonicClock",
    "TimeoutExpired",
    "apply_overrides",
    "load_config",
    "verify_signature",
]
