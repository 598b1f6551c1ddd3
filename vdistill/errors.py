"""User errors: problems in the user's input or setup, which the CLI prints as one line (no traceback)."""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (a bad config, annotation or setting); the message says what and how."""


class DamagedFile(UserError, ValueError):
    """A file vdistill reads back (artifact, manifest, checkpoint, trajectory) that is missing a part, cut short or
    not in its format: shared and unpacked files get damaged, and the user needs its name, not a decoder's trace."""
