"""Typed configs: pydantic models loaded from TOML, with dotted ``--a.b=value`` overrides.

Each component owns a small ``ConfigModel``; a parent holds its children's models as fields.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from cotrain.core.errors import ConfigError

M = TypeVar("M", bound="ConfigModel")


class ConfigModel(BaseModel):
    """Base for every config: unknown keys are errors, field docstrings become help text."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=False)

    def dump_json(self) -> str:
        """The resolved config as JSON, for run logs."""
        return self.model_dump_json(indent=2)


def _parse_value(raw: str) -> Any:
    """Parse an override value as TOML/JSON when possible, else keep it as a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` (or ``--a.b.c=value``) strings to a nested dict, returning it."""
    for item in overrides:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def load_config(
    model: type[M], path: str | Path | None = None, overrides: list[str] | None = None
) -> M:
    """Load ``model`` from a TOML file (optional) plus dotted overrides; errors say what to fix."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid {model.__name__}{where}:\n" + "\n".join(lines)) from None
