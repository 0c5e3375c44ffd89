"""Errors that are the user's to fix: shown as one clear message, never as a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names the field and says what to do."""


class ServiceUnavailable(UserError):
    """The kind has no service in this version."""
