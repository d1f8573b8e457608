"""Errors of ``cotrain.models``::

CotrainError
└── ModelError                       a model could not be built or loaded
    ├── ModelNotFoundError           weights not installed where we look; says how to get them
    └── ModelSpecError (ValueError)  a model spec string is malformed
"""

from __future__ import annotations

from cotrain.core.errors import CotrainError


class ModelError(CotrainError):
    """A model could not be built or loaded."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model's files are not installed; the message says how to install them."""


class ModelSpecError(ModelError, ValueError):
    """A model spec (``smollm2``, ``gpt-debug-seed0``, a directory) is malformed."""
