"""JSON from strangers: bounded in size, depth and number range, never a traceback.

``json.loads`` on hostile bytes can raise five different exceptions (a 5,000-digit integer is a
``ValueError`` that is not a ``JSONDecodeError``; deep nesting is a ``RecursionError``) and
happily returns ``Infinity``. Everything cotrain reads from the network goes through ``loads``
here, which turns every such case into one ``MalformedJSON`` with a message fit for a log line.
"""

from __future__ import annotations

import json
from typing import Any

from cotrain.core.errors import CotrainError

MAX_DEPTH = 32
"""Nesting deeper than this is refused (no cotrain message nests more than a handful)."""
MAX_INT_DIGITS = 40
"""Integers longer than this are refused (ids, sizes and versions fit in 64 bits)."""


class MalformedJSON(CotrainError, ValueError):
    """Bytes from the network that are not JSON cotrain accepts."""


def _no_constant(name: str) -> Any:
    raise MalformedJSON(f"{name} is not allowed in JSON")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise MalformedJSON(f"integer of {len(text)} digits")
    return int(text)


def _bounded_float(text: str) -> float:
    if len(text) > 64:
        raise MalformedJSON(f"number of {len(text)} characters")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise MalformedJSON(f"number {text[:20]} overflows a double")
    return value


def _depth(obj: Any, limit: int) -> None:
    stack = [(obj, 1)]
    while stack:
        item, d = stack.pop()
        if d > limit:
            raise MalformedJSON(f"JSON nested deeper than {limit} levels")
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)


def loads(data: bytes | str, *, max_bytes: int | None = None, max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted JSON or raise ``MalformedJSON`` (never anything else)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise MalformedJSON(f"JSON document of {len(data)} bytes exceeds {max_bytes}")
    try:
        obj = json.loads(
            data,
            parse_constant=_no_constant,
            parse_int=_bounded_int,
            parse_float=_bounded_float,
        )
    except MalformedJSON:
        raise
    except RecursionError:
        raise MalformedJSON("JSON nested too deeply") from None
    except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MalformedJSON(f"not valid JSON: {str(e)[:200]}") from None
    _depth(obj, max_depth)
    return obj


def loads_object(data: bytes | str, **kwargs: Any) -> dict[str, Any]:
    """``loads`` for documents that must be a JSON object."""
    obj = loads(data, **kwargs)
    if not isinstance(obj, dict):
        raise MalformedJSON(f"expected a JSON object, got {type(obj).__name__}")
    return obj
