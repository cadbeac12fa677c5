"""Errors that mean "bad input", reported to users as one line rather than a traceback.

Every error a user can cause derives from :class:`UserError` (or is a :class:`DownloadError`), so the front door
can print those as one line and let anything else (a programming bug) keep its traceback. ``UserError`` is a
``ValueError`` so that library callers catching ``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: a file, flag, key or value the user gave, named in the message."""


class OutputError(UserError):
    """An output cannot be written: it is one of the inputs, a directory, or in a folder that is not writable."""


class DownloadError(RuntimeError):
    """A remote file could not be fetched or failed verification."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Imported on demand: modules raising ``DownloadError`` must not pay for importing torch. The two
    exceptions here predate :class:`UserError` and live in modules that cannot import it cheaply."""
    from segevo.model.adapters import UnknownModality
    from segevo.model.tokenizer import TokenizerUnavailable

    return (UserError, UnknownModality, TokenizerUnavailable, DownloadError)
