"""Secrets in a config never leave the machine: what mmt logs, saves or prints shows ``***`` in their place.

A config legitimately carries secrets: ``slurm.env`` exports credentials to every rank, a ``tracking.uri`` may
hold ``user:password@``. Everything derived from the config that others can read (MLflow params, tags and the
logged ``config.yaml``, the run folder's ``config.yaml``, ``ds_config.json`` and ``mmt_meta.json``, the console,
``metrics.jsonl``) goes through `redact`: a value whose key matches one of ``tracking.redact_keys`` (glob
patterns, case-insensitive, on the last key name: ``*SECRET*`` matches ``AWS_SECRET_ACCESS_KEY``) becomes
``***``, and URL user-info anywhere in a string becomes ``scheme://***@host``. The default patterns skip
``*TOKEN*`` on purpose: ``max_tokens`` is not a secret, ``HF_TOKEN`` (``*TOKEN``) is.

A tracking URI's credentials are handed to the MLflow client through ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` (`tracking_credentials`), never inside the URI, so MLflow's own messages cannot
show them either.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

REDACTED = "***"
DEFAULT_SECRET_KEYS: tuple[str, ...] = (
    "*SECRET*",
    "*PASSWORD*",
    "*PASSWD*",
    "*CREDENTIAL*",
    "*TOKEN",
    "*_TOKEN_*",
    "*_KEY",
    "*API_KEY*",
    "*PRIVATE_KEY*",
    "*_PAT",
)
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"

# Patterns as strings: `re` compiles and caches them on first use, so importing this module (which `mmt --help`
# does) costs no regex compilation.
# scheme://user[:password]@ ... (user-info stops at the first '/', whitespace or quote; '@' ends it)
_USERINFO = r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/@\s'\"]+)@"
# KEY=value or KEY: value inside text; the value runs to the next separator (comma, space, quote, ';')
_PAIR = r"(?P<k>[A-Za-z_][\w.-]*)(?P<sep>\s*[=:]\s*)(?P<v>[^,;\s'\"]+)"


def secret_patterns(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``["*secret*", "*_KEY"]`` (``tracking.redact_keys``) or ``"*SECRET*, *_KEY"`` -> ``("*SECRET*", "*_KEY")``."""
    items = [spec] if isinstance(spec, str) else spec
    return tuple(p.strip().upper() for item in items for p in str(item).split(",") if p.strip())


def is_secret_key(key: str, patterns: tuple[str, ...]) -> bool:
    """Whether a value stored under ``key`` (its last dotted part) must never be shown."""
    name = str(key).rsplit(".", 1)[-1].upper()
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def redact_url(text: str) -> str:
    """``https://user:pw@host/x`` -> ``https://***@host/x``, wherever URLs occur in ``text``."""
    return re.sub(_USERINFO, lambda m: f"{m.group('scheme')}{REDACTED}@", text)


def redact_text(text: str, patterns: tuple[str, ...]) -> str:
    """URL user-info, and ``KEY=value`` / ``KEY: value`` pairs with a secret key (``tracking.tags``
    ``ci_token=...``, an ``export HF_TOKEN=...`` in ``slurm.setup``) inside free text."""

    def pair(m: re.Match) -> str:
        return (
            m.group(0)
            if not is_secret_key(m.group("k"), patterns)
            else f"{m.group('k')}{m.group('sep')}{REDACTED}"
        )

    return re.sub(_PAIR, pair, redact_url(text)) if patterns else redact_url(text)


# A quoted value inside an error message: 'value' or "value" (OmegaConf's "Value 'x' could not be converted")
_QUOTED = r"'[^']*'|\"[^\"]*\""


def redact_error_text(text: str, key: str = "") -> str:
    """An error message about ``key`` that is safe to print: URL user-info and secret ``KEY=value`` pairs
    redacted (default ``tracking.redact_keys``: an error comes before the config it is about is known), and, when
    ``key`` itself is secret, every quoted value and everything after its ``key=`` too (the message may echo the
    value it refused)."""
    patterns = secret_patterns(DEFAULT_SECRET_KEYS)
    text = redact_text(text, patterns)
    if key and is_secret_key(key, patterns):
        # Names stay readable ("Key 'password' not in 'TrackingConfig'"): a part of the key or a config class.
        names = set(str(key).split("."))

        def quoted(m: re.Match) -> str:
            inner = m.group(0)[1:-1]
            keep = len(inner) < 2 or inner in names or re.fullmatch(r"[A-Z][A-Za-z]*Config", inner)
            return m.group(0) if keep else f"{m.group(0)[0]}{REDACTED}{m.group(0)[0]}"

        text = re.sub(_QUOTED, quoted, text)
    return text


def redact_override(item: str) -> str:
    """``slurm.env.HF_TOKEN=hf_x y`` -> ``slurm.env.HF_TOKEN=***``: a command-line override as an error shows it."""
    key, sep, _ = item.partition("=")
    if sep and is_secret_key(key.strip(), secret_patterns(DEFAULT_SECRET_KEYS)):
        return f"{key}={REDACTED}"
    return item


def redact(obj: Any, patterns: tuple[str, ...], key: str = "") -> Any:
    """A copy of ``obj`` (dicts, lists, scalars) with secret-keyed values and URL user-info replaced."""
    if key and is_secret_key(key, patterns) and obj not in (None, "", {}, []):
        return REDACTED
    if isinstance(obj, dict):
        return {k: redact(v, patterns, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, patterns) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, patterns)
    return obj


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """``http://u:p@host`` -> ``("http://host", "u", "p")``; no user-info -> ``(uri, None, None)``."""
    m = re.match(_USERINFO, uri)
    if not m:
        return uri, None, None
    user, _, password = m.group("info").partition(":")
    return m.group("scheme") + uri[m.end() :], unquote(user), unquote(password) if password else None


def tracking_credentials(uri: str) -> str:
    """The URI to give MLflow: user-info taken out; real credentials in it become the ``MLFLOW_TRACKING_*``
    variables MLflow reads (unless already set: the environment wins). A redacted ``***@`` (a saved config)
    just goes: the job's environment carries the credentials."""
    bare, user, password = split_userinfo(uri)
    if user and user != REDACTED:
        os.environ.setdefault(USERNAME_ENV, user)
        if password:
            os.environ.setdefault(PASSWORD_ENV, password)
    return bare
