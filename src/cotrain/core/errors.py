"""The root of cotrain's error tree.

Every package keeps its own ``errors.py`` whose classes derive from these::

    CotrainError                      anything cotrain raises on purpose
    ├── UsageError (ValueError)       the user's mistake: the CLI prints one line, exits 2
    │   └── ConfigError               a config file or override is wrong; the message says the fix
    ├── TimeoutExpired (TimeoutError) a blocking wait ran past its deadline
    └── (per package) CommError, ShardcastError, ToplocError, ...

Users' mistakes raise ``ValueError`` subclasses with a message that says what to do; internal
invariants use ``assert``.
"""


class CotrainError(Exception):
    """Base class of every error cotrain raises on purpose."""


class UsageError(CotrainError, ValueError):
    """The user's mistake (a bad value, a missing file, an output directory of another run):
    every ``cotrain`` role prints its message as one ``error:`` line and exits with code 2."""


class ConfigError(UsageError):
    """A configuration file or override is invalid."""


class TimeoutExpired(CotrainError, TimeoutError):
    """A blocking wait ran past its deadline."""
