"""The errors a user can cause, reported by the front door as one line rather than a traceback.

Every such error derives from :class:`SegevoError`; the CLI prints those as ``segevo: error: <message>`` and
lets anything else (a programming bug: a bare ``ValueError``, ``KeyError``, ...) keep its traceback. The kinds:

- :class:`UserError`: bad input -- a file, flag, key or value the user gave, named in the message. It is also a
  ``ValueError`` so that library callers catching ``ValueError`` keep working. Its subclasses live next to the
  code that raises them (``ConfigError``, ``CaseError``, ``CheckpointError``, ...).
- :class:`OutputError`: an output cannot be written where it was asked for.
- :class:`DownloadError`: a remote file could not be fetched or failed verification.
- :class:`MissingResource`: something that must be installed or present beside the inputs is not (a
  tokenizer vocabulary, an optional package).

This module is a leaf: it imports nothing from segevo, so any module may raise these without import cycles or
the cost of importing torch.
"""

from __future__ import annotations


class SegevoError(Exception):
    """An error whose message is the whole story for the user: shown as one line, exit status 1."""


class UserError(SegevoError, ValueError):
    """Bad input: a file, flag, key or value the user gave, named in the message."""


class OutputError(UserError):
    """An output cannot be written: it is one of the inputs, a directory, or in a folder that is not writable."""


class DownloadError(SegevoError, RuntimeError):
    """A remote file could not be fetched or failed verification."""


class MissingResource(SegevoError, RuntimeError):
    """A file or package that must be present is not (named in the message, with how to get it)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types the front door reports as one line."""
    return (SegevoError,)
