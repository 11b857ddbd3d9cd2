"""Shipped configs, addressable by name: ``create_model("base_tri")``, ``mmt train demo``, ``mmt model tiny_tri``.

The YAML files live inside the package (``mmt/configs/``, package data), so a wheel install carries them; the
repository's top-level ``configs/`` is a link to the same folder. A config argument is resolved in this order:

1. an existing file (absolute, or relative to the current folder);
2. a shipped config's name: ``tiny_tri`` (``configs/model/``), ``demo`` (``configs/train/``),
   ``retrieval_demo`` (``configs/task/``);
3. a relative path spelled ``configs/...`` that is not in the current folder: the shipped file of that name, so
   the commands in the README work from any folder of a wheel install.

Anything else is a `ConfigError` that lists the known names.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmt.config.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_SUFFIXES = (".yaml", ".yml", ".json")
# kind -> sub-folders of CONFIG_DIR searched for a name
_FOLDERS = {"model": ("model",), "run": ("train", "task")}


def _names(folders: tuple[str, ...]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder in folders:
        d = CONFIG_DIR / folder
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.suffix in _SUFFIXES:
                    out.setdefault(p.stem, p)
    return out


def list_models() -> list[str]:
    """Names of the shipped model configs (``create_model(name)``), sorted."""
    return sorted(_names(_FOLDERS["model"]))


def list_runs() -> list[str]:
    """Names of the shipped run configs (``mmt train NAME``), sorted."""
    return sorted(_names(_FOLDERS["run"]))


def resolve_config(name_or_path: str | os.PathLike, kinds: tuple[str, ...] = ("model", "run")) -> Path:
    """The file a config argument means (see the module docstring), or `ConfigError` listing known names."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    text = str(name_or_path)
    if p.suffix not in _SUFFIXES and os.sep not in text and "/" not in text:
        for kind in kinds:
            hit = _names(_FOLDERS[kind]).get(text)
            if hit is not None:
                return hit
        known = "; ".join(f"{k}s: {', '.join(sorted(_names(_FOLDERS[k])))}" for k in kinds)
        raise ConfigError(text, "<file>", f"no such config file or shipped config name ({known})")
    if not p.is_absolute() and p.parts[:1] == ("configs",):
        shipped = CONFIG_DIR.joinpath(*p.parts[1:])
        if shipped.is_file():
            return shipped
    raise ConfigError(text, "<file>", "no such config file")
