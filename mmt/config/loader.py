"""Load a typed config from YAML/JSON files plus dotted command-line overrides (OmegaConf structured configs).

A section may name another file instead of spelling it out (``model: ../model/tiny_tri.yaml``), resolved
relative to the file that names it, so model, task and training configs compose without copies.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmt.atomic import atomic_write_text
from mmt.config.errors import ConfigError
from mmt.config.model import MultiModalConfig
from mmt.config.named import resolve_config
from mmt.config.root import Config
from mmt.config.tasks import MOVED_KEYS
from mmt.config.validate import validate
from mmt.secrets import DEFAULT_SECRET_KEYS, redact, redact_override, secret_patterns

T = TypeVar("T")
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# which shipped names a schema may be loaded from (`mmt.config.named`)
_KINDS: dict[type, tuple[str, ...]] = {Config: ("run",), MultiModalConfig: ("model",)}


def _one_line(e: Exception) -> str:
    """A parser error as one line with its position (PyYAML's own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {getattr(e, 'problem', None) or e}"
    return " ".join(str(e).split())


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's top-level mapping; a missing, unreadable or unparsable file is a `ConfigError` naming it."""
    if not path.is_file():
        raise ConfigError(str(path), "<file>", "no such config file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), "<file>", f"cannot read: {e}") from e
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(str(path), "<file>", f"cannot parse: {_one_line(e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "<root>", f"expected a mapping, got {type(data).__name__}")
    return data


def _expand_includes(
    data: dict[str, Any], schema: type, base_dir: Path, source: str, prefix: str = ""
) -> dict:
    """Replace a string value that names a config file, where the schema expects a section, by that file."""
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    out = {}
    for key, value in data.items():
        sub = _section_type(schema, key) if key in fields else None
        if sub is not None and isinstance(value, str) and value.endswith(_CONFIG_SUFFIXES):
            inc = (base_dir / value).resolve()
            value = _expand_includes(read_config_file(inc), sub, inc.parent, str(inc), f"{prefix}{key}.")
        elif sub is not None and isinstance(value, dict):
            value = _expand_includes(value, sub, base_dir, source, f"{prefix}{key}.")
        out[key] = value
    return out


def _section_type(schema: type, name: str) -> type | None:
    """The dataclass type of field ``name`` of ``schema`` (unwrapping ``X | None``), or None for a leaf."""
    hints = typing.get_type_hints(schema)
    tp = hints.get(name)
    for arg in (*typing.get_args(tp), tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _comma_lists(data: Any, schema: type, source: str, prefix: str = "") -> Any:
    """``data`` with a string given for a ``list[str]`` field split on commas: ``train.preempt_signals=SIGTERM,SIGUSR1``
    on the command line (or in a file) means the list ``[SIGTERM, SIGUSR1]``. A list where a mapping of strings
    belongs (``slurm.env``) is a `ConfigError` naming the key (OmegaConf would fail with a bare TypeError or keep
    the list as the value of a ``dict[str, str]``)."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(schema):
        return data
    hints = typing.get_type_hints(schema)
    out = {}
    for key, value in data.items():
        hint = hints.get(key)
        if typing.get_origin(hint) is list and (value is None or isinstance(value, str)):
            value = [x.strip() for x in (value or "").split(",") if x.strip()]  # ``key=`` is the empty list
        elif typing.get_origin(hint) is list and isinstance(value, dict):
            raise ConfigError(source, f"{prefix}{key}", "expected a list (or a comma-separated string)")
        elif typing.get_origin(hint) is dict:
            _check_mapping(value, source, f"{prefix}{key}")
        elif isinstance(value, dict) and (sub := _section_type(schema, key)) is not None:
            value = _comma_lists(value, sub, source, f"{prefix}{key}.")
        out[key] = value
    return out


def _is_list_field(schema: type, dotted_key: str) -> bool:
    """Whether ``dotted_key`` (``train.preempt_signals``) names a ``list`` field of ``schema``."""
    *path, leaf = dotted_key.split(".")
    for name in path:
        schema = _section_type(schema, name)  # type: ignore[assignment]
        if schema is None:
            return False
    return (
        dataclasses.is_dataclass(schema)
        and typing.get_origin(typing.get_type_hints(schema).get(leaf)) is list
    )


def _check_mapping(value: Any, source: str, key: str) -> None:
    """A ``dict[str, str]`` field (``slurm.env``) takes NAME: value pairs with scalar values only."""
    if isinstance(value, list):
        raise ConfigError(
            source,
            key,
            f"expected a mapping of NAME: value ({key}.NAME=value on the command line), not a list",
        )
    for name, v in (value or {}).items() if isinstance(value, dict) else ():
        if isinstance(v, (list, dict)):
            raise ConfigError(source, f"{key}.{name}", f"expected a string, not a {type(v).__name__}")


def _merge(base: DictConfig, data: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as e:
        if e.full_key in MOVED_KEYS:
            raise ConfigError(source, e.full_key, f"moved: use {MOVED_KEYS[e.full_key]}") from None
        raise ConfigError(source, e.full_key or "<root>", _short(e)) from None


def _short(e: OmegaConfBaseException) -> str:
    return str(e).split("\n")[0]


def _to_object(node: DictConfig, source: str, schema: type[T]) -> T:
    try:
        obj = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise ConfigError(source, e.full_key or "<root>", _short(e)) from None
    validate(obj, source)
    return obj  # type: ignore[return-value]


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    schema: type[T] = Config,  # type: ignore[assignment]
) -> T:
    """Build a ``schema`` instance from defaults, then ``path``, then each ``key=value`` override in order.

    ``path`` may also name a shipped config (``demo``, ``tiny_tri``: see `mmt.config.named`).

    Raises `ConfigError` naming the file or override and the full key for an unknown key, a wrong type or a bad
    value.
    """
    node = OmegaConf.structured(schema)
    file_source = str(path) if path is not None else "<defaults>"
    if path is not None:
        p = resolve_config(path, _KINDS.get(schema, ("model", "run")))
        data = _expand_includes(read_config_file(p), schema, p.resolve().parent, str(p))
        data = _comma_lists(data, schema, str(p))
        node = _merge(node, data, str(p))
        _to_object(node, str(p), schema)
    # Types are checked as each override merges; values and cross-field rules once all are in, so the order of
    # overrides never matters. An error then names the override that set the offending key, else the file.
    set_by: list[tuple[str, str]] = []
    for item in overrides:
        source = f"command-line override {redact_override(item)!r}"
        if "=" not in item:
            raise ConfigError(source, item, "expected key=value")
        key, value = item.split("=", 1)
        if _is_list_field(schema, key.strip()) and not value.lstrip().startswith("["):
            # A comma string for a list is taken as typed, not as YAML (``*FOO*`` would be a YAML alias).
            value = "[" + ", ".join(json.dumps(x.strip()) for x in value.split(",") if x.strip()) + "]"
        try:
            dotted = OmegaConf.from_dotlist([f"{key}={value}"])
        except OmegaConfBaseException as e:
            raise ConfigError(source, key, _short(e)) from None
        except yaml.YAMLError as e:  # the value is not YAML (an unclosed bracket or quote)
            raise ConfigError(source, key, f"cannot parse the value: {_one_line(e)}") from None
        dotted = _comma_lists(OmegaConf.to_container(dotted), schema, source)
        node = _merge(node, dotted, source)
        set_by.append((key, source))
    try:
        return _to_object(node, file_source, schema)
    except ConfigError as e:
        for key, source in reversed(set_by):
            if e.key == key or e.key.startswith(key + ".") or key.startswith(e.key + "."):
                raise ConfigError(source, e.key, e.message) from None
        raise


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, fully resolved nested dict of a config object."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"model.attention.kind": "mha", "train.preempt_signals": "SIGTERM,SIGUSR1", ...}``: the form logged as
    MLflow params. A list of plain values is written as the comma-separated string the command line takes (not
    Python's ``['SIGTERM', 'SIGUSR1']``); one whose items hold commas as JSON."""
    out: dict[str, Any] = {}

    def walk(d: Any, prefix: str) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(d, list) and not any(isinstance(x, (list, dict)) or "," in str(x) for x in d):
            out[prefix[:-1]] = ",".join(str(x) for x in d)
        elif isinstance(d, list):  # items with commas in them: unambiguous as JSON
            out[prefix[:-1]] = json.dumps(d, ensure_ascii=False)
        else:
            out[prefix[:-1]] = d

    walk(to_dict(cfg), "")
    return out


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML atomically, secrets shown as ``***`` (`mmt.secrets`): the file
    sits in run folders and is logged to MLflow. `load_config` reads everything else back equal."""
    return atomic_write_text(path, yaml.safe_dump(redacted_config(cfg), sort_keys=False))


def redacted_config(cfg: Any) -> dict[str, Any]:
    """The config as a dict, safe to log, save next to the run or print (patterns from ``tracking.redact_keys``)."""
    d = to_dict(cfg)
    spec = d.get("tracking", {}).get("redact_keys", DEFAULT_SECRET_KEYS)
    return redact(d, secret_patterns(spec))
