"""Errors that mean "bad input", reported to users as one line rather than a traceback."""

from __future__ import annotations


class DownloadError(RuntimeError):
    """A remote file could not be fetched or failed verification."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Imported on demand: modules raising ``DownloadError`` must not pay for importing torch."""
    from segevo.config import ConfigError
    from segevo.model.checkpoint import CheckpointError
    from segevo.model.tokenizer import TokenizerUnavailable

    return (ConfigError, CheckpointError, TokenizerUnavailable, DownloadError, ValueError, FileNotFoundError)

