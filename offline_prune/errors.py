"""The pruner's errors: what the command lines report as one line (exit code 2), not a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: reported as one line, no traceback."""
