"""The base of every error a user can cause and fix: the CLI prints its message as one line.

Each specific error (BundleError, ImageError, ExportError, ...) also derives from the builtin
type it always was (ValueError, RuntimeError), so existing `except ValueError` code keeps working.
An exception that is not a UserError (nor an OSError or a plain ValueError from an argument check)
is a bug: the CLI shows its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what was wrong and what to do."""


class MissingDependency(UserError, RuntimeError):
    """An optional package the requested feature needs is not installed; the message names the extra."""


class SessionClosed(UserError, RuntimeError):
    """A session or pipeline used after close(); load the bundle again."""
