"""Typed configs: pydantic models from TOML, environment variables and dotted overrides.

Each component owns a small ``ConfigModel``; a parent holds its children's models as fields.
A config is resolved in one order, later wins::

    the model's defaults  <  the TOML file  <  COTRAIN_* variables  <  overrides (the CLI)

    load_config(TrainConfig, "configs/train-debug.toml", ["--algo.mode=single"])
    config_from_env(CommConfig, "COTRAIN_COMM__")   # in a user's script: defaults < environment

Overrides are ``[--]section.key=value`` strings (the CLI also takes ``--section.key value``);
``-`` in a key reads as ``_``. A value is read for its field's type: a string or path field
takes the text as written (or a quoted TOML string, ``'"x"'``); a list field takes TOML
(``["a", "b"]``) or a comma list (``a,b``); anything else is a TOML value (``48400``,
``2.5``, ``inf``, ``true``, ``{ a = 1 }``), else JSON, else the text (pydantic then says what
it expected). ``null`` sets an optional field to none.

Environment variables: ``COTRAIN_<SECTION>__<KEY>``, upper case, ``__`` between levels, e.g.
``COTRAIN_COMM__MASTER_PORT=48400`` is ``--comm.master_port=48400`` and ``COTRAIN_TOTAL_STEPS``
a top-level field. A variable that names no field of the model is ignored (one environment
serves every role). ``COTRAIN_SECRET`` also sets every ``secret`` field (at any depth) that no
more specific variable sets.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from cotrain.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

ENV_PREFIX = "COTRAIN_"
"""Prefix of the variables ``load_config`` reads by default."""
SECRET_ENV = "COTRAIN_SECRET"
"""Fills every ``secret`` field that no more specific variable sets."""
REDACTED = "<redacted>"
"""What ``dump_json`` shows for a secret that is set."""

Shape = Literal["str", "list", "other"]


class ConfigModel(BaseModel):
    """Base for every config: unknown keys are errors, field docstrings become help text.

    Fields declared with ``repr=False`` are secrets: ``dump_json`` shows them as
    ``"<redacted>"`` when set, so a resolved config can be written next to a run's output."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=False)

    def dump_json(self) -> str:
        """The resolved config as JSON, secrets redacted, for run logs and ``--print-config``."""
        return json.dumps(_redacted(self), indent=2, default=str, allow_nan=True)


def _redacted(model: BaseModel) -> dict[str, Any]:
    out = model.model_dump()  # python mode: an infinite float stays one (JSON mode writes null)
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out[name] = _redacted(value)
        elif info.repr is False and value:
            out[name] = REDACTED
    return out


# ---- field lookup ------------------------------------------------------------------------------


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (annotation, False)."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return args[0], optional
        return typing.Union[tuple(args)], optional  # noqa: UP007 (a runtime union of types)
    return annotation, False


def _model_of(annotation: Any) -> type[BaseModel] | None:
    inner, _ = _strip_optional(annotation)
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return inner
    return None


def _shape(annotation: Any) -> Shape:
    """How a raw text value is read for a field of this type."""
    inner, _ = _strip_optional(annotation)
    origin = typing.get_origin(inner)
    if inner is str or (isinstance(inner, type) and issubclass(inner, PurePath)):
        return "str"
    if origin is Literal and all(isinstance(a, str) for a in typing.get_args(inner)):
        return "str"
    if origin in (list, tuple, set, frozenset):
        return "list"
    return "other"


