"""Errors of ``cotrain.models``::

CotrainError
└── ModelError (UsageError)          a model could not be built or loaded: the CLI says so in
    │                                one line and exits 2 (a path, a package, a spec to fix)
    ├── ModelNotFoundError           weights not installed where we look; says how to get them
    └── ModelSpecError               a model spec string or config is malformed
"""

from __future__ import annotations

from cotrain.core.errors import UsageError


class ModelError(UsageError):
    """A model could not be built or loaded."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model's files are not installed; the message says how to install them."""


class ModelSpecError(ModelError):
    """A model spec (``smollm2``, ``gpt-debug-seed0``, a directory) is malformed."""
