"""Where a run's options come from: the defaults, `--config FILE` (TOML or YAML, keys are the field names),
the command line, and for `--resume` the saved run's config.json (precedence in that order; the schema
and its checks: `driver.train_config.TrainConfig`)."""

from __future__ import annotations

import argparse
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import ValidationError, create_model

from driver.options import (
    STRICT,
    ConfigError,
    config_error,
    field_choices,
    field_optional,
    field_type,
    option_flag,
)
from driver.train_config import FIELDS, RESUMABLE_OVERRIDES, TrainConfig

# A config file's table: every field with its type and range, none required, no cross-field checks (those
# run once the file and the command line are merged).
_FileValues = create_model(
    "ConfigFile",
    __config__=STRICT,
    **{
        name: (Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation, None)
        for name, f in FIELDS.items()
    },
)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Reads a TOML (.toml) or YAML (.yaml/.yml) file of TrainConfig fields; each value is checked
    against its field's type and range. Returns {field: value}.

    Raises:
        ConfigError: the file is missing, unparsable, not a table, has unknown keys or bad values (the file
            and the key named).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"--config: {path}: expected a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {e}") from e
    except Exception as e:  # yaml.YAMLError, imported lazily
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of options, got {type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS), key=str)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid keys: {', '.join(FIELDS)}")
    try:
        values = _FileValues(**data)
    except ValidationError as e:
        raise config_error(e, FIELDS, str(path)) from None
    return {name: getattr(values, name) for name in data}


def _parse_resource(text: str) -> tuple[str, float]:
    name, sep, amount = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(amount)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT, got {text!r}") from None


def _optional_str(text: str) -> str | None:
    return None if text in ("", "none", "None") else text


def build_parser(prog: str = "train", description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one option per TrainConfig field (plus --config). Options not given are
    absent from the parsed namespace, so that file values are not overridden by defaults."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="TOML or YAML file of options (keys: the option names with _)")
    for name, f in FIELDS.items():
        kind, choices = field_type(f), field_choices(f)
        default = f.get_default(call_default_factory=True)
        unit = f" [{f.json_schema_extra['unit']}]" if f.json_schema_extra["unit"] else ""
        text = f"{f.description}{unit}" + ("" if default is None else f" (default: {default})")
        kwargs: dict[str, Any] = {"help": text, "dest": name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is dict:
            kwargs.update(action="append", type=_parse_resource, metavar="NAME=AMOUNT")
        elif choices and not field_optional(f):
            kwargs.update(type=str, choices=choices)
        elif field_optional(f) and (kind is str or choices):
            kwargs["type"] = _optional_str
        else:
            kwargs["type"] = kind
        parser.add_argument(option_flag(name), **kwargs)
    return parser


def given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The options given in the --config file and on the command line (which wins), {field: value}, each
    checked against its field alone: the checks across fields wait until they are merged with whatever
    else supplies the rest (the defaults in `config_from_args`, a run's saved config in `evaluate`).

    Raises:
        ConfigError: see `load_config_file`.
    """
    given = vars(args).copy()
    values = load_config_file(given.pop("config")) if "config" in given else {}
    if "engine_resources" in given:
        given["engine_resources"] = dict(given["engine_resources"])
    values.update(given)
    return values


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    """Merges defaults, the --config file and the given options; returns (config, names given on the
    command line or in the file).

    Raises:
        ConfigError: see `load_config_file` and `TrainConfig`.
    """
    values = given_values(args)
    return TrainConfig(**values), set(values)


def merge_for_resume(
    saved: dict[str, Any], current: TrainConfig, given: set[str], source: str
) -> TrainConfig:
    """The config of a resumed run: the saved run's values, with the options in RESUMABLE_OVERRIDES that
    were given now. Other options given now must equal the saved values. An option added after the run
    was started (absent from its config.json) takes its default.

    Raises:
        ConfigError: a given option changes a value that decides the weights, or the saved config is bad.
    """
    unknown = sorted(set(saved) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; not a config written by this version")
    defaults = TrainConfig()
    merged = {name: saved.get(name, getattr(defaults, name)) for name in FIELDS}
    for name in given:
        value = getattr(current, name)
        if name in RESUMABLE_OVERRIDES:
            merged[name] = value
        elif value != merged[name]:
            raise ConfigError(
                f"{option_flag(name)}: {value!r} differs from the run being resumed ({merged[name]!r} in "
                f"{source}); "
                "a resumed run keeps the hyper-parameters, data and model of the run it continues"
            )
    merged["resume"] = True
    merged["output_dir"] = current.output_dir
    return TrainConfig(**merged)