def _env_key(name: str) -> str:
    return name.replace("-", "_")


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``model`` (sections and leaves)."""
    out = []
    for name, info in model.model_fields.items():
        out.append(prefix + name)
        sub = _model_of(info.annotation)
        if sub is not None:
            out += _all_keys(sub, f"{prefix}{name}.")
    return out


def _unknown(model: type[BaseModel], key: str) -> ConfigError:
    keys = _all_keys(model)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    leaf = key.rsplit(".", 1)[-1]
    if not close:  # the right key in the wrong section: --master_port for comm.master_port
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r} for {model.__name__}{hint}")


def field_for(model: type[BaseModel], key: str) -> FieldInfo | None:
    """The field a dotted ``key`` names (None inside a dict-valued field, where any key goes).

    Raises ``ConfigError`` for an unknown key, with the closest known one as a hint."""
    node: type[BaseModel] | None = model
    info: FieldInfo | None = None
    parts = key.split(".")
    for i, part in enumerate(parts):
        if node is None:
            if info is not None and typing.get_origin(_strip_optional(info.annotation)[0]) is dict:
                return None  # a key inside a dict field
            raise ConfigError(f"{'.'.join(parts[:i])!r} is a value, not a section")
        if part not in node.model_fields:
            raise _unknown(model, key)
        info = node.model_fields[part]
        node = _model_of(info.annotation)
    return info


def is_bool(info: FieldInfo) -> bool:
    """Whether a field holds a bool (``--flag`` alone on the command line sets it true)."""
    return _strip_optional(info.annotation)[0] is bool


def parse_value(raw: str, info: FieldInfo | None = None) -> Any:
    """Read the text ``raw`` for the field ``info`` (see the module docstring)."""
    annotation = info.annotation if info is not None else None
    optional = annotation is not None and _strip_optional(annotation)[1]
    if optional and raw == "null":
        return None
    shape = _shape(annotation) if annotation is not None else "other"
    if shape == "str":
        if len(raw) >= 2 and raw[0] in "\"'" and raw[-1] == raw[0]:  # a quoted TOML string
            try:
                quoted = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                return raw
            return quoted if isinstance(quoted, str) else raw
        return raw
    if shape == "list" and not raw.lstrip().startswith("["):
        return [item.strip() for item in raw.split(",") if item.strip()]
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return raw


# ---- sources -------------------------------------------------------------------------------------


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def _keep_section_defaults(model: type[BaseModel], data: dict[str, Any]) -> None:
    """A section given in part keeps its default's values for the rest.

    ``RelayConfig.transfer`` defaults to ``TransferConfig(parallel_downloads=8)``: setting
    ``transfer.stall_timeout_s`` alone must not bring back the class default of 6."""
    for name, info in model.model_fields.items():
        sub = _model_of(info.annotation)
        given = data.get(name)
        if sub is None or not isinstance(given, dict):
            continue
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            base = default.model_dump(exclude_defaults=True)
            for key, value in base.items():
                if key not in given:
                    given[key] = value
        _keep_section_defaults(sub, given)


def split_override(item: str) -> tuple[str, str]:
    """``"--a.b=v"`` or ``"a.b=v"`` -> ``("a.b", "v")``."""
    key, sep, raw = item.removeprefix("--").partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like --section.key=value")
    return _env_key(key), raw


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` (or ``--a.b.c=value``) strings to a nested dict, returning it.

    Untyped: values are read as TOML, else JSON, else kept as text (``load_config`` reads
    them for their field's type instead)."""
    for item in overrides:
        key, raw = split_override(item)
        _set(data, key, parse_value(raw))
    return data


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``model`` that is not a section."""
    out = []
    for name, info in model.model_fields.items():
        sub = _model_of(info.annotation)
        out += [prefix + name] if sub is None else _leaves(sub, f"{prefix}{name}.")
    return out


def env_overrides(
    model: type[BaseModel], prefix: str = ENV_PREFIX, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The variables of ``environ`` that name a field of ``model``: ``{dotted key: text}``."""
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    secrets: list[str] = []
    for key in _leaves(model):
        name = env_name(key, prefix)
        if name in environ:
            out[key] = environ[name]
        elif key.rsplit(".", 1)[-1] == "secret":
            secrets.append(key)
    if SECRET_ENV in environ:
        for key in secrets:
            out[key] = environ[SECRET_ENV]
    return out


