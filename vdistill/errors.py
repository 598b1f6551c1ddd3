"""User errors: problems in the user's input or setup, which the CLI prints as one line (no traceback)."""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (a bad config, annotation or setting); the message says what and how."""
