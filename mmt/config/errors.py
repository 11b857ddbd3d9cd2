"""The one error type for bad configuration: it always names the file (or the command line) and the key."""

from __future__ import annotations

from mmt.secrets import redact_error_text


class ConfigError(ValueError):
    """A bad config file, key or value. The message never shows a secret: a value given for a secret-named key
    (``slurm.env.HF_TOKEN=...``, ``*PASSWORD*``: the default ``tracking.redact_keys``) is shown as ``***``, and so
    are URL user-info (``s3://key:secret@bucket``) and secret ``KEY=value`` pairs anywhere in it."""

    def __init__(self, source: str, key: str, message: str) -> None:
        source, message = redact_error_text(source), redact_error_text(message, key)
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}")