def env_name(key: str, prefix: str = ENV_PREFIX) -> str:
    """The variable of the dotted ``key``: ``comm.master_port`` -> ``COTRAIN_COMM__MASTER_PORT``."""
    return prefix + key.upper().replace(".", "__")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _describe_errors(model: type[BaseModel], e: ValidationError, sources: Mapping[str, str]) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(str(_unknown(model, loc)))
            continue
        value = err.get("input")
        if not isinstance(value, dict | list) and err["type"] not in ("missing", "value_error"):
            msg += f", got {json.dumps(value, default=str)[:80]}"
        if loc in sources:
            msg += f" (from {sources[loc]})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def load_config(
    model: type[M],
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    *,
    env: bool = True,
    env_prefix: str = ENV_PREFIX,
    environ: Mapping[str, str] | None = None,
) -> M:
    """Resolve ``model``: defaults < the TOML file ``path`` < ``COTRAIN_*`` variables <
    ``overrides``. Errors are one ``ConfigError`` line that names the key and what to fix.

    ``overrides``: ``"[--]a.b=text"`` strings, or ``{"a.b": value}`` where a text value is read
    for its field's type and anything else is taken as it is. ``env=False`` skips the
    environment; ``env_prefix`` reads e.g. a ``CommConfig`` from ``COTRAIN_COMM__*``.
    """
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    where = ""
    if path is not None:
        data = _read_toml(Path(path))
        where = f" in {path}"
    if env:
        variables = os.environ if environ is None else environ
        for key, raw in env_overrides(model, env_prefix, variables).items():
            _set(data, key, parse_value(raw, field_for(model, key)))
            name = env_name(key, env_prefix)
            sources[key] = name if name in variables else SECRET_ENV
    items: list[tuple[str, Any]]
    if overrides is None:
        items = []
    elif isinstance(overrides, Mapping):
        items = [(_env_key(k), v) for k, v in overrides.items()]
    else:
        items = [split_override(item) for item in overrides]
    for key, value in items:
        info = field_for(model, key)
        _set(data, key, parse_value(value, info) if isinstance(value, str) else value)
        sources[key] = f"--{key}"
    _keep_section_defaults(model, data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        detail = _describe_errors(model, e, sources)
        raise ConfigError(f"invalid {model.__name__}{where}: {detail}") from None


def config_from_env(
    model: type[M], prefix: str = ENV_PREFIX, environ: Mapping[str, str] | None = None
) -> M:
    """``model`` from its defaults and the variables ``<prefix><KEY>`` (``__`` between levels).

    For a user's script under ``cotrain launch``: ``config_from_env(CommConfig,
    "COTRAIN_COMM__")`` reads ``COTRAIN_COMM__MASTER_HOST``, ``COTRAIN_COMM__MASTER_PORT`` and
    (through ``COTRAIN_SECRET``) the run secret."""
    return load_config(model, env_prefix=prefix, environ=environ)


# ---- help and round trips ----------------------------------------------------------------------


@dataclass(frozen=True)
class FieldDoc:
    """One leaf of a config, as ``--help`` lists it."""

    key: str
    """Dotted name (``comm.master_port``)."""
    type: str
    """Readable type (``int``, ``"diloco" | "ddp"``, ``list[str]``)."""
    default: str
    """The default as JSON, ``(required)``, or ``""`` for a secret."""
    doc: str
    """The field's docstring (or its section's, for an undocumented section field)."""


def type_name(annotation: Any) -> str:
    """A short, readable name of a field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "none"
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(map(type_name, args))}]"
    if isinstance(annotation, type):
        return "path" if issubclass(annotation, PurePath) else annotation.__name__
    return str(annotation)


def _default_text(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)


def describe(model: type[BaseModel] | BaseModel, prefix: str = "") -> list[FieldDoc]:
    """Every leaf field of ``model`` (a class, or an instance whose values are the defaults),
    recursively through its sections, for ``--help``."""
    cls = model if isinstance(model, type) else type(model)
    out: list[FieldDoc] = []
    for name, info in cls.model_fields.items():
        key = prefix + name
        if isinstance(model, BaseModel):
            default: Any = getattr(model, name)
        elif info.is_required():
            default = None
        else:
            default = info.get_default(call_default_factory=True)
        sub = _model_of(info.annotation)
        if sub is not None:  # a section (one that is off by default lists its fields too)
            if not isinstance(default, BaseModel):  # off by default: say how to turn it on
                doc = " ".join((info.description or sub.__doc__ or "").split())
                on = "Off by default: setting any of its fields turns it on; null turns it off."
                out.append(FieldDoc(key, f"{sub.__name__} | null", "null", f"{doc} {on}"))
                out += [
                    FieldDoc(d.key, d.type, "(required when on)", d.doc)
                    if d.default == "(required)"
                    else d
                    for d in describe(sub, key + ".")
                ]
                continue
            out += describe(default, key + ".")
            continue
        doc = (info.description or (sub.__doc__ if sub else "") or "").strip()
        if info.is_required() and not isinstance(model, BaseModel):
            text = "(required)"
        elif info.repr is False:
            text = '""'
        else:
            text = _default_text(default)
        out.append(FieldDoc(key, type_name(info.annotation), text, " ".join(doc.split())))
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | PurePath):
        text = json.dumps(str(value), ensure_ascii=False)
        return text.replace("\x7f", "\\u007f")  # TOML forbids a raw DEL in a basic string
    if isinstance(value, BaseModel):
        return _toml_value(value.model_dump())
    if isinstance(value, Mapping):
        items = ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        raise ValueError("none inside a list or table cannot be written as an override")
    raise TypeError(f"cannot write {type(value).__name__} as an override")


def to_overrides(config: BaseModel, prefix: str = "") -> list[str]:
    """``--key=value`` overrides that rebuild ``config`` from its model's defaults (every leaf
    that differs from its default): how a process driver hands a config to ``cotrain ROLE``."""
    out: list[str] = []
    for name, info in type(config).model_fields.items():
        value = getattr(config, name)
        key = prefix + name
        if isinstance(value, BaseModel) and _model_of(info.annotation) is type(value):
            out += to_overrides(value, key + ".")
            continue
        if not info.is_required() and value == info.get_default(call_default_factory=True):
            continue
        if value is None:
            text = "null"
        elif _shape(info.annotation) == "str":
            text = str(value)
        else:
            text = _toml_value(value)
        out.append(f"--{key}={text}")
    return out
