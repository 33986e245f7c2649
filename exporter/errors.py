"""The exporter's base error: an export (or one of its outputs) that cannot proceed; the message says what to do."""
from __future__ import annotations

from bridge_export.runtime.errors import UserError


class ExportError(UserError, RuntimeError):
    """An export that cannot proceed; the message says what to do."""
