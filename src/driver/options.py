"""Declaring the options of a command as pydantic fields, and reporting a bad value the way users read it.

An option is a field of a pydantic model (`option`: default, --help text, unit, range, whether a resumed
run may change it). pydantic checks each value's type, `Literal` choices and range; `config_error` turns
its first error into a `ConfigError` that names the option (`--population`) or the file and key, the
value, and what was expected.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

# Strict: a file's "1" is not an int, nor 1 a bool; no NaN or infinity anywhere; unknown names refused.
STRICT = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class ConfigError(ValueError):
    """An invalid configuration value; the message names the option (and the file, if it came from one)."""


def option(
    default: Any, help: str, unit: str = "", resumable: bool = False, expect: str | None = None, **range: Any
) -> Any:
    """A field: its default, --help text, unit and range (pydantic's gt, ge, lt, le). `resumable`: a
    resumed run may change it (where and how engines run, how long the run goes on); every other option
    decides the weights and must equal the interrupted run's value. `expect`: what an out-of-range value is
    told it must be, where the range alone says it badly."""
    extra = {"unit": unit, "resumable": resumable, "expect": expect}
    if isinstance(default, dict):
        return Field(
            default_factory=lambda: dict(default), description=help, json_schema_extra=extra, **range
        )
    return Field(default, description=help, json_schema_extra=extra, **range)


def option_flag(name: str) -> str:
    """The command-line option of a field: `population_size` -> `--population-size`."""
    return "--" + name.replace("_", "-")


def field_type(field: FieldInfo) -> Any:
    """A field's type without None (`X | None` -> X) and without pydantic's Annotated constraints."""
    hint = field.annotation
    if type(None) in typing.get_args(hint):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint


def field_choices(field: FieldInfo) -> tuple[str, ...]:
    """A `Literal` field's choices; () for any other field."""
    hint = field_type(field)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def field_optional(field: FieldInfo) -> bool:
    """Whether a field admits None (`X | None`)."""
    return type(None) in typing.get_args(field.annotation)


# What a pydantic error of each type says was expected ({ctx} fields filled in).
_RANGE_ERRORS = {
    "greater_than": "> {gt}",
    "greater_than_equal": ">= {ge}",
    "less_than": "< {lt}",
    "less_than_equal": "<= {le}",
    "finite_number": "a finite number",
}
_TYPE_ERRORS = {"int": "int", "float": "float", "bool": "bool", "string": "str", "dict": "dict"}


def config_error(
    error: ValidationError, fields: dict[str, FieldInfo], where: str | None = None
) -> ConfigError:
    """The first of pydantic's errors as a ConfigError naming the option (or, for a file's value, `where`
    and the key), the value and what was expected. `fields`: the model's `model_fields`."""
    first = error.errors()[0]
    kind, loc, value = first["type"], first["loc"], first.get("input")
    if kind == "value_error":  # our own validators: the message names its options already
        return ConfigError(str(first["ctx"]["error"]))
    if kind == "extra_forbidden":
        return ConfigError(f"{where or 'options'}: unknown option {loc[0]!r}; valid: {', '.join(fields)}")
    name = loc[0]
    label = f"{where}: key '{name}'" if where else option_flag(name)
    shown = f"{loc[1]}={value!r}" if len(loc) > 1 and loc[-1] != "[key]" else repr(value)
    if kind == "literal_error":
        return ConfigError(f"{label}: expected one of {', '.join(field_choices(fields[name]))}, got {shown}")
    if kind in _RANGE_ERRORS:
        expect = fields[name].json_schema_extra["expect"] or _RANGE_ERRORS[kind].format(
            **first.get("ctx", {})
        )
        return ConfigError(f"{label}: must be {expect}, got {shown}")
    expected = _TYPE_ERRORS.get(kind.split("_")[0], first["msg"].removeprefix("Input should be "))
    keys = " keys" if loc[-1] == "[key]" else ""
    return ConfigError(f"{label}: expected {expected}{keys}, got {shown}")
